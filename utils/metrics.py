"""Rate and distortion measures: bpp from real bytes, PSNR and MS-SSIM on decoded uint8 RGB images."""
import numpy as np
from scipy import ndimage

# tf.image.ssim_multiscale's weights for its five scales (Wang et al. 2003).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_FILTER = 11
MS_SSIM_SIGMA = 1.5


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


def _gaussian(size, sigma=MS_SSIM_SIGMA):
  """tf.image.ssim_multiscale's window is the outer product of this one with itself."""
  coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-0.5 * coords * coords / sigma ** 2)
  return g / g.sum()


def _blur(x, window):
  """The window's weighted mean around each pixel whose window lies inside the image ("VALID")."""
  for axis in (0, 1):
    x = ndimage.correlate1d(x, window, axis=axis, mode="constant")
  r = len(window) // 2
  return x[r:x.shape[0] - r, r:x.shape[1] - r]


def _halve(x):
  """tf.image.ssim_multiscale's downsampling: an odd side gets its last row or column repeated
  (SYMMETRIC padding), then 2x2 means."""
  h, w = x.shape[:2]
  x = np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)), mode="symmetric")
  return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, -1).mean(axis=(1, 3))


def ms_ssim(a, b):
  """MS-SSIM of two uint8 HxWx3 images (peak 255), following the rule of ms_ssim_scales.

  The definition of tf.image.ssim_multiscale (its window, constants, downsampling, per-channel
  geometric mean, then the mean over channels), computed in float64 with the Gaussian window
  applied as two 1-D passes: 8-10x faster than TensorFlow's 11x11 depthwise convolutions (1.2 s
  for a 512x512 photo on one core, most of Figure 6's time), and without the float32 cancellation
  in TensorFlow's variances, which moved its values by up to 5.3e-5 over Figure 6's points
  (README, "Rate and quality numbers").
  """
  x = np.asarray(a, np.float64)
  y = np.asarray(b, np.float64)
  if x.shape != y.shape or x.ndim != 3:
    raise ValueError(f"MS-SSIM needs two HxWxC images of one shape, not {x.shape} and {y.shape}")
  scales, filter_size = ms_ssim_scales(x.shape[0], x.shape[1])
  weights = np.array(MS_SSIM_WEIGHTS[:scales], np.float64)
  weights /= weights.sum()
  window = _gaussian(filter_size)
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  per_scale = []
  for scale in range(scales):
    if scale:
      x, y = _halve(x), _halve(y)
    mean_x, mean_y = _blur(x, window), _blur(y, window)
    num0 = 2 * mean_x * mean_y
    den0 = mean_x * mean_x + mean_y * mean_y
    cs = (2 * _blur(x * y, window) - num0 + c2) / (_blur(x * x + y * y, window) - den0 + c2)
    if scale < scales - 1:
      per_scale.append(np.maximum(cs.mean(axis=(0, 1)), 0))
    else:  # the coarsest scale counts luminance too
      per_scale.append(np.maximum(((num0 + c1) / (den0 + c1) * cs).mean(axis=(0, 1)), 0))
  per_channel = np.prod(np.stack(per_scale) ** weights[:, None], axis=0)
  return float(per_channel.mean())
