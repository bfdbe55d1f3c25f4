"""Ballé, Minnen, Singh, Hwang, Johnston, "Variational image compression with a scale hyperprior",
ICLR 2018.

Analysis: four 5x5 stride-2 convolutions with GDN between; synthesis mirrored with inverse GDN.
Hyper-analysis on |y|: 3x3 stride 1, 5x5 stride 2, 5x5 stride 2 (ReLU between); hyper-synthesis
mirrored, predicting for every latent the index of its Gaussian scale in a table of 64 scales
log-spaced from 0.11 to 256. y is coded with a zero-mean Gaussian convolved with a unit uniform, z
with a factorized prior.

Decodes never desynchronise: the scale indexes are computed by an exact integer twin of the
hyper-synthesis (utils/exact.py) on the integer z, identically in encoder and decoder, on any machine.

    python bmshj2018.py train --lambda 0.015
    python bmshj2018.py compress photo.png          # also prints the rate split between z and y
    python bmshj2018.py decompress photo.png.lic
    python bmshj2018.py evaluate
"""
import sys

import utils  # first: quiets TensorFlow start-up logs

import tensorflow as tf
tfc = utils.lazy_import("tensorflow_compression")

from utils import cli
from utils.entropy_models import coding_indexes, factorized, gaussian_conditional
from utils.exact import IntegerConvStack
from utils.model import CompressionModel, Float64Synthesis, zero_pad_to_multiple

def _conv(filters, kernel, stride, activation, transpose=False, **kwargs):
  cls = tf.keras.layers.Conv2DTranspose if transpose else tf.keras.layers.Conv2D
  return cls(filters, kernel, strides=stride, padding="same", activation=activation, **kwargs)


def analysis_transform(num_filters, latent_depth):
  return tf.keras.Sequential([
      tf.keras.layers.Rescaling(1 / 255),
      _conv(num_filters, 5, 2, tfc.GDN()),
      _conv(num_filters, 5, 2, tfc.GDN()),
      _conv(num_filters, 5, 2, tfc.GDN()),
      _conv(latent_depth, 5, 2, None),
  ], name="analysis")


def synthesis_transform(num_filters):
  return tf.keras.Sequential([
      _conv(num_filters, 5, 2, tfc.GDN(inverse=True), transpose=True),
      _conv(num_filters, 5, 2, tfc.GDN(inverse=True), transpose=True),
      _conv(num_filters, 5, 2, tfc.GDN(inverse=True), transpose=True),
      _conv(3, 5, 2, None, transpose=True),
      tf.keras.layers.Rescaling(255),
  ], name="synthesis")


def hyper_analysis_transform(num_filters):
  return tf.keras.Sequential([
      _conv(num_filters, 3, 1, "relu"),
      _conv(num_filters, 5, 2, "relu"),
      _conv(num_filters, 5, 2, None),
  ], name="hyper_analysis")


# Where the hyper-synthesis' scale indexes start: scale_fn(18) = 1.01. With Keras' zero bias every
# latent starts at index 0, the table's smallest scale (0.11), where a nonzero y costs about 18
# bits. Starting near 1, a 30-minute cpu-preset run was at +6.1 % against JPEG after 28 minutes
# where one from index 0 ended at +16.8 % after 27.4 (one run each; README, "Benchmarks").
INITIAL_SCALE_INDEX = 18.0


def hyper_synthesis_transform(num_filters, latent_depth):
  return tf.keras.Sequential([
      _conv(num_filters, 5, 2, "relu", transpose=True),
      _conv(num_filters, 5, 2, "relu", transpose=True),
      _conv(latent_depth, 3, 1, None, transpose=True,
            bias_initializer=tf.keras.initializers.Constant(INITIAL_SCALE_INDEX)),
  ], name="hyper_synthesis")


