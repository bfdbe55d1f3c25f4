"""A trained model as a codec: export to a SavedModel, load it back without the Python class, and
turn images into files and files into images through utils.bitstream."""
import contextlib
import importlib.machinery
import json
import os
import threading

import numpy as np
import tensorflow as tf

from utils import bitstream
from utils.errors import BitstreamError, DecodeTimeout, UserError

SAVED_MODEL = "saved_model"
# Inside SAVED_MODEL, a SavedModel of each half of the codec alone, with the variables its functions
# read: `compress` loads the encoder, `decompress` the decoder. A load spends most of its time
# turning every stored function into a Python graph (bmshj2018 N=M=192: 2 522 graph nodes in all,
# 1 048 in the decoder).
PARTS = {"encoder": ("compress",), "decoder": ("decode_latents", "synthesize")}


def _register_range_coding_ops():
  """Loads tensorflow-compression's op library, which the SavedModels' graphs use.

  Importing the package would do it too, but it imports tensorflow-probability with it: about a
  second of every `compress` and `decompress`. The path is spelled as the package's own `gen_ops`
  spells it, so an `import tensorflow_compression` before or after (training) loads it once.
  The package is looked up on sys.path, not through sys.modules: there the model scripts keep it
  as a lazy module (utils.lazy_import), which reading its __spec__ would import whole.
  """
  spec = importlib.machinery.PathFinder.find_spec("tensorflow_compression")
  if spec is None:
    raise ImportError("tensorflow-compression is not installed (pip install -r requirements.txt)")
  ops_dir = os.path.join(spec.submodule_search_locations[0], "python", "ops")
  tf.load_op_library(os.path.join(ops_dir, "../../cc/libtensorflow_compression.so"))


_register_range_coding_ops()


class _Export(tf.Module):
  """What the SavedModel holds: the coding functions, their variables, and metadata.

  The Keras layers themselves are not put in the object graph, only their variables: that keeps
  export and load free of Keras' layer serialization (slow, and unnecessary for coding).
  """

  def __init__(self, model, metadata):
    super().__init__(name=model.NAME)
    self.weights = model.coding_variables()
    self.metadata = tf.Variable(json.dumps(metadata), trainable=False, dtype=tf.string)
    self.compress = model.compress
    self.decompress = model.decompress
    self.decode_latents = model.decode_latents
    self.synthesize = model.synthesize_function()


class _PartExport(tf.Module):
  """Some of an _Export's functions (PARTS), with the variables they read.

  The file checks are keyed with the digest of all the model's weights (`key`), most of which one
  half never reads: the metadata records that key, and the digest of the weights held here, which a
  load recomputes (a damaged part is refused as a damaged model is).
  """

  def __init__(self, export, functions, key):
    super().__init__(name=export.name)
    for name in functions:
      setattr(self, name, getattr(export, name))
    read = {v.ref() for name in functions
            for v in getattr(self, name).get_concrete_function().variables}
    self.weights = [v for v in export.weights if v.ref() in read]
    metadata = json.loads(export.metadata.numpy().decode())
    own = bitstream.weights_digest([v.numpy() for v in self.weights])
    metadata.update(key=key.hex(), digest=own.hex())
    self.metadata = tf.Variable(json.dumps(metadata), trainable=False, dtype=tf.string)


def _coding_module(model, config):
  """Builds the model's range-coding tables; returns what a SavedModel of it holds."""
  model.build_coding_tables()
  fingerprint = bitstream.weights_fingerprint([v.numpy() for v in model.coding_variables()])
  metadata = dict(codec=model.NAME, fingerprint=fingerprint.hex(), config=config,
                  strings=list(model.STRING_NAMES))
  return _Export(model, metadata)


