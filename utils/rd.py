"""Rate-distortion points: one CSV schema for every codec, neural or classical."""
import csv
import math

import tensorflow as tf

FIELDS = ("codec", "setting", "image", "bpp", "psnr", "ms_ssim", "est_bpp")


def write_points(path, rows):
  """Writes RD rows (dicts with FIELDS; est_bpp may be missing for classical codecs)."""
  parent = path.rsplit("/", 1)[0] if "/" in path else ""
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(path, "w") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _format(row.get(k, "")) for k in FIELDS})


def read_points(path):
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
