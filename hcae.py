"""HCAE: the hierarchical compressive autoencoder of the seed report *Hierarchical Modeling for Image
Compression*: the scale hyperprior extended to a deep hierarchy of latents, in the style of
Kingma et al. 2016 (IAF-VAE / ResNet VAE), with bidirectional inference.

- Bottom-up (encoder only, deterministic): a GDN stem down to 1/16 of the image (four 5x5 stride-2
  layers; with --bls2017_transforms a 9x9 stride-4 layer and two 5x5 ones), then one ResNet
  block per level, halving the resolution every two levels (6 levels: 1/16, 1/16, 1/32, 1/32, 1/64,
  1/64).
- Top-down (encoder and decoder): the top level is a hyperprior with a factorized density. Below it,
  every level's prior is a Gaussian (convolved with a unit uniform) whose mean and scale come from the
  top-down state; its approximate posterior is conditioned on both the bottom-up features and that
  state; the state then absorbs the level's latents through a ResNet block. The synthesis turns the
  final state into the image.
- Training adds uniform noise to the latents; coding quantizes them around the prior mean.

Real compression codes every level into one file, top level first. The encoder runs the same
top-down computation on the quantized latents that the decoder runs, and that computation (prior
means and scale indexes) is an exact integer twin of the trained layers (utils/exact.py), so both
sides derive bit-identical priors on any machine.

    python hcae.py train --lambda 0.015
    python hcae.py compress photo.png       # real, estimated and per-level rate
    python hcae.py decompress photo.png.lic
    python hcae.py evaluate
"""
import sys

import utils  # first: quiets TensorFlow start-up logs

import tensorflow as tf
tfc = utils.lazy_import("tensorflow_compression")

from utils import cli, exact
from utils.entropy_models import coding_indexes, factorized, gaussian_conditional
from utils.errors import UserError
from utils.model import CompressionModel, Float64Synthesis, zero_pad_to_multiple


def _conv(filters, kernel, stride=1, activation=None, transpose=False, name=None):
  cls = tf.keras.layers.Conv2DTranspose if transpose else tf.keras.layers.Conv2D
  return cls(filters, kernel, strides=stride, padding="same", activation=activation, name=name)


class ResBlock(tf.keras.layers.Layer):
  """x + conv(relu(conv(x))): the ResNet block of both passes (3x3 convolutions)."""

  def __init__(self, filters, **kwargs):
    super().__init__(**kwargs)
    self.conv_a = _conv(filters, 3, activation="relu", name="a")
    self.conv_b = _conv(filters, 3, name="b")

  def call(self, x):
    return x + self.conv_b(self.conv_a(x))


class ExactResBlock(tf.Module):
  """Exact twin of ResBlock on fixed-point tensors (sums of fixed-point integers are exact)."""

  def __init__(self, block, name=None):
    super().__init__(name=name)
    self.conv_a, self.conv_b = exact.ExactConv(block.conv_a), exact.ExactConv(block.conv_b)

  def __call__(self, a):
    return tf.clip_by_value(a + self.conv_b(self.conv_a(a)), -exact.LIMIT, exact.LIMIT)


def stem(num_filters, bls2017_layout=False):
  """GDN analysis down to 1/16: four 5x5 stride-2 layers (bmshj2018's), or bls2017's 9x9 stride-4
  layer followed by two 5x5 stride-2 ones, which never holds a 1/2-resolution map."""
  outer = ([_conv(num_filters, 9, 4, tfc.GDN())] if bls2017_layout else
           [_conv(num_filters, 5, 2, tfc.GDN()), _conv(num_filters, 5, 2, tfc.GDN())])
  return tf.keras.Sequential([
      tf.keras.layers.Rescaling(1 / 255),
      *outer,
      _conv(num_filters, 5, 2, tfc.GDN()),
      _conv(num_filters, 5, 2),
  ], name="stem")


def synthesis_transform(num_filters, bls2017_layout=False):
  """The stem's mirror, inverse GDN."""
  outer = ([_conv(3, 9, 4, None, True)] if bls2017_layout else
           [_conv(num_filters, 5, 2, tfc.GDN(inverse=True), True), _conv(3, 5, 2, None, True)])
  return tf.keras.Sequential([
      _conv(num_filters, 5, 2, tfc.GDN(inverse=True), True),
      _conv(num_filters, 5, 2, tfc.GDN(inverse=True), True),
      *outer,
      tf.keras.layers.Rescaling(255),
  ], name="synthesis")


