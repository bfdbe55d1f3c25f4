"""What every codec model shares: the rate-distortion loss, padding, Keras train/test steps, and the
fixed compress/decompress signatures that a SavedModel exports.

A model script subclasses CompressionModel and supplies only its paper's parts:
  NAME, DOWNSAMPLING, STRING_NAMES class attributes
  forward(x, training)             padded image -> (reconstruction, [bits per example, per latent])
  build_coding_tables()            after training: the entropy models with range-coding tables
  encode(x)                        padded image -> ([string tensor (1,)], [estimated bits (1,)])
  decode(strings, padded_shape)    the strings and the padded image's (h, w) -> reconstruction
"""
import tensorflow as tf


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


def float64_twin(build, source, input_channels):
  """A float64 copy of the Keras network `source`, made by `build(dtype)` and given its weights.

  Decoders run their synthesis through this twin: float64 convolutions take the same (Eigen) kernels
  whether oneDNN is on or off, so a decode is bit-identical across those settings, and on other
  machines the float64 error (~1e-12 of a pixel) makes a flipped uint8 rounding practically never happen.
  """
  twin = build("float64")
  twin.build((None, None, None, input_channels))
  twin.set_weights([w.astype("float64") for w in source.get_weights()])
  return twin


def to_uint8(x):
  return tf.saturate_cast(tf.round(x), tf.uint8)


class CompressionModel(tf.keras.Model):
  """Base of the codec models: `call` returns the loss terms for images in 0..255."""

  NAME = None
  DOWNSAMPLING = None
  STRING_NAMES = ("y",)  # what each coded string holds, in file order
  GLOBAL_CLIPNORM = None  # clip the global gradient norm in training (None: no clipping)

  def __init__(self, lmbda, **kwargs):
    super().__init__(**kwargs)
    self.lmbda = float(lmbda)
    self.loss_tracker = tf.keras.metrics.Mean(name="loss")
    self.bpp_tracker = tf.keras.metrics.Mean(name="bpp")
    self.mse_tracker = tf.keras.metrics.Mean(name="mse")

  def forward(self, x, training):
    raise NotImplementedError

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
    return [self.loss_tracker, self.bpp_tracker, self.mse_tracker]

  def _update(self, terms, x):
    weight = tf.shape(x)[0]  # per-replica batch size: an empty batch adds nothing
    self.loss_tracker.update_state(terms["loss"], sample_weight=weight)
    self.bpp_tracker.update_state(terms["bpp"], sample_weight=weight)
    self.mse_tracker.update_state(terms["mse"], sample_weight=weight)
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, x):
    with tf.GradientTape() as tape:
      terms = self(x, training=True)
      # Replicas' gradients are summed: scale each replica's mean loss to get the global mean.
      loss = terms["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
    grads = tape.gradient(loss, self.trainable_variables)
    self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
    return self._update(terms, x)

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
    """(strings, [height, width]) -> uint8 HxWx3 image."""
    padded_shape = -(-image_shape // self.DOWNSAMPLING) * self.DOWNSAMPLING
    x_hat = self.decode(strings, padded_shape)
    return to_uint8(x_hat[0, :image_shape[0], :image_shape[1], :])
