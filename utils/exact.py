"""Bit-exact evaluation of the networks that entropy-model parameters come from.

A decoder must derive exactly the probability tables the encoder used; if one table index differs,
the range decoder desynchronises and the rest of the image is garbage. Float convolutions are not
reproducible across processes, oneDNN settings, machines or devices (summation order), so the
networks that turn decoded latents into table indexes and means (bmshj2018's hyper-synthesis,
hcae's top-down path) run here in integer arithmetic instead:

- activations are fixed point: an integer A stands for A * 2**-FRAC_BITS, clamped to
  +-2**(FRAC_BITS + ACT_BITS);
- weights are quantized per output channel to integers of at most WEIGHT_BITS bits (times 2**-s_c),
  biases to the matching scale;
- the convolutions run in float64 on those integers; every sum stays below 2**52 (checked when a
  layer is converted), so every partial sum is exact and the result does not depend on summation
  order, threads, oneDNN or device;
- rescaling is multiplication by a power of two followed by floor, also exact.

The result is the same number on every IEEE-754 machine, CPU or GPU. It differs from the float
network it was made from by about 2**-FRAC_BITS per layer. A clamp that bites changes the result on
both sides alike: it can cost rate, never sync.
"""
import numpy as np
import tensorflow as tf

WEIGHT_BITS = 14
FRAC_BITS = 10
ACT_BITS = 12
LIMIT = 2.0 ** (FRAC_BITS + ACT_BITS)  # in fixed point: +-4096 in real units
EXACT_SUM = 2.0 ** 52


def to_fixed(x):
  """Real values (integers or multiples of 2**-FRAC_BITS) -> clamped fixed point, float64."""
  return tf.clip_by_value(tf.round(tf.cast(x, tf.float64) * 2.0 ** FRAC_BITS), -LIMIT, LIMIT)


def from_fixed(a):
  return a * 2.0 ** -FRAC_BITS


class ExactConv(tf.Module):
  """Exact twin of a Keras Conv2D / Conv2DTranspose ('same' padding, ReLU or no activation).

  Maps fixed point to fixed point: floor((conv(A, K) + B) * 2**-s), then the activation and clamp.
  """

  def __init__(self, layer, name=None):
    super().__init__(name=name)
    if not isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose)):
      raise TypeError(f"cannot make {layer.name} ({type(layer).__name__}) exact")
    activation = tf.keras.activations.serialize(layer.activation)
    if activation not in ("relu", "linear"):
      raise TypeError(f"cannot make activation {activation!r} of {layer.name} exact")
    if layer.padding != "same" or tuple(layer.dilation_rate) != (1, 1):
      raise TypeError(f"{layer.name}: only undilated 'same' convolutions can be made exact")
    self.transpose = isinstance(layer, tf.keras.layers.Conv2DTranspose)
    self.relu = activation == "relu"
    self.strides = tuple(layer.strides)
    self.filters = layer.filters
    kernel = layer.kernel.numpy().astype(np.float64)
    out_axis = 2 if self.transpose else 3
    peak = np.max(np.abs(kernel), axis=tuple(a for a in range(4) if a != out_axis))
    shift = WEIGHT_BITS - np.ceil(np.log2(np.maximum(peak, 2.0 ** -30)))
    shape = [1, 1, 1, 1]
    shape[out_axis] = -1
    qkernel = np.round(kernel * 2.0 ** shift.reshape(shape))
    bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros(self.filters)
    qbias = np.round(bias * 2.0 ** (FRAC_BITS + shift))
    taps = kernel.size / kernel.shape[out_axis]
    if taps * 2.0 ** WEIGHT_BITS * LIMIT + np.max(np.abs(qbias)) >= EXACT_SUM:
      raise ValueError(f"{layer.name} is too wide to evaluate exactly ({int(taps)} taps)")
    self.kernel = tf.Variable(qkernel, trainable=False, name="kernel")
    self.bias = tf.Variable(qbias, trainable=False, name="bias")
    self.rescale = tf.Variable(2.0 ** -shift, trainable=False, name="rescale")  # powers of two

  def __call__(self, a):
    if self.transpose:
      shape = tf.shape(a)
      out_shape = tf.stack([shape[0], shape[1] * self.strides[0], shape[2] * self.strides[1],
                            self.filters])
      y = tf.nn.conv2d_transpose(a, self.kernel, out_shape, self.strides, padding="SAME")
    else:
      y = tf.nn.conv2d(a, self.kernel, self.strides, padding="SAME")
    a = tf.floor((y + self.bias) * self.rescale)
    if self.relu:
      a = tf.maximum(a, 0.0)
    return tf.clip_by_value(a, -LIMIT, LIMIT)


class Identity(tf.Module):
  """Stands in for a layer that a network skips (keeps lists of exact layers aligned)."""

  def __call__(self, a):
    return a


class IntegerConvStack(tf.Module):
  """Exact twin of a Keras stack of convolutions: real (dyadic) input -> real (dyadic) output."""

  def __init__(self, layers, name=None):
    super().__init__(name=name)
    self.convs = [ExactConv(layer, name=f"conv_{i}") for i, layer in enumerate(layers)]

  def __call__(self, x):
    a = to_fixed(x)
    for conv in self.convs:
      a = conv(a)
    return from_fixed(a)
