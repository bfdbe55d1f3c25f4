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
