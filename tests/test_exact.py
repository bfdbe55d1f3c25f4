"""The integer twin of a hyper-synthesis is exact: it equals integer arithmetic done in Python."""
import numpy as np
import tensorflow as tf

from utils import exact


def _stack(seed=0, channels=(6, 5, 4)):
  tf.keras.utils.set_random_seed(seed)
  net = tf.keras.Sequential([
      tf.keras.layers.Conv2DTranspose(channels[0], 5, strides=2, padding="same", activation="relu"),
      tf.keras.layers.Conv2D(channels[1], 3, strides=1, padding="same", activation="relu"),
      tf.keras.layers.Conv2DTranspose(channels[2], 3, strides=1, padding="same"),
  ])
  net.build((None, None, None, 3))
  for w in net.weights:  # trained-looking magnitudes, biases included
    w.assign(tf.random.normal(w.shape, stddev=0.3))
  return net


def _same_pad(n_in, n_out, k, s):
  """(pad_before) of TensorFlow's SAME padding for a conv mapping n_out -> n_in (stride s)."""
  return max((n_in - 1) * s + k - n_out, 0) // 2


def _reference(stack, x):
  """The exact stack's arithmetic with Python integers (object arrays): no float anywhere."""
  limit = int(exact.LIMIT)
  a = np.clip(x.astype(object) * 2 ** exact.FRAC_BITS, -limit, limit)
  for conv in stack.convs:
    k = conv.kernel.numpy().astype(np.int64).astype(object)
    b = conv.bias.numpy().astype(np.int64).astype(object)
    n, h, w, _ = a.shape
    s = conv.strides[0]
    if conv.transpose:
      kh, kw, cout, _ = k.shape
      oh, ow = h * s, w * s
      ph, pw = _same_pad(h, oh, kh, s), _same_pad(w, ow, kw, s)
      y = np.zeros((n, oh, ow, cout), object)
      for i in range(h):
        for j in range(w):
          for t in range(kh):
            for u in range(kw):
              o, p = i * s + t - ph, j * s + u - pw
              if 0 <= o < oh and 0 <= p < ow:
                y[:, o, p, :] += a[:, i, j, :].dot(k[t, u].T)
    else:
      kh, kw, _, cout = k.shape
      oh, ow = -(-h // s), -(-w // s)
      ph, pw = _same_pad(oh, h, kh, s), _same_pad(ow, w, kw, s)
      y = np.zeros((n, oh, ow, cout), object)
      for o in range(oh):
        for p in range(ow):
          for t in range(kh):
            for u in range(kw):
              i, j = o * s + t - ph, p * s + u - pw
              if 0 <= i < h and 0 <= j < w:
                y[:, o, p, :] += a[:, i, j, :].dot(k[t, u])
    y = y + b
    # floor(y * 2**-shift) per channel; Python's // floors negatives like tf.floor.
    shifts = [int(round(-np.log2(r))) for r in conv.rescale.numpy()]
    out = np.empty_like(y)
    for c, sh in enumerate(shifts):
      rescale = (lambda v, sh=sh: v // 2 ** sh) if sh >= 0 else (lambda v, sh=sh: v * 2 ** -sh)
      out[..., c] = np.vectorize(rescale, otypes=[object])(y[..., c])
    a = np.clip(np.maximum(out, 0) if conv.relu else out, -limit, limit)
  return a


def test_exact_stack_equals_integer_arithmetic():
  net = _stack()
  stack = exact.IntegerConvStack(net.layers)
  rng = np.random.default_rng(1)
  x = np.round(rng.normal(0, 4, (2, 4, 5, 3)))
  got = stack(tf.constant(x)).numpy()
  want = _reference(stack, x.astype(np.int64)).astype(np.float64) / 2 ** exact.FRAC_BITS
  np.testing.assert_array_equal(got, want)


def test_exact_stack_is_close_to_the_float_network():
  net = _stack(seed=3)
  stack = exact.IntegerConvStack(net.layers)
  x = np.round(np.random.default_rng(2).normal(0, 3, (1, 6, 7, 3))).astype(np.float32)
  ref = net(x).numpy()
  got = stack(tf.constant(x)).numpy()
  assert np.max(np.abs(got - ref)) < 0.01 * max(1.0, np.max(np.abs(ref)))


def test_exact_stack_does_not_depend_on_batch_or_threads():
  net = _stack(seed=4)
  stack = exact.IntegerConvStack(net.layers)
  x = np.round(np.random.default_rng(3).normal(0, 5, (3, 9, 11, 3)))
  alone = stack(tf.constant(x[1:2])).numpy()
  batched = stack(tf.constant(x)).numpy()[1:2]
  np.testing.assert_array_equal(alone, batched)