def level_strides(levels):
  """Downsampling of each level's latents relative to the image, finest level first."""
  return [16 * 2 ** (level // 2) for level in range(levels)]


class HCAEModel(CompressionModel):
  NAME = "hcae"
  # Clipping the global gradient norm keeps the deep top-down path from diverging at high lambdas,
  # where lambda * MSE dominates the loss and single batches can produce gradient spikes.
  GLOBAL_CLIPNORM = 1.0

  def __init__(self, lmbda, levels=6, num_filters=128, latent_channels=(64,),
               bls2017_transforms=False, **kwargs):
    super().__init__(lmbda, **kwargs)
    if levels < 2:
      raise UserError("--levels must be at least 2 (a top hyperprior and one level below it)")
    channels = list(latent_channels)
    if len(channels) == 1:
      channels *= levels
    if len(channels) != levels:
      raise UserError(f"--latent_channels needs 1 or {levels} values, not {len(channels)}")
    self.levels, self.num_filters, self.channels = levels, num_filters, channels
    self.strides = level_strides(levels)
    # Images are padded to the finest level's stride only; the coarser levels line up inside the
    # model (_features, _level_shapes), so a photo is not coded at up to 63 extra rows and columns.
    self.DOWNSAMPLING = self.strides[0]
    # Strings in file order: the top level first, the finest (longest) last.
    self.STRING_NAMES = tuple(f"z{level + 1}" for level in reversed(range(levels)))
    n = num_filters
    self.stem = stem(n, bls2017_transforms)
    self.bottom_up = [self._bottom_up_block(level) for level in range(levels)]
    top = levels - 1
    self.top_posterior = _conv(channels[top], 3, name="top_posterior")
    self.top_input = _conv(n, 3, name="top_input")
    self.hyperprior = tfc.NoisyDeepFactorized(batch_shape=(channels[top],))
    # Top-down modules of the levels below the top, indexed by level (0 = finest).
    self.upsample, self.td_block, self.prior_net, self.posterior_net, self.merge = [], [], [], [], []
    for level in range(top):
      self.upsample.append(
          _conv(n, 5, 2, "relu", transpose=True, name=f"up_{level}")
          if self.strides[level] != self.strides[level + 1]
          else tf.keras.layers.Identity(name=f"same_resolution_{level}"))
      self.td_block.append(ResBlock(n, name=f"td_block_{level}"))
      self.prior_net.append(_conv(2 * channels[level], 3, name=f"prior_{level}"))
      self.posterior_net.append(_conv(channels[level], 3, name=f"posterior_{level}"))
      self.merge.append(_conv(n, 3, name=f"merge_{level}"))
    self.out_block = ResBlock(n, name="out_block")
    self.synthesis = synthesis_transform(n, bls2017_transforms)
    self.top_model = self.level_model = self.exact = self.synthesis64 = None
    self.build((None, None, None, 3))

  def _bottom_up_block(self, level):
    layers = []
    if self._halves(level):
      layers.append(_conv(self.num_filters, 5, 2, "relu"))
    layers.append(ResBlock(self.num_filters))
    return tf.keras.Sequential(layers, name=f"bottom_up_{level}")

  def _halves(self, level):
    return level > 0 and self.strides[level] != self.strides[level - 1]

  def _level_shapes(self, padded_shape):
    """(height, width) of each level's latents, finest first, for a padded image: a level that
    halves the resolution has ceil(half) of the one below it."""
    shape = padded_shape // self.strides[0]
    shapes = []
    for level in range(self.levels):
      if self._halves(level):
        shape = -(-shape // 2)
      shapes.append(shape)
    return shapes

  def _features(self, x):
    d = self.stem(x)
    features = []
    for level, block in enumerate(self.bottom_up):
      if self._halves(level):
        # Even maps, so the stride-2 convolution measures where the top-down upsampling of this
        # level predicts (zero_pad_to_multiple says why); training crops are even already.
        d = zero_pad_to_multiple(d, 2)
      d = block(d)
      features.append(d)
    return features

  def _prior(self, level, state):
    """(mean, raw scale index) of a level's latents from the top-down state."""
    params = self.prior_net[level](state)
    return tf.split(params, 2, axis=-1)

  def forward(self, x, training):
    features = self._features(x)
    shapes = self._level_shapes(tf.shape(x)[1:3])
    top = self.levels - 1
    z = self.top_posterior(features[top])
    z_hat, top_bits = factorized(self.hyperprior, False)(z, training=training)
    z_hat = self.synthesis_input(z_hat, z, tf.round(z), training)
    state = self.top_input(z_hat)
    bits = [top_bits]
    gaussian = gaussian_conditional(False)
    for level in reversed(range(top)):
      up = self.upsample[level](state)[:, :shapes[level][0], :shapes[level][1]]
      state = self.td_block[level](up)
      mean, scale_index = self._prior(level, state)
      y = self.posterior_net[level](tf.concat([features[level], state], -1))
      residual, level_bits = gaussian(y - mean, scale_index, training=training)
      # The coder codes round(y - mean): that, not the noisy residual, is what decoding builds on.
      residual = self.synthesis_input(residual, y - mean, tf.round(y - mean), training)
      state = state + self.merge[level](mean + residual)
      bits.append(level_bits)
    return self.synthesis(self.out_block(state)), bits

  # --- coding ----------------------------------------------------------------------------------

  def build_coding_tables(self):
    self.top_model = factorized(self.hyperprior, True)
    self.level_model = gaussian_conditional(True)
    ex = tf.Module(name="exact")
    ex.top_input = exact.ExactConv(self.top_input)
    ex.upsample = [exact.ExactConv(u) if isinstance(u, tf.keras.layers.Conv2DTranspose)
                   else exact.Identity() for u in self.upsample]
    ex.td_block = [ExactResBlock(b) for b in self.td_block]
    ex.prior_net = [exact.ExactConv(p) for p in self.prior_net]
    ex.merge = [exact.ExactConv(m) for m in self.merge]
    ex.out_block = ExactResBlock(self.out_block)
    # Part of the weights' digest, and so of the files' fingerprint: files of exports made when
    # images were padded to 64 (before 2026-12-06) are refused by the exports since, which would
    # decode them at other latent shapes, instead of being decoded into a wrong picture.
    ex.image_padding = tf.Variable(self.DOWNSAMPLING, trainable=False, name="image_padding")
    self.exact = ex
    self.synthesis64 = Float64Synthesis(self.synthesis, name="synthesis64")

  def _exact_prior(self, level, state):
    """Fixed-point state -> (mean as a real dyadic number, integer table indexes), bit-exact."""
    mean, scale_index = tf.split(self.exact.prior_net[level](state), 2, axis=-1)
    return exact.from_fixed(mean), coding_indexes(exact.from_fixed(scale_index))

  def _exact_step(self, level, state, shape):
    """The state of the level above -> this level's, `shape` (the upsampled state cropped)."""
    return self.exact.td_block[level](self.exact.upsample[level](state)[:, :shape[0], :shape[1]])

  def _exact_absorb(self, level, state, y_hat):
    return tf.clip_by_value(state + self.exact.merge[level](exact.to_fixed(y_hat)),
                            -exact.LIMIT, exact.LIMIT)

  def _synthesis_input(self, state):
    return exact.from_fixed(self.exact.out_block(state))

  def encode(self, x):
    features = self._features(x)
    shapes = self._level_shapes(tf.shape(x)[1:3])
    top = self.levels - 1
    y_top = self.top_posterior(features[top])
    strings = [self.top_model.compress(y_top)]
    bits = [self.top_model(y_top, training=False)[1]]
    state = self.exact.top_input(exact.to_fixed(tf.round(y_top)))
    for level in reversed(range(top)):
      state = self._exact_step(level, state, shapes[level])
      mean, indexes = self._exact_prior(level, state)
      y = self.posterior_net[level](tf.concat([features[level], tf.cast(
          exact.from_fixed(state), self.compute_dtype)], -1))
      residual = y - tf.cast(mean, self.compute_dtype)
      strings.append(self.level_model.compress(residual, indexes))
      bits.append(self.level_model(residual, indexes, training=False)[1])
      # What the decoder will have: the integer symbols plus the exact mean.
      state = self._exact_absorb(level, state, mean + tf.cast(tf.round(residual), tf.float64))
    return strings, bits

  def decode(self, strings, padded_shape):
    top = self.levels - 1
    shapes = self._level_shapes(padded_shape)
    z_hat = self.top_model.decompress(strings[:1], shapes[top])
    state = self.exact.top_input(exact.to_fixed(z_hat))
    for i, level in enumerate(reversed(range(top))):
      state = self._exact_step(level, state, shapes[level])
      mean, indexes = self._exact_prior(level, state)
      symbols = self.level_model.decompress(strings[i + 1:i + 2], indexes)
      state = self._exact_absorb(level, state, mean + tf.cast(symbols, tf.float64))
    return self._synthesis_input(state)


def _channels(text):
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    raise ValueError(f"not a comma-separated list of integers: {text!r}") from None
  if not values or min(values) <= 0:
    raise ValueError(f"channels must be positive: {text!r}")
  return values


def add_model_flags(parser):
  parser.add_argument("--levels", type=int, default=6, help="levels of latents (top = hyperprior)")
  parser.add_argument("--num_filters", type=int, default=128,
                      help="channels of the transforms and of the top-down state")
  parser.add_argument("--latent_channels", type=_channels, default=[64],
                      help="latent channels per level, finest first: one value for all levels or "
                      "one per level, comma-separated (e.g. 96,64,64,32,32,32)")
  parser.add_argument("--bls2017_transforms", action="store_true",
                      help="stem and synthesis shaped as bls2017's (a 9x9 stride-4 layer, then two 5x5 "
                      "stride-2 layers) instead of four 5x5 stride-2 layers each way: no map at half "
                      "the image's resolution, a third of the operations per pixel in these two, a training step about 45 %% "
                      "shorter on a CPU (the cpu preset)")


def build_model(args):
  return HCAEModel(args.lmbda, levels=args.levels, num_filters=args.num_filters,
                   latent_channels=args.latent_channels,
                   bls2017_transforms=args.bls2017_transforms)


if __name__ == "__main__":
  sys.exit(cli.main(HCAEModel.NAME, build_model, add_model_flags, fast_exit=True))
