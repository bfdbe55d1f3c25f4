"""A trained model as a codec: export to a SavedModel, load it back without the Python class, and
turn images into files and files into images through utils.bitstream."""
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_compression  # noqa: F401  (registers the range-coding ops the SavedModels use)

from utils import bitstream
from utils.errors import BitstreamError, UserError

SAVED_MODEL = "saved_model"


class _Export(tf.Module):
  """What the SavedModel holds: the two coding functions, their variables, and metadata.

  The Keras layers themselves are not put in the object graph, only their variables: that keeps
  export and load free of Keras' layer serialization (slow, and unnecessary for coding).
  """

  def __init__(self, model, metadata):
    super().__init__(name=model.NAME)
    self.weights = model.coding_variables()
    self.metadata = tf.Variable(json.dumps(metadata), trainable=False, dtype=tf.string)
    self.compress = model.compress
    self.decompress = model.decompress


def export(model, model_dir, config):
  """Builds the range-coding tables and writes model_dir/saved_model; returns the fingerprint."""
  model.build_coding_tables()
  fingerprint = bitstream.weights_fingerprint([v.numpy() for v in model.coding_variables()])
  metadata = dict(codec=model.NAME, fingerprint=fingerprint.hex(), config=config,
                  strings=list(model.STRING_NAMES))
  path = os.path.join(model_dir, SAVED_MODEL)
  tf.saved_model.save(_Export(model, metadata), path)
  return fingerprint


_loaded = {}


def _load(path):
  """tf.saved_model.load, once per process for each version of a SavedModel (loading takes seconds)."""
  key = (os.path.abspath(path), tf.io.gfile.stat(os.path.join(path, "saved_model.pb")).mtime_nsec)
  if key not in _loaded:
    _loaded[key] = tf.saved_model.load(path)
  return _loaded[key]


class Codec:
  """An exported model, loaded for coding."""

  def __init__(self, model_dir, script_hint=None):
    path = os.path.join(model_dir, SAVED_MODEL)
    if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
      hint = f" (train one first: python {script_hint} train, or pass --model_path)" if script_hint else ""
      raise UserError(f"no trained model at {model_dir}{hint}")
    self._module = _load(path)
    meta = json.loads(self._module.metadata.numpy().decode())
    self.name = meta["codec"]
    self.fingerprint = bytes.fromhex(meta["fingerprint"])
    self.config = meta["config"]
    self.string_names = meta["strings"]

  def encode(self, image):
    """uint8 HxWx3 -> (file bytes, estimated bits per string)."""
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
      raise UserError(f"expected an RGB image, got an array of shape {image.shape}")
    height, width = image.shape[:2]
    bitstream.check_image_size(height, width)
    strings, bits = self._module.compress(tf.constant(image))
    header = bitstream.Header(self.name, self.fingerprint, height, width)
    return bitstream.pack(header, list(strings.numpy())), bits.numpy()

  def decode(self, data):
    """File bytes -> uint8 HxWx3; BitstreamError for anything that is not a file of this model."""
    header, strings = bitstream.unpack(data)
    bitstream.check_maker(header, self.name, self.fingerprint)
    try:
      image = self._module.decompress(
          tf.constant(strings, tf.string), tf.constant([header.height, header.width], tf.int32))
    except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
      message = e.message.strip().splitlines()[0] if e.message else type(e).__name__
      raise BitstreamError(f"payload cannot be decoded: {message}") from None
    return image.numpy()
