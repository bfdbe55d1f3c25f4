"""Rate and distortion measures: bpp from real bytes, PSNR and MS-SSIM on decoded uint8 RGB images."""
import numpy as np
import tensorflow as tf

# tf.image.ssim_multiscale's weights for its five scales (Wang et al. 2003).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_FILTER = 11


def bpp(num_bytes, height, width):
  return 8.0 * num_bytes / (height * width)


def mse(a, b):
  return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def psnr(a, b, peak=255.0):
  """RGB PSNR in dB over all pixels and channels; inf for identical images."""
  err = mse(a, b)
  return float("inf") if err == 0 else float(10 * np.log10(peak ** 2 / err))


def ms_ssim_scales(height, width):
  """How many of the five MS-SSIM scales an image supports, and the filter size used.

  Rule: tf.image.ssim_multiscale needs the smaller side to be at least
  (filter - 1) * 2**(scales - 1) + 1 pixels. Images too small for all five scales use as many
  scales as fit, with the first weights of the standard five renormalised to sum to one; an image
  whose smaller side is under 11 pixels uses one scale (plain SSIM) with the filter shrunk to that
  side (odd). Kodak-sized images (and anything >= 161 pixels a side) get the standard five.
  """
  side = min(height, width)
  scales = 5
  while scales > 1 and side < (MS_SSIM_FILTER - 1) * 2 ** (scales - 1) + 1:
    scales -= 1
  filter_size = MS_SSIM_FILTER if side >= MS_SSIM_FILTER else max(1, side - (1 - side % 2))
  return scales, filter_size


def ms_ssim(a, b):
  """MS-SSIM of two uint8 HxWx3 images (peak 255), following the rule of ms_ssim_scales."""
  a = tf.convert_to_tensor(np.asarray(a, np.float32))
  b = tf.convert_to_tensor(np.asarray(b, np.float32))
  scales, filter_size = ms_ssim_scales(a.shape[0], a.shape[1])
  weights = np.array(MS_SSIM_WEIGHTS[:scales], np.float64)
  weights = tuple(float(w) for w in weights / weights.sum())
  value = tf.image.ssim_multiscale(
      a, b, max_val=255.0, power_factors=weights, filter_size=filter_size)
  return float(value)
