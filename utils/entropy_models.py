"""Entropy models shared by the hyperprior-style codecs (bmshj2018, hcae)."""
import math

import tensorflow as tf
import utils
tfc = utils.lazy_import("tensorflow_compression")

# Gaussian scales: a table of 64 values log-spaced from 0.11 to 256 (Ballé et al. 2018).
NUM_SCALES = 64
SCALE_MIN = 0.11
SCALE_MAX = 256.0


def scale_fn(index):
  """Scale of table entry `index` (continuous in training)."""
  step = (math.log(SCALE_MAX) - math.log(SCALE_MIN)) / (NUM_SCALES - 1)
  return tf.exp(math.log(SCALE_MIN) + step * index)


def gaussian_conditional(compression):
  """Zero-mean Gaussian convolved with a unit uniform, its scale picked per element by an index.

  Indexes below 0 or above NUM_SCALES - 1 are clipped, which also bounds the scale from below
  (SCALE_MIN) and keeps the rate term finite however small a predicted scale gets.
  """
  return tfc.LocationScaleIndexedEntropyModel(
      tfc.NoisyNormal, NUM_SCALES, scale_fn, coding_rank=3, compression=compression)


def coding_indexes(raw, dtype=tf.float32):
  """Continuous (exactly computed) index predictions -> the integer table indexes used for coding."""
  indexes = tf.clip_by_value(tf.floor(raw + 0.5), 0, NUM_SCALES - 1)
  return tf.cast(indexes, dtype)


def factorized(prior, compression):
  """The factorized entropy model of a top-level latent, on the integer grid.

  No offset heuristic: the quantized latent is an integer, which the exact networks downstream of
  it (utils/exact.py) take as input without rounding.
  """
  return tfc.ContinuousBatchedEntropyModel(
      prior, coding_rank=3, compression=compression, offset_heuristic=False)
