"""What every codec model shares: the rate-distortion loss, padding, Keras train/test steps, and the
fixed compress/decompress signatures that a SavedModel exports.

A model script subclasses CompressionModel and supplies only its paper's parts:
  NAME, DOWNSAMPLING, STRING_NAMES class attributes
  forward(x, training)             padded image -> (reconstruction, [bits per example, per latent])
  build_coding_tables()            after training: the entropy models with range-coding tables
  encode(x)                        padded image -> ([string tensor (1,)], [estimated bits (1,)])
  decode(strings, padded_shape)    the strings and the padded image's (h, w) -> the float64 input of
                                   `synthesis64` (entropy decoding and exact networks only)
  synthesis64                      the float64 twin of the synthesis (Float64Synthesis), upsampling
                                   16x (SYNTHESIS_FACTOR)
"""
import tensorflow as tf

SYNTHESIS_FACTOR = 16
# Decoders run the synthesis in tiles of TILE x TILE latents (256 x 256 pixels), so its float64
# activations do not grow with the image: a transposed convolution's working buffer alone takes
# k*k*filters*8 bytes per input position, about 1.7 GB for a 1024 x 1024 image at 128 filters.
# The size is set by the first decode of a process, which pays for every page of memory it touches
# (page faults and zeroing; later decodes reuse the pages): at 16 latents a 768 x 512 bmshj2018
# decode at 192 filters peaks at 1.2 GB instead of 2.1 GB at 32, and its first synthesis takes
# 1.7-2.0 s instead of 3.3 s, with the same pixels. Later decodes in the process took 1.4-1.5 s
# at 16 against 1.2-1.5 s at 32: the halo's extra arithmetic (then 56 % at 16, 27 % at 32) was
# mostly paid back by buffers that fit the caches better. Since each layer computes only the part
# of its output the tile's pixels depend on (Float64Synthesis's rows/cols), the halo costs a few
# positions per layer instead of 2 latents at every layer's scale; 8, 12, 16, 24 and 48 (the
# whole photo) then took about the same time, and 16 is kept (1.0 GB peak; 8: 0.75 GB).
# An image that fits one tile is synthesized whole.
TILE = 16
# Latents of context a tile needs on each side. Transposed 'same' convolutions align their output
# grid the same way for any input size, and the syntheses here (5x5 or 9x9 kernels, strides 2 and
# 4) reach 2 latents up/left and 1 down/right of a pixel; tests/test_hardening.py checks it.
HALO = 2


def enable_determinism(seed=0):
  """TensorFlow's op determinism, and every random seed (Python, NumPy, TensorFlow) set to `seed`.

  On a CPU the coding functions are deterministic without it; on a GPU it keeps cuDNN from picking
  kernels (and summation orders) at run time, so compressing twice gives the same bytes there too,
  and training twice from the same seed gives the same weights.
  """
  tf.keras.utils.set_random_seed(seed)
  tf.config.experimental.enable_op_determinism()


def zero_pad_to_multiple(x, multiple):
  """Pads a (B, H, W, C) batch of feature maps with zeros at the bottom/right to a multiple of
  `multiple` in H and W.

  Why: a stride-2 "same" convolution centres its windows one position further on an even input
  than on an odd one, while a stride-2 transposed convolution always places its output as for an
  even input, which training crops (multiples of 64 pixels) always give. Features are padded so
  that the positions a downsampling measures are the ones the upsampling predicts for.
  """
  height, width = tf.shape(x)[1], tf.shape(x)[2]
  return tf.pad(x, [[0, 0], [0, (-height) % multiple], [0, (-width) % multiple], [0, 0]])


def pad_to_multiple(x, multiple):
  """Pads a (B, H, W, C) batch at the bottom/right by repeating its last row/column.

  Edge replication works for any size (reflection needs the pad to be smaller than the image) and
  keeps the padded area cheap to code.
  """
  height, width = tf.shape(x)[1], tf.shape(x)[2]
  pad_h = (-height) % multiple
  pad_w = (-width) % multiple
  x = tf.concat([x, tf.repeat(x[:, -1:], pad_h, axis=1)], axis=1)
  return tf.concat([x, tf.repeat(x[:, :, -1:], pad_w, axis=2)], axis=2)


