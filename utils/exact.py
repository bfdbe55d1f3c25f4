"""Bit-exact evaluation of the small networks that entropy-model parameters come from.

A decoder must derive exactly the probability tables the encoder used; if one table index differs,
the range decoder desynchronises and the rest of the image is garbage. Float convolutions are not
reproducible across processes, oneDNN settings, machines or devices (summation order), so the
networks that compute table indexes (bmshj2018's hyper-synthesis, hcae's priors) run here in
integer arithmetic instead:

- weights are quantized per output channel to integers of at most WEIGHT_BITS bits (times 2**-s_c),
  activations to fixed point with FRAC_BITS fractional bits, biases to the matching scale;
- the convolutions run in float64 on integer values whose sums stay below 2**53, so every partial
  sum is exact and the result does not depend on summation order or device;
- rescaling is multiplication by a power of two followed by floor, also exact.

The result is the same dyadic number on every IEEE-754 machine, CPU or GPU. It differs from the
float network it was made from by about 2**-FRAC_BITS, far below what moves a table index.
"""
import numpy as np
import tensorflow as tf

WEIGHT_BITS = 14
FRAC_BITS = 10
# Activations are clamped to +-2**(FRAC_BITS + ACT_BITS) in fixed point (+-1024 in real units) and
# inputs to +-2**INPUT_BITS, which bounds every sum; a clamp that bites changes the result on both
# sides alike, so it costs rate at worst, never sync.
ACT_BITS = 10
INPUT_BITS = 12
EXACT_LIMIT = 2.0 ** 52


class IntegerConvStack(tf.Module):
  """Exact twin of a Keras stack of Conv2D / Conv2DTranspose layers with ReLU or no activation."""

  def __init__(self, layers, name=None):
    super().__init__(name=name)
    self._specs = []
    kernels, biases = [], []
    frac_in = 0  # the input (quantized latents) is integer
    for i, layer in enumerate(layers):
      if not isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose)):
        raise TypeError(f"cannot make {layer.name} ({type(layer).__name__}) exact")
      activation = tf.keras.activations.serialize(layer.activation)
      if activation not in ("relu", "linear"):
        raise TypeError(f"cannot make activation {activation!r} of {layer.name} exact")
      if layer.padding != "same":
        raise TypeError(f"{layer.name}: only 'same' padding is supported")
      transpose = isinstance(layer, tf.keras.layers.Conv2DTranspose)
      kernel = layer.kernel.numpy().astype(np.float64)
      out_axis = 2 if transpose else 3
      peak = np.max(np.abs(kernel), axis=tuple(a for a in range(4) if a != out_axis))
      shift = WEIGHT_BITS - np.ceil(np.log2(np.maximum(peak, 2.0 ** -30)))
      shape = [1, 1, 1, 1]
      shape[out_axis] = -1
      qkernel = np.round(kernel * 2.0 ** shift.reshape(shape))
      bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros(len(shift))
      qbias = np.round(bias * 2.0 ** (frac_in + shift))
      in_limit = 2.0 ** (INPUT_BITS if i == 0 else FRAC_BITS + ACT_BITS)
      taps = np.prod(kernel.shape) / kernel.shape[out_axis]
      if taps * 2.0 ** WEIGHT_BITS * in_limit + np.max(np.abs(qbias)) >= EXACT_LIMIT:
        raise ValueError(f"{layer.name} is too wide to evaluate exactly ({int(taps)} taps)")
      kernels.append(tf.Variable(qkernel, trainable=False, name=f"kernel_{i}"))
      biases.append(tf.Variable(qbias, trainable=False, name=f"bias_{i}"))
      self._specs.append(dict(transpose=transpose, strides=layer.strides, relu=activation == "relu",
                              frac_in=frac_in, shift=shift, in_limit=in_limit,
                              filters=layer.filters))
      frac_in = FRAC_BITS
    self.kernels, self.biases = kernels, biases

  def __call__(self, x):
    """x: integer-valued tensor (any float dtype). Returns the exact float64 output."""
    a = tf.cast(x, tf.float64)
    last = len(self._specs) - 1
    for i, (spec, kernel, bias) in enumerate(zip(self._specs, self.kernels, self.biases)):
      a = tf.clip_by_value(a, -spec["in_limit"], spec["in_limit"])
      if spec["transpose"]:
        shape = tf.shape(a)
        out_shape = tf.stack([shape[0], shape[1] * spec["strides"][0], shape[2] * spec["strides"][1],
                              spec["filters"]])
        y = tf.nn.conv2d_transpose(a, kernel, out_shape, spec["strides"], padding="SAME")
      else:
        y = tf.nn.conv2d(a, kernel, spec["strides"], padding="SAME")
      y += bias
      scale = 2.0 ** -(spec["frac_in"] + spec["shift"])  # to real units
      if i == last:
        return y * scale
      a = tf.floor(y * (scale * 2.0 ** FRAC_BITS))
      if spec["relu"]:
        a = tf.maximum(a, 0.0)
