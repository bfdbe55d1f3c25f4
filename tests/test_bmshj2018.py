"""bmshj2018 specifics: where the side information z is measured on photos of any size."""
import numpy as np
import tensorflow as tf

import bmshj2018
from utils import data


def test_side_information_lines_up_with_the_hyper_synthesis_on_any_size():
  # y of 4x20 latents, and the same photo 16 pixels narrower (y 4x19, not a multiple of 4). Their
  # first two z columns see the same latents (the narrower photo differs only near its right
  # edge), so they must agree: unpadded, the odd width shifted every z window by 3 latents.
  model = bmshj2018.BMSHJ2018Model(0.01, num_filters=16, latent_depth=16)
  photo = data.read_image(data.builtin_paths("eval")[0])[:64, :320].astype(np.float32)
  wide = model.side_information(model.analysis(photo[None]))
  narrow = model.side_information(model.analysis(photo[None, :, :304]))
  assert wide.shape[2] == narrow.shape[2] == 5  # ceil(20 / 4), ceil(19 / 4)
  scale = float(tf.reduce_max(tf.abs(wide[:, :, :2])))
  assert scale > 0
  np.testing.assert_allclose(narrow[:, :, :2], wide[:, :, :2], atol=1e-4 * scale)