def export(model, model_dir, config):
  """Builds the range-coding tables and writes model_dir/saved_model; returns the fingerprint.

  The SavedModel is written beside the old one and swapped in, so a run killed while exporting
  leaves the old model or none (rerunning `train` exports again), never half of one.
  """
  module = _coding_module(model, config)
  fingerprint = bytes.fromhex(json.loads(module.metadata.numpy().decode())["fingerprint"])
  path = os.path.join(model_dir, SAVED_MODEL)
  fresh, stale = path + ".new", path + ".old"
  for leftover in (fresh, stale):
    if tf.io.gfile.exists(leftover):
      tf.io.gfile.rmtree(leftover)
  tf.saved_model.save(module, fresh)
  key = bitstream.weights_digest([v.numpy() for v in module.weights])
  for part, functions in PARTS.items():
    tf.saved_model.save(_PartExport(module, functions, key), os.path.join(fresh, part))
  if tf.io.gfile.exists(path):
    tf.io.gfile.rename(path, stale)
  tf.io.gfile.rename(fresh, path)
  if tf.io.gfile.exists(stale):
    tf.io.gfile.rmtree(stale)
  return fingerprint


_loaded = {}


def _load(path):
  """tf.saved_model.load, once per process for each version of a SavedModel (loading takes seconds)."""
  key = (os.path.abspath(path), tf.io.gfile.stat(os.path.join(path, "saved_model.pb")).mtime_nsec)
  if key not in _loaded:
    _loaded[key] = tf.saved_model.load(path)
  return _loaded[key]


def entropy_decoding_time_limit(height, width):
  """Seconds that entropy decoding (and the exact networks) may take for an image: far above what
  a real file needs (hcae at 128 filters: 0.2 s per megapixel on 2 CPU cores)."""
  return 60.0 + 10.0 * height * width / 1e6


def op_error_message(e):
  """The informative line of a TensorFlow error, whose message starts with 'Graph execution
  error:' and a node trace."""
  message = e.message or ""
  if "Sanity check failed" in message:  # tensorflow-compression's end-of-string test
    return "a range-coded string does not end where its symbols do"
  skip = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ", "Node:")
  useful = [line.strip() for line in message.splitlines()
            if line.strip() and not line.strip().startswith(skip)]
  text = (useful or [type(e).__name__])[0]
  return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _coding_errors(what, height, width):
  """Turns what coding can raise into one-line errors: memory into UserError, anything the range
  decoders or shapes reject into BitstreamError (UserError when compressing)."""
  try:
    yield
  except (tf.errors.ResourceExhaustedError, MemoryError):
    raise UserError(f"not enough memory to {what} a {height}x{width} image with this model") from None
  except tf.errors.OpError as e:
    if what == "compress":
      raise UserError(f"cannot compress the image: {op_error_message(e)}") from None
    raise BitstreamError(f"payload cannot be decoded: {op_error_message(e)}") from None


def _within(seconds, function, *args):
  """function(*args), or DecodeTimeout after `seconds`.

  A native op cannot be interrupted: on a timeout its thread is abandoned (a daemon, still
  running), and a command line program should exit at once (utils.cli does).
  """
  outcome = {}

  def run():
    try:
      outcome["value"] = function(*args)
    except BaseException as e:  # handed over to the calling thread as it is
      outcome["error"] = e

  worker = threading.Thread(target=run, name="entropy-decoding", daemon=True)
  worker.start()
  worker.join(seconds)
  if worker.is_alive():
    raise DecodeTimeout(f"decoding did not finish within {seconds:.0f} s: the file's strings are "
                        "damaged or crafted")
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


