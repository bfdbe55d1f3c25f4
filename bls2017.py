"""Ballé, Laparra, Simoncelli, "End-to-end optimized image compression", ICLR 2017.

GDN analysis transform (9x9 stride 4, 5x5 stride 2, 5x5 stride 2), mirrored synthesis with inverse
GDN, and a factorized prior (tensorflow-compression's NoisyDeepFactorized) on the latents.
Training adds uniform noise to the latents for the rate term and feeds the synthesis the rounded
latents with a straight-through gradient (--quantization noise: the noisy ones, as in the paper);
coding rounds them.

    python bls2017.py train --lambda 0.015
    python bls2017.py compress photo.png
    python bls2017.py decompress photo.png.lic
    python bls2017.py evaluate
"""
import sys

import utils  # first: quiets TensorFlow start-up logs

import tensorflow as tf
tfc = utils.lazy_import("tensorflow_compression")

from utils import cli
from utils.entropy_models import factorized
from utils.model import CompressionModel, Float64Synthesis


def analysis_transform(num_filters):
  conv = lambda k, s, name, act: tf.keras.layers.Conv2D(
      num_filters, k, strides=s, padding="same", use_bias=True, activation=act, name=name)
  return tf.keras.Sequential([
      tf.keras.layers.Rescaling(1 / 255),
      conv(9, 4, "layer_0", tfc.GDN(name="gdn_0")),
      conv(5, 2, "layer_1", tfc.GDN(name="gdn_1")),
      conv(5, 2, "layer_2", None),
  ], name="analysis")


def synthesis_transform(num_filters):
  deconv = lambda filters, k, s, name, act: tf.keras.layers.Conv2DTranspose(
      filters, k, strides=s, padding="same", use_bias=True, activation=act, name=name)
  return tf.keras.Sequential([
      deconv(num_filters, 5, 2, "layer_0", tfc.GDN(inverse=True, name="igdn_0")),
      deconv(num_filters, 5, 2, "layer_1", tfc.GDN(inverse=True, name="igdn_1")),
      deconv(3, 9, 4, "layer_2", None),
      tf.keras.layers.Rescaling(255),
  ], name="synthesis")


class BLS2017Model(CompressionModel):
  NAME = "bls2017"
  DOWNSAMPLING = 16

  def __init__(self, lmbda, num_filters=128, **kwargs):
    super().__init__(lmbda, **kwargs)
    self.num_filters = num_filters
    self.analysis = analysis_transform(num_filters)
    self.synthesis = synthesis_transform(num_filters)
    self.prior = tfc.NoisyDeepFactorized(batch_shape=(num_filters,))
    self.coding_model = self.synthesis64 = None
    self.build((None, None, None, 3))

  def forward(self, x, training):
    entropy_model = factorized(self.prior, False)
    y = self.analysis(x)
    y_tilde, bits = entropy_model(y, training=training)
    y_hat = self.synthesis_input(y_tilde, y, tf.round(y), training)
    return self.synthesis(y_hat), [bits]

  def build_coding_tables(self):
    self.coding_model = factorized(self.prior, True)
    self.synthesis64 = Float64Synthesis(self.synthesis, name="synthesis64")

  def encode(self, x):
    y = self.analysis(x)
    _, bits = self.coding_model(y, training=False)
    return [self.coding_model.compress(y)], [bits]

  def decode(self, strings, padded_shape):
    y_hat = self.coding_model.decompress(strings[:1], padded_shape // self.DOWNSAMPLING)
    return tf.cast(y_hat, tf.float64)


def add_model_flags(parser):
  parser.add_argument("--num_filters", type=int, default=128,
                      help="channels of every layer and of the latents (paper: 128; 192 at high rates)")


def build_model(args):
  return BLS2017Model(args.lmbda, num_filters=args.num_filters)


if __name__ == "__main__":
  sys.exit(cli.main(BLS2017Model.NAME, build_model, add_model_flags, fast_exit=True))
