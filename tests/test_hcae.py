"""hcae specifics: the hierarchy's shape, and training that stays finite at the sweep's top lambda."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

import hcae
from utils import cli, training
from utils.errors import UserError


def test_levels_and_strings():
  model = hcae.HCAEModel(0.01, levels=6, num_filters=8, latent_channels=[4, 4, 4, 4, 4, 6])
  assert hcae.level_strides(6) == [16, 16, 32, 32, 64, 64]
  assert model.DOWNSAMPLING == 16  # the coarser levels line up inside the model
  assert model.STRING_NAMES == ("z6", "z5", "z4", "z3", "z2", "z1")
  terms = model(tf.random.uniform((1, 37, 53, 3), 0, 255), training=False)
  assert all(math.isfinite(float(v)) for v in terms.values())
  with pytest.raises(UserError, match="1 or 6 values"):
    hcae.HCAEModel(0.01, levels=6, latent_channels=[4, 4])


def test_high_lambda_training_stays_finite_and_improves(tmp_path):
  # lambda 8.02 (the sweep's highest) with a large learning rate: gradient clipping must keep it
  # finite; the loss must still go down.
  parser, flags = cli.build_parser("hcae", hcae.add_model_flags)
  args = parser.parse_args([
      "train", "--lambda", "8.02", "--levels", "4", "--num_filters", "16", "--latent_channels", "8",
      "--patch_size", "64", "--batch_size", "4", "--epochs", "3", "--steps_per_epoch", "10",
      "--learning_rate", "3e-3", "--verbose", "0", "--model_path", str(tmp_path / "m"),
      "--eval_glob", str(tmp_path / "val.png")])
  from PIL import Image
  from conftest import natural_image
  Image.fromarray(natural_image(64, 64)).save(tmp_path / "val.png")
  history = training.train(hcae.build_model, args, cli.model_config("hcae", args, flags),
                           export=False)
  assert history.model.optimizer.global_clipnorm == hcae.HCAEModel.GLOBAL_CLIPNORM == 1.0
  losses = history.history["loss"]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def _local_bottom_up(model):
  """Makes the bottom-up pass local: its ResNet blocks become identities (conv_b zero), so a
  level's left columns depend only on the image's left ~200 pixels."""
  for block in model.bottom_up:
    res = block.layers[-1]
    res.conv_b.kernel.assign(tf.zeros_like(res.conv_b.kernel))
    res.conv_b.bias.assign(tf.zeros_like(res.conv_b.bias))


def test_coarser_levels_measure_where_the_top_down_path_predicts():
  # Images are padded to 16 only, so a map below a halving level can be odd (304 pixels: 19
  # latents at 1/16); unpadded, a stride-2 'same' convolution would centre its windows there one
  # position further than on the even maps of training, where the top-down upsampling puts its
  # output. The same photo 16 pixels narrower must give the same left columns at every level.
  from conftest import natural_image
  tf.keras.utils.set_random_seed(0)
  model = hcae.HCAEModel(0.01, levels=6, num_filters=8, latent_channels=[4])
  _local_bottom_up(model)
  image = tf.constant(natural_image(64, 320), tf.float32)[None]
  wide, narrow = model._features(image), model._features(image[:, :, :304])
  assert [f.shape[2] for f in narrow] == [19, 19, 10, 10, 5, 5]
  for level, (a, b) in enumerate(zip(wide, narrow)):
    columns = 4 if level < 2 else 1  # far enough from the right edge
    np.testing.assert_allclose(a[:, :, :columns].numpy(), b[:, :, :columns].numpy(), atol=1e-5,
                               err_msg=f"level {level}")


def test_photos_are_padded_to_16_and_the_levels_shapes_follow():
  model = hcae.HCAEModel(0.01, levels=6, num_filters=8, latent_channels=[4])
  shapes = model._level_shapes(tf.constant([304, 464]))
  assert [tuple(s.numpy()) for s in shapes] == [(19, 29), (19, 29), (10, 15), (10, 15), (5, 8), (5, 8)]
  terms = model(tf.random.uniform((1, 300, 451, 3), 0, 255), training=False)
  assert all(math.isfinite(float(v)) for v in terms.values())


def test_files_of_exports_that_padded_to_64_are_refused():
  # Exports made before the padding to 16 coded images padded to 64, with the same weights: their
  # files would decode here at other latent shapes. The padding is part of the fingerprint.
  from conftest import natural_image
  from utils.codec import Codec
  from utils.errors import BitstreamError
  tf.keras.utils.set_random_seed(0)
  model = hcae.HCAEModel(0.01, levels=6, num_filters=8, latent_channels=[4])
  image = natural_image(40, 72)
  new = Codec.from_model(model, {})
  model.DOWNSAMPLING = 64  # as the old code padded
  old = Codec.from_model(model, {})
  assert old.fingerprint != new.fingerprint
  old_file, _ = old.encode(image)
  np.testing.assert_array_equal(old.decode(old_file), new.decode(new.encode(image)[0]))
  with pytest.raises(BitstreamError, match="another hcae model"):
    new.decode(old_file)


def test_bls2017_transforms_code_a_photo_at_the_same_latent_grid():
  # The cpu preset's stem and synthesis: a 9x9 stride-4 layer and two 5x5 stride-2 ones each way.
  # The latents keep the 1/16 grid of the four stride-2 layers, and a real file of an odd-sized
  # photo decodes (float64 synthesis included) to the photo's size, the same bytes every time.
  from conftest import natural_image
  from utils.codec import Codec
  tf.keras.utils.set_random_seed(0)
  model = hcae.HCAEModel(0.01, levels=6, num_filters=8, latent_channels=[4], bls2017_transforms=True)
  assert [(layer.kernel_size[0], layer.strides[0]) for layer in model.stem.layers[1:]] == [
      (9, 4), (5, 2), (5, 2)]
  assert [(layer.kernel_size[0], layer.strides[0]) for layer in model.synthesis.layers[:-1]] == [
      (5, 2), (5, 2), (9, 4)]
  default = hcae.HCAEModel(0.01, levels=6, num_filters=8, latent_channels=[4])
  image = natural_image(40, 72)
  batch = tf.constant(image, tf.float32)[None]
  assert [f.shape for f in model._features(batch)] == [f.shape for f in default._features(batch)]
  codec = Codec.from_model(model, {})
  data, _ = codec.encode(image)
  decoded = codec.decode(data)
  assert decoded.shape == image.shape and decoded.dtype == np.uint8
  np.testing.assert_array_equal(codec.decode(codec.encode(image)[0]), decoded)


def test_the_switch_is_recorded_only_when_on_so_older_models_still_resume(tmp_path):
  parser, flags = cli.build_parser("hcae", hcae.add_model_flags)
  base = ["train", "--lambda", "0.01", "--model_path", str(tmp_path)]
  off, on = parser.parse_args(base), parser.parse_args(base + ["--bls2017_transforms"])
  for args in (off, on):
    cli.check_train_flags(args, flags)  # a switch is not a positive-integer flag
  # The config a model trained before the switch existed recorded.
  (tmp_path / training.CONFIG).write_text(json.dumps(
      {"codec": "hcae", "lambda": 0.01, "levels": 6, "num_filters": 128, "latent_channels": [64]}))
  training.check_model_dir(str(tmp_path), cli.model_config("hcae", off, flags))
  with pytest.raises(UserError, match="bls2017_transforms: None -> True"):
    training.check_model_dir(str(tmp_path), cli.model_config("hcae", on, flags))
  with pytest.raises(UserError, match="another shape"):
    training.check_warm_start(str(tmp_path), cli.model_config("hcae", on, flags))
