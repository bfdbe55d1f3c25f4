import math

import numpy as np
import pytest

from utils import metrics
from conftest import natural_image


def test_bpp_is_bits_per_pixel():
  assert metrics.bpp(1000, 100, 80) == 1.0


def test_psnr_known_value():
  a = np.zeros((4, 4, 3), np.uint8)
  b = a + 1
  assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(255))
  assert metrics.psnr(a, a) == math.inf


@pytest.mark.parametrize("size,scales", [((512, 768), 5), ((161, 300), 5), ((160, 300), 4),
                                         ((37, 53), 2), ((41, 53), 3), ((11, 20), 1), ((3, 5), 1)])
def test_ms_ssim_scales_rule(size, scales):
  assert metrics.ms_ssim_scales(*size)[0] == scales


@pytest.mark.parametrize("size", [(512, 768), (37, 53), (3, 5), (1, 1)])
def test_ms_ssim_any_size(size):
  a = natural_image(*size)
  assert metrics.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
  b = np.clip(a.astype(int) + np.random.default_rng(0).integers(-40, 40, a.shape), 0, 255)
  assert metrics.ms_ssim(a, b) < 1.0 or size == (1, 1)


def test_ms_ssim_matches_tensorflow_at_full_size():
  import tensorflow as tf
  a = natural_image(200, 240, 1)
  b = natural_image(200, 240, 2)
  expected = float(tf.image.ssim_multiscale(a.astype(np.float32), b.astype(np.float32), 255.0))
  assert metrics.ms_ssim(a, b) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("size", [(37, 53), (41, 53), (99, 160), (161, 301), (11, 20), (3, 5)])
def test_ms_ssim_matches_tensorflow_at_every_scale_rule(size):
  """Fewer scales, odd sides (TensorFlow pads them before halving) and shrunk windows as
  tf.image.ssim_multiscale computes them, given the scales and window of ms_ssim_scales. Within
  1e-4: TensorFlow's float32 variances (E[x^2] - E[x]^2, terms near 1e5) move a mean over a few
  pixels by up to 4e-5 (the same arithmetic in float32 and float64: 0.469670 and 0.469667 at 11x20)."""
  import tensorflow as tf
  a = natural_image(*size, 3)
  b = np.clip(a.astype(int) + np.random.default_rng(1).integers(-30, 30, a.shape), 0, 255)
  scales, filter_size = metrics.ms_ssim_scales(*size)
  weights = np.array(metrics.MS_SSIM_WEIGHTS[:scales]) / sum(metrics.MS_SSIM_WEIGHTS[:scales])
  expected = float(tf.image.ssim_multiscale(a.astype(np.float32), b.astype(np.float32), 255.0,
                                            power_factors=tuple(weights), filter_size=filter_size))
  assert metrics.ms_ssim(a, b) == pytest.approx(expected, rel=1e-4)


def test_ms_ssim_window_is_tensorflows_two_dimensional_one():
  """Two 1-D passes of the window equal TensorFlow's 11x11 window (an outer product, normalised as
  a whole) over the valid region."""
  import tensorflow as tf
  x = np.random.default_rng(2).uniform(0, 255, (30, 40, 3))
  coords = tf.range(11, dtype=tf.float64) - 5.0
  g = tf.reshape(-0.5 * coords ** 2 / 1.5 ** 2, (1, -1)) + tf.reshape(-0.5 * coords ** 2 / 1.5 ** 2, (-1, 1))
  window = tf.reshape(tf.nn.softmax(tf.reshape(g, (1, -1))), (11, 11, 1, 1))
  expected = tf.nn.depthwise_conv2d(x[None], tf.tile(window, (1, 1, 3, 1)), (1, 1, 1, 1), "VALID")[0]
  got = metrics._blur(x, metrics._gaussian(11))
  assert got.shape == (20, 30, 3)
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12)


def test_ms_ssim_refuses_images_of_different_shapes():
  a = natural_image(40, 50)
  with pytest.raises(ValueError, match="one shape"):
    metrics.ms_ssim(a, a[:, :49])