class Codec:
  """An exported model, loaded for coding."""

  @classmethod
  def from_model(cls, model, config):
    """A codec of a model in memory, without a SavedModel (benchmarks/convergence.py codes real
    files at checkpoints this way). Builds the model's coding tables: use a copy of a model that
    is still training."""
    self = cls.__new__(cls)
    self._setup(_coding_module(model, config), "the model in memory", None)
    return self

  def __init__(self, model_dir, script_hint=None, part=None):
    """part: "encoder" or "decoder" loads that half alone (faster; the other half's method is then
    refused), where the model has it (models exported before the halves were added have not)."""
    path = os.path.join(model_dir, SAVED_MODEL)
    rerun = f"python {script_hint} train with the flags that made it" if script_hint else "its train command"
    if part is not None and tf.io.gfile.exists(os.path.join(path, part, "saved_model.pb")):
      path = os.path.join(path, part)
    elif not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
      hint = f" (train one first: python {script_hint} train, or pass --model_path)" if script_hint else ""
      raise UserError(f"no trained model at {model_dir}{hint}")
    try:
      module = _load(path)
    except (OSError, ValueError, KeyError, AttributeError, RuntimeError, tf.errors.OpError) as e:
      raise UserError(f"cannot load the model at {model_dir} ({type(e).__name__}); rerun {rerun} "
                      "to export it again") from None
    self._setup(module, f"the model at {model_dir}", rerun)

  def _setup(self, module, what, rerun):
    self._module = module
    again = f"; rerun {rerun} to export it again" if rerun else ""
    try:
      meta = json.loads(module.metadata.numpy().decode())
      digest = bitstream.weights_digest([v.numpy() for v in module.weights])
      # The key of the files' checks is the digest of all the weights: a whole model recomputes
      # it, which also catches a damaged model; a half (PARTS) holds only some of them, records
      # the key, and is checked against the recorded digest of its own.
      if "key" in meta:
        self._key, intact = bytes.fromhex(meta["key"]), digest.hex() == meta["digest"]
      else:
        self._key, intact = digest, True
    except (ValueError, KeyError, AttributeError, tf.errors.OpError) as e:
      raise UserError(f"cannot load {what} ({type(e).__name__}){again}") from None
    if not intact or self._key[:bitstream.FINGERPRINT_BYTES].hex() != meta.get("fingerprint"):
      raise UserError(f"{what} is damaged (its weights do not match its fingerprint){again}")
    # SavedModels exported before the decoder was split in two decode with `decompress` whole:
    # untiled, all of it under the time limit. Rerunning their train command exports them anew.
    self._split = hasattr(module, "decode_latents") and hasattr(module, "synthesize")
    self.name = meta["codec"]
    self.fingerprint = bytes.fromhex(meta["fingerprint"])
    self.config = meta["config"]
    self.string_names = meta["strings"]

  def encode(self, image):
    """uint8 HxWx3 -> (file bytes, estimated bits per string)."""
    if not hasattr(self._module, "compress"):
      raise UserError("this codec was loaded to decode only")
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
      raise UserError(f"expected an RGB image, got an array of shape {image.shape}")
    height, width = image.shape[:2]
    bitstream.check_image_size(height, width)
    with _coding_errors("compress", height, width):
      strings, bits = self._module.compress(tf.constant(image))
    header = bitstream.Header(self.name, self.fingerprint, height, width)
    return bitstream.pack(header, list(strings.numpy()), key=self._key), bits.numpy()

  def decode(self, data, time_limit=None):
    """File bytes -> uint8 HxWx3; BitstreamError for anything that is not an intact file of this
    model. Entropy decoding gets `time_limit` seconds (default: entropy_decoding_time_limit)."""
    if not hasattr(self._module, "decompress") and not self._split:
      raise UserError("this codec was loaded to encode only")
    header, strings = bitstream.unpack(data)
    bitstream.check_maker(header, self.name, self.fingerprint)
    if len(strings) != len(self.string_names):
      raise BitstreamError(f"{self.name} file has {len(strings)} strings, expected {len(self.string_names)}")
    # Before any decoding: edited sizes or strings never reach the range decoders.
    bitstream.verify_check(header, strings, self._key)
    shape = tf.constant([header.height, header.width], tf.int32)
    if time_limit is None:
      time_limit = entropy_decoding_time_limit(header.height, header.width)
    strings = tf.constant(strings, tf.string)
    with _coding_errors("decode", header.height, header.width):
      if not self._split:
        return _within(time_limit, self._module.decompress, strings, shape).numpy()
      latents = _within(time_limit, self._module.decode_latents, strings, shape)
      image = self._module.synthesize(latents, shape)
    return image.numpy()
