"""Entropy models shared by the codecs: the factorized density (bls2017, and the top level of
bmshj2018 and hcae) and the indexed Gaussian (bmshj2018, hcae)."""
import functools
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
  """The factorized entropy model of a latent coded on the integer grid (bls2017's y, the top
  level of bmshj2018 and hcae).

  No offset heuristic: the quantized latent is an integer, which the synthesis (fed round(y) in
  training too) and the exact networks downstream of it (utils/exact.py) take without rounding;
  the heuristic would also cost an iterative search at every training step.
  """
  return _graph_tables_model()(prior, coding_rank=3, compression=compression, offset_heuristic=False)


@functools.cache
def _graph_tables_model():
  """tensorflow-compression's ContinuousBatchedEntropyModel, building its range-coding tables in
  a graph: the same tables (compared bit for bit), in 1.4 s instead of 3.4-10 s per export on 2
  CPU cores. The tables need the prior's tail quantiles, which the library finds with a loop of a
  few hundred Adam steps through the deep factorized density, run op by op when eager.
  Made on first use, so that coding alone never imports the library's Python package.
  """

  # Its parent's name, so that its name scope and variable names stay the parent's.
  class ContinuousBatchedEntropyModel(tfc.ContinuousBatchedEntropyModel):

    def _build_tables(self, prior, precision, offset=None):
      build = super()._build_tables
      return tf.function(lambda: build(prior, precision, offset))()

  return ContinuousBatchedEntropyModel