class BMSHJ2018Model(CompressionModel):
  NAME = "bmshj2018"
  DOWNSAMPLING = 16  # of the analysis; z is ceil(y / 4) (see side_information)
  STRING_NAMES = ("z", "y")  # the short side information first, the long y string last

  def __init__(self, lmbda, num_filters=128, latent_depth=192, **kwargs):
    super().__init__(lmbda, **kwargs)
    self.num_filters, self.latent_depth = num_filters, latent_depth
    self.analysis = analysis_transform(num_filters, latent_depth)
    self.synthesis = synthesis_transform(num_filters)
    self.hyper_analysis = hyper_analysis_transform(num_filters)
    self.hyper_synthesis = hyper_synthesis_transform(num_filters, latent_depth)
    self.hyperprior = tfc.NoisyDeepFactorized(batch_shape=(num_filters,))
    self.z_model = self.y_model = self.exact_hyper_synthesis = self.synthesis64 = None
    self.build((None, None, None, 3))

  def side_information(self, y):
    """z of the latents y, measured where the hyper-synthesis puts its predictions.

    |y| is zero-padded at the bottom and right to a multiple of 4 first (zero_pad_to_multiple
    says why). Unpadded, a photo whose y is not a multiple of 4 in a dimension had its scales
    predicted 1-3 latents (16-48 pixels) away from where z was measured: coffee (400x600) estimated
    at 2.53 bpp, 0.73 with the same weights padded. The decoder needs no change: z keeps its
    shape, ceil(y / 4).
    """
    return self.hyper_analysis(zero_pad_to_multiple(tf.abs(y), 4))

  def forward(self, x, training):
    y = self.analysis(x)
    z = self.side_information(y)
    z_hat, z_bits = factorized(self.hyperprior, False)(z, training=training)
    indexes = self.hyper_synthesis(z_hat)[:, :tf.shape(y)[1], :tf.shape(y)[2], :]
    y_tilde, y_bits = gaussian_conditional(False)(y, indexes, training=training)
    # The coder rounds y to integers (zero-mean model, no offsets).
    y_hat = self.synthesis_input(y_tilde, y, tf.round(y), training)
    return self.synthesis(y_hat), [z_bits, y_bits]

  def build_coding_tables(self):
    self.z_model = factorized(self.hyperprior, True)
    self.y_model = gaussian_conditional(True)
    self.exact_hyper_synthesis = IntegerConvStack(self.hyper_synthesis.layers, name="exact_hs")
    self.synthesis64 = Float64Synthesis(self.synthesis, name="synthesis64")

  def scale_indexes(self, z_hat):
    """Table index of every latent's scale, bit-exact on any machine (see utils/exact.py)."""
    return coding_indexes(self.exact_hyper_synthesis(z_hat), self.compute_dtype)

  def encode(self, x):
    y = self.analysis(x)
    z = self.side_information(y)
    z_hat = tf.round(z)  # what z_model.compress codes (integer quantization, no offsets)
    indexes = self.scale_indexes(z_hat)[:, :tf.shape(y)[1], :tf.shape(y)[2], :]
    _, z_bits = self.z_model(z, training=False)
    _, y_bits = self.y_model(y, indexes, training=False)
    return [self.z_model.compress(z), self.y_model.compress(y, indexes)], [z_bits, y_bits]

  def decode(self, strings, padded_shape):
    latent_shape = padded_shape // self.DOWNSAMPLING
    z_shape = -(-latent_shape // 4)
    z_hat = self.z_model.decompress(strings[:1], z_shape)
    indexes = self.scale_indexes(z_hat)[:, :latent_shape[0], :latent_shape[1], :]
    y_hat = self.y_model.decompress(strings[1:2], indexes)
    return tf.cast(y_hat, tf.float64)


def add_model_flags(parser):
  parser.add_argument("--num_filters", type=int, default=128,
                      help="channels of the hidden layers (paper: 128 at low rates, 192 at high rates)")
  parser.add_argument("--latent_depth", type=int, default=192,
                      help="channels of the latent y (paper: 192 at low rates, 320 at high rates)")


def build_model(args):
  return BMSHJ2018Model(args.lmbda, num_filters=args.num_filters, latent_depth=args.latent_depth)


if __name__ == "__main__":
  sys.exit(cli.main(BMSHJ2018Model.NAME, build_model, add_model_flags, fast_exit=True))
