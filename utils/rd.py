"""Rate-distortion points: one CSV schema for every codec, neural or classical; mean curves per
setting and Bjontegaard deltas between curves."""
import csv
import math

import numpy as np

FIELDS = ("codec", "setting", "image", "bpp", "psnr", "ms_ssim", "est_bpp")


def write_points(path, rows):
  """Writes RD rows (dicts with FIELDS; est_bpp may be missing for classical codecs)."""
  # TensorFlow only for tf.io.gfile here, so that curves and BD-rates work without loading it.
  import tensorflow as tf
  parent = path.rsplit("/", 1)[0] if "/" in path else ""
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(path, "w") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _format(row.get(k, "")) for k in FIELDS})


def read_points(path):
  import tensorflow as tf
  with tf.io.gfile.GFile(path) as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for k in ("bpp", "psnr", "ms_ssim", "est_bpp"):
      row[k] = float(row[k]) if row.get(k) not in (None, "") else math.nan
  return rows


def _format(value):
  if isinstance(value, float):
    return f"{value:.6f}"
  return value


def means(rows, keys=("bpp", "est_bpp", "psnr", "ms_ssim")):
  out = {}
  for k in keys:
    vals = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
    out[k] = sum(vals) / len(vals) if vals else math.nan
  return out


def mean_curve(rows, keys=("bpp", "psnr", "ms_ssim")):
  """One point per setting: the mean of each key over the images, in order of increasing mean bpp.

  Returns dicts with "setting", "images" (how many rows were averaged) and the keys present in the rows.
  """
  groups = {}
  for row in rows:
    groups.setdefault(row["setting"], []).append(row)
  curve = []
  for setting, members in groups.items():
    point = dict(setting=setting, images=len(members))
    point.update({k: v for k, v in means(members, keys).items() if not math.isnan(v)})
    curve.append(point)
  return sorted(curve, key=lambda p: p["bpp"])


def _points(curve, metric):
  """(bpp, metric) arrays of the efficient points of RD rows (averaged per setting) or of
  (bpp, metric) pairs, by increasing rate.

  Only points that no cheaper point matches in quality are kept: a setting that costs more for less
  (as when re-encoding a JPEG source on its own 8x8 grid happens to favour one quality) is one no
  user would pick, and Bjontegaard interpolation needs both axes increasing.
  """
  curve = list(curve)
  if curve and isinstance(curve[0], dict):
    curve = [(p["bpp"], p[metric]) for p in mean_curve(curve, ("bpp", metric))]
  points = sorted(((float(r), float(q)) for r, q in curve if r > 0 and math.isfinite(q)),
                  key=lambda p: (p[0], -p[1]))
  efficient = []
  for rate, quality in points:
    if not efficient or quality > efficient[-1][1]:
      efficient.append((rate, quality))
  if len(efficient) < 2:
    raise ValueError(f"an RD curve needs at least two points of increasing rate and quality, "
                     f"not {len(efficient)}")
  efficient = np.array(efficient, np.float64)
  return efficient[:, 0], efficient[:, 1]


def _mean_gap(anchor_x, anchor_y, test_x, test_y):
  """Mean of test(x) - anchor(x) over the common x range, both curves PCHIP-interpolated."""
  from scipy.interpolate import PchipInterpolator
  low, high = max(anchor_x[0], test_x[0]), min(anchor_x[-1], test_x[-1])
  if high <= low:
    raise ValueError(f"the curves do not overlap ({anchor_x[0]:.3g}..{anchor_x[-1]:.3g} vs "
                     f"{test_x[0]:.3g}..{test_x[-1]:.3g})")
  anchor = PchipInterpolator(anchor_x, anchor_y).integrate(low, high)
  test = PchipInterpolator(test_x, test_y).integrate(low, high)
  return float((test - anchor) / (high - low))


def bd_rate(anchor, test, metric="psnr"):
  """Bjontegaard delta rate of `test` against `anchor`, in percent (negative: test needs fewer bits).

  Each curve is RD rows (averaged per setting, see mean_curve) or (bpp, quality) pairs; dominated
  points are left out (see _points). Log-rate is interpolated (PCHIP) as a function of quality and
  averaged over the range both curves cover.
  """
  anchor_rate, anchor_quality = _points(anchor, metric)
  test_rate, test_quality = _points(test, metric)
  gap = _mean_gap(anchor_quality, np.log(anchor_rate), test_quality, np.log(test_rate))
  return 100.0 * (math.exp(gap) - 1.0)


def bd_psnr(anchor, test, metric="psnr"):
  """Bjontegaard delta quality of `test` against `anchor` (dB for PSNR) at equal rate: quality
  interpolated (PCHIP) as a function of log-rate, averaged over the common rate range."""
  anchor_rate, anchor_quality = _points(anchor, metric)
  test_rate, test_quality = _points(test, metric)
  return _mean_gap(np.log(anchor_rate), anchor_quality, np.log(test_rate), test_quality)


def rate_at_quality(curve, quality, metric="psnr"):
  """The bpp `curve` needs for `quality`: log-rate PCHIP-interpolated as a function of quality
  (NaN outside the curve's range). With one point of another codec, rate_at_quality(anchor, q)
  against its bpp is Bjontegaard's delta rate over a range of zero width."""
  from scipy.interpolate import PchipInterpolator
  rate, value = _points(curve, metric)
  if not value[0] <= quality <= value[-1]:
    return math.nan
  return float(math.exp(PchipInterpolator(value, np.log(rate))(quality)))


def quality_at_rate(curve, bpp, metric="psnr"):
  """The quality `curve` reaches at `bpp` (PCHIP in log-rate; NaN outside the curve's range)."""
  from scipy.interpolate import PchipInterpolator
  rate, value = _points(curve, metric)
  if not rate[0] <= bpp <= rate[-1]:
    return math.nan
  return float(PchipInterpolator(np.log(rate), value)(math.log(bpp)))