class Float64Synthesis(tf.Module):
  """The float64 twin of a Keras synthesis that decoders run, written in plain TensorFlow ops.

  `source` is a Sequential of 'same' Conv2DTranspose layers (no activation, or tensorflow-
  compression's inverse GDN with its fixed alpha = epsilon = 1) and Rescaling layers. float64
  convolutions take the same (Eigen) kernels whether oneDNN is on or off, so a decode is
  bit-identical across those settings, and on other machines the float64 error (~1e-12 of a pixel)
  makes a flipped uint8 rounding practically never happen.

  The ops are the ones the Keras layers run in float64, on the same values, so the pixels are the
  same bits as those of a float64 copy of the Keras network; what differs is the exported graph.
  tfc's GDN layer branches on alpha and epsilon with tf.conds (which a SavedModel holds as about a
  hundred functions, deserialized at every load and instantiated at the first decode) and bounds
  beta and gamma through custom gradients; here the bound is the tf.maximum that custom gradient
  computes forward. The variables are the float64 copies of the source's, in its order (kernel,
  bias, beta's and gamma's reparameterizations of each layer): they enter the model's fingerprint.
  """

  def __init__(self, source, name=None):
    super().__init__(name=name)
    self.input_channels = source.input_shape[-1]
    self._steps = []  # ("conv", filters, strides, kernel, bias) | ("igdn", ...) | ("rescale", ...)
    weights = []

    def copy(variable):
      weights.append(tf.Variable(variable.numpy().astype("float64"), trainable=False))
      return weights[-1]

    for layer in source.layers:
      if isinstance(layer, tf.keras.layers.Rescaling):
        self._steps.append(("rescale", float(layer.scale), float(layer.offset)))
        continue
      if type(layer) is not tf.keras.layers.Conv2DTranspose:
        raise TypeError(f"cannot make {layer.name} ({type(layer).__name__}) float64")
      if (layer.padding != "same" or tuple(layer.dilation_rate) != (1, 1)
          or layer.output_padding is not None or not layer.use_bias):
        raise TypeError(f"{layer.name}: only undilated 'same' transposed convolutions with a bias")
      self._steps.append(("conv", layer.filters, (1,) + tuple(layer.strides) + (1,),
                          copy(layer.kernel), copy(layer.bias)))
      gdn = layer.activation
      if gdn is None or gdn is tf.keras.activations.linear:
        continue
      if (not getattr(gdn, "inverse", False) or gdn.rectify or callable(gdn.alpha_parameter)
          or callable(gdn.epsilon_parameter) or float(gdn.alpha) != 1 or float(gdn.epsilon) != 1):
        raise TypeError(f"{layer.name}: activation {getattr(gdn, 'name', gdn)!r} is not an inverse "
                        "GDN with alpha = epsilon = 1")
      self._steps.append(("igdn",) + tuple(
          (copy(p.variable), p.offset ** 2, (p.minimum + p.offset ** 2) ** .5)
          for p in (gdn.beta_parameter, gdn.gamma_parameter)))
    self.weights = weights

  @staticmethod
  def _bounded(reparam, pedestal, bound):
    return tf.math.square(tf.maximum(reparam, tf.constant(bound, tf.float64))) - pedestal

  def factor(self, axis):
    """Output pixels per latent on `axis` (1: rows, 2: columns)."""
    product = 1
    for kind, *args in self._steps:
      product *= args[1][axis] if kind == "conv" else 1
    return product

  def _input_ranges(self, size, wanted, axis):
    """For each transposed convolution, the [start, stop) of its input (on `axis`, in that layer's
    grid, from the first latent) that the output rows or columns `wanted` depend on, clipped to
    the layer's input, whose first is `size` latents. In the whole synthesis, output p of a 'same'
    convolution with kernel k and stride s is the sum over inputs j with p = s * j + t - (k - s) // 2,
    0 <= t < k: an input range that holds those j of every wanted p gives those outputs exactly,
    and beyond the input's ends there is nothing in either computation."""
    convs = [(args[2].shape[axis - 1], args[1][axis]) for kind, *args in self._steps if kind == "conv"]
    sizes = [size]
    for _, stride in convs[:-1]:
      sizes.append(sizes[-1] * stride)
    start, stop = wanted
    ranges = []
    for (k, s), n in zip(reversed(convs), reversed(sizes)):
      pad = max(k - s, 0) // 2
      start = tf.maximum(-((k - 1 - pad - start) // s), 0)  # ceil((start - k + 1 + pad) / s)
      stop = tf.minimum((stop - 1 + pad) // s + 1, n)
      ranges.append((start, stop))
    return ranges[::-1]

  def __call__(self, x, rows=None, cols=None):
    """The synthesis of (B, h, w, C) latents. `rows`, `cols`: the output's [start, stop) wanted
    (default: all of it); each layer then computes only the part of its output those depend on,
    which in a tile of the decoder is far less than the whole tile with its halo."""
    x = tf.convert_to_tensor(x, tf.float64)
    crop = rows is not None or cols is not None
    if crop:
      shape = tf.shape(x)
      rows = (0, shape[1] * self.factor(1)) if rows is None else rows
      cols = (0, shape[2] * self.factor(2)) if cols is None else cols
      ranges = list(zip(self._input_ranges(shape[1], rows, 1), self._input_ranges(shape[2], cols, 2)))
      origin = (0, 0)  # the position of x[:, 0, 0] in the current layer's grid
    for kind, *args in self._steps:
      if kind == "conv":
        filters, strides, kernel, bias = args
        if crop:
          (top, bottom), (left, right) = ranges.pop(0)
          x = x[:, top - origin[0]:bottom - origin[0], left - origin[1]:right - origin[1]]
          origin = (top * strides[1], left * strides[2])
        shape = tf.shape(x)
        out_shape = tf.stack([shape[0], shape[1] * strides[1], shape[2] * strides[2], filters])
        x = tf.nn.conv2d_transpose(x, kernel, out_shape, strides, padding="SAME")
        x = tf.nn.bias_add(x, bias)
      elif kind == "igdn":
        beta, gamma = self._bounded(*args[0]), self._bounded(*args[1])
        pool = tf.nn.convolution(tf.abs(x), tf.reshape(gamma, [1, 1] + gamma.shape.as_list()),
                                 padding="VALID")
        x = x * tf.nn.bias_add(pool, beta)
      else:
        scale, offset = args
        x = x * tf.constant(scale, tf.float64) + tf.constant(offset, tf.float64)
    if crop:
      x = x[:, rows[0] - origin[0]:rows[1] - origin[0], cols[0] - origin[1]:cols[1] - origin[1]]
    return x


def to_uint8(x):
  return tf.saturate_cast(tf.round(x), tf.uint8)


def tiled_synthesis(synthesis, latents, factor=SYNTHESIS_FACTOR, tile=TILE, halo=HALO):
  """The uint8 (H, W, 3) image `synthesis` makes of (1, h, w, C) latents, computed tile by tile.

  Each tile is synthesized from its latents with `halo` more on every side, and only its own pixels
  are computed (each layer crops its input to what they depend on), which gives the values of the
  whole synthesis (up to float summation order, ~1e-13 in float64; the same bits in the tests); the
  tiling depends only on the latents' size, so every decoder of a file computes the same tiles.
  """
  height, width = tf.shape(latents)[1], tf.shape(latents)[2]
  rows = tf.TensorArray(tf.uint8, size=0, dynamic_size=True, infer_shape=False)
  for top in tf.range(0, height, tile):
    bottom = tf.minimum(top + tile, height)
    top0 = tf.maximum(top - halo, 0)
    row = tf.TensorArray(tf.uint8, size=0, dynamic_size=True, infer_shape=False)
    for left in tf.range(0, width, tile):
      right = tf.minimum(left + tile, width)
      left0 = tf.maximum(left - halo, 0)
      x = synthesis(latents[:, top0:tf.minimum(bottom + halo, height),
                            left0:tf.minimum(right + halo, width)],
                    rows=((top - top0) * factor, (bottom - top0) * factor),
                    cols=((left - left0) * factor, (right - left0) * factor))[0]
      # A TensorArray concatenates along the first axis: the columns of a row go through a transpose.
      row = row.write(row.size(), tf.transpose(to_uint8(x), [1, 0, 2]))
    rows = rows.write(rows.size(), tf.transpose(row.concat(), [1, 0, 2]))
  return rows.concat()


class SpikeGuard(tf.keras.metrics.Metric):
  """Decides whether a training step may update the weights; its result counts the steps of this
  epoch that did not.

  A step is refused when some replica's gradient is not finite, or when its loss (the mean over all
  replicas) exceeds `factor` times the running mean of the losses of the steps taken before it. Why:
  one batch can make hcae's synthesis (three inverse GDNs, each growing its input about as its cube)
  put out ~1e14 per pixel. Clipping bounds that step's gradient, but still moves every weight by
  about the learning rate in the exploded batch's direction, and the cpu-preset sweep's hcae jobs did
  not recover from such steps in their remaining epochs (README: training recipe). A refused step
  still counts in the learning-rate schedule, but leaves the weights and Adam's moments unchanged
  (utils.training.Adam skips a variable whose gradient is not finite, and train_step makes all of a
  refused step's gradients NaN). The first `warmup` steps are only checked for finite gradients:
  the running mean starts there.

  Its variables are metric state: not part of the codec (coding_variables), not copied by a warm
  start; resets at each epoch clear only the count, so the running mean spans the whole run. Under
  tf.distribute every replica computes the same decision from the same all-reduced values.
  """

  def __init__(self, factor, decay=0.99, warmup=20, name="skipped"):
    super().__init__(name=name)
    self.factor, self.decay, self.warmup = float(factor), decay, warmup
    first = tf.VariableAggregation.ONLY_FIRST_REPLICA  # identical on every replica
    self.average = self.add_weight("average", initializer="zeros", aggregation=first)
    self.taken = self.add_weight("taken", initializer="zeros", aggregation=first)
    self.refused = self.add_weight("refused", initializer="zeros", aggregation=first)
    self.in_a_row = self.add_weight("in_a_row", initializer="zeros", aggregation=first)

  def check(self, loss, grads):
    """True when the step of this replica's `loss` (its share of the global mean) and `grads`
    should be applied; updates the running mean and the counts."""
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
    total = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.stack([tf.cast(loss, tf.float32), 1.0 - tf.cast(finite, tf.float32)]))
    loss, replicas_not_finite = total[0], total[1]
    spike = (self.taken >= self.warmup) & (loss > self.factor * self.average)
    take = tf.math.is_finite(loss) & tf.equal(replicas_not_finite, 0.0) & tf.logical_not(spike)
    average = tf.where(self.taken > 0, self.decay * self.average + (1 - self.decay) * loss, loss)
    self.average.assign(tf.where(take, average, self.average))
    self.taken.assign_add(tf.cast(take, tf.float32))
    self.refused.assign_add(1.0 - tf.cast(take, tf.float32))
    self.in_a_row.assign(tf.where(take, 0.0, self.in_a_row + 1.0))
    return take

  def update_state(self, *args, **kwargs):
    raise NotImplementedError("use check(loss, grads)")

  def result(self):
    return tf.identity(self.refused)

  def reset_state(self):
    self.refused.assign(0.0)


class CompressionModel(tf.keras.Model):
  """Base of the codec models: `call` returns the loss terms for images in 0..255."""

  NAME = None
  DOWNSAMPLING = None
  STRING_NAMES = ("y",)  # what each coded string holds, in file order
  GLOBAL_CLIPNORM = None  # clip the global gradient norm in training (None: no clipping)
  # What the synthesis sees in training (set from --quantization): "ste", the rounded latents the
  # decoder will see with the gradient passed straight through (as later tensorflow-compression
  # models do), or "noise", the papers' additive uniform noise. The rate term uses noise either way.
  quantization = "ste"
  # Training refuses a step whose loss exceeds this many times the running mean (SpikeGuard; set from
  # --spike_factor; 0: every step is applied, as Keras does).
  SPIKE_FACTOR = 10.0

  def __init__(self, lmbda, **kwargs):
    super().__init__(**kwargs)
    self.lmbda = float(lmbda)
    self.loss_tracker = tf.keras.metrics.Mean(name="loss")
    self.bpp_tracker = tf.keras.metrics.Mean(name="bpp")
    self.mse_tracker = tf.keras.metrics.Mean(name="mse")
    self.spike_guard = SpikeGuard(self.SPIKE_FACTOR)

  def forward(self, x, training):
    raise NotImplementedError

  def synthesis_input(self, noisy, latents, rounded, training):
    """The latents the synthesis gets: `noisy` (what the entropy model returned: noisy in
    training, rounded otherwise), or in training with "ste" `rounded` with the gradient of `latents`."""
    if training and self.quantization == "ste":
      return latents + tf.stop_gradient(rounded - latents)
    return noisy

  def call(self, x, training=False):
    """Rate-distortion terms for a (B, H, W, 3) batch in 0..255; any H, W."""
    x = tf.cast(x, self.compute_dtype)
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    x_hat, bits = self.forward(pad_to_multiple(x, self.DOWNSAMPLING), training)
    x_hat = x_hat[:, :height, :width, :]
    num_pixels = tf.cast(tf.shape(x)[0] * height * width, self.compute_dtype)
    # divide_no_nan: keeps an empty per-replica batch (possible under tf.distribute) finite.
    bpp = tf.math.divide_no_nan(tf.add_n([tf.reduce_sum(b) for b in bits]), num_pixels)
    mse = tf.math.divide_no_nan(tf.reduce_sum(tf.math.squared_difference(x, x_hat)), 3 * num_pixels)
    # loss = bpp + lambda * MSE, MSE on the 0..255 scale (tensorflow-compression's convention).
    return dict(loss=bpp + self.lmbda * mse, bpp=bpp, mse=mse)

  @property
  def metrics(self):
    return [self.loss_tracker, self.bpp_tracker, self.mse_tracker, self.spike_guard]

  def _update(self, terms, x, counted=True):
    # Per-replica batch size: an empty batch adds nothing; neither does a refused step.
    weight = tf.shape(x)[0] * tf.cast(counted, tf.int32)
    trackers = (self.loss_tracker, self.bpp_tracker, self.mse_tracker)
    for tracker in trackers:
      tracker.update_state(terms[tracker.name], sample_weight=weight)
    return {m.name: m.result() for m in trackers}

  def train_step(self, x):
    with tf.GradientTape() as tape:
      terms = self(x, training=True)
      # Replicas' gradients are summed: scale each replica's mean loss to get the global mean.
      loss = terms["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
    grads = tape.gradient(loss, self.trainable_variables)
    if not self.spike_guard.factor:
      self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
      return self._update(terms, x)
    take = self.spike_guard.check(loss, grads)
    grads = [None if g is None else tf.where(take, g, tf.constant(float("nan"), g.dtype)) for g in grads]
    self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
    # A loss that is not finite still reaches the epoch mean, where it stops the run (training.train).
    logs = self._update(terms, x, counted=take | tf.logical_not(tf.math.is_finite(terms["loss"])))
    logs[self.spike_guard.name] = self.spike_guard.result()
    return logs

  def test_step(self, x):
    # training=False: hard quantization and the rate of the quantized latents.
    return self._update(self(x, training=False), x)

  def predict_step(self, x):
    raise NotImplementedError("use compress/decompress")

  def coding_variables(self):
    """The variables that define the codec (weights, prior, coding tables), without metric state."""
    metric_vars = {v.ref() for m in self.metrics for v in m.variables}
    return [v for v in self.variables if v.ref() not in metric_vars]

  # --- coding: fixed signatures, exported to the SavedModel -----------------------------------

  def build_coding_tables(self):
    raise NotImplementedError

  def encode(self, x):
    raise NotImplementedError

  def decode(self, strings, padded_shape):
    raise NotImplementedError

  @tf.function(input_signature=[tf.TensorSpec((None, None, 3), tf.uint8)])
  def compress(self, image):
    """uint8 HxWx3 image -> (strings, estimated bits of each string)."""
    x = pad_to_multiple(tf.cast(image, self.compute_dtype)[None], self.DOWNSAMPLING)
    strings, bits = self.encode(x)
    return (tf.concat([tf.reshape(s, [1]) for s in strings], 0),
            tf.concat([tf.reshape(tf.cast(b, tf.float32), [1]) for b in bits], 0))

  @tf.function(input_signature=[tf.TensorSpec((None,), tf.string), tf.TensorSpec((2,), tf.int32)])
  def decompress(self, strings, image_shape):
    """(strings, [height, width]) -> uint8 HxWx3 image (utils.codec checks the file first, then
    runs the two halves below, the first under a time limit)."""
    return self.synthesize(self.decode_latents(strings, image_shape), image_shape)

  @tf.function(input_signature=[tf.TensorSpec((None,), tf.string), tf.TensorSpec((2,), tf.int32)])
  def decode_latents(self, strings, image_shape):
    """(strings, [height, width]) -> the float64 latents that `synthesize` turns into the image."""
    padded_shape = -(-image_shape // self.DOWNSAMPLING) * self.DOWNSAMPLING
    return self.decode(strings, padded_shape)

  def synthesize(self, latents, image_shape):
    """(latents, [height, width]) -> uint8 HxWx3 image, in tiles of bounded memory."""
    return tiled_synthesis(self.synthesis64, latents)[:image_shape[0], :image_shape[1], :]

  def synthesize_function(self):
    """`synthesize` as a tf.function with a fixed signature, for the SavedModel."""
    channels = self.synthesis64.input_channels
    return tf.function(self.synthesize, input_signature=[
        tf.TensorSpec((1, None, None, channels), tf.float64), tf.TensorSpec((2,), tf.int32)])
