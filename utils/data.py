"""Image sources -> tf.data pipelines: random training crops and whole evaluation images.

Sources:
  builtin  the natural colour photographs that ship inside scikit-image and matplotlib (default),
           split once and for all into train and eval images, so everything runs offline;
  folder   any glob of JPEG/PNG files (COCO's train2017/*.jpg, Kodak, your own photos);
  coco     tensorflow-datasets' coco/2017 under --data_dir.
"""
import io
import logging
import os
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

from utils import bitstream
from utils.errors import UserError
from utils.files import read_bytes, write_bytes

log = logging.getLogger("utils.data")

SOURCES = ("builtin", "folder", "coco")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# What the training pipeline's decoder (tf.io.decode_image) reads; other formats are evaluated only.
TRAIN_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

# The colour photographs in skimage/data and matplotlib's sample data. Grayscale ones (camera, moon,
# coins, ...) and synthetic ones (chessboard, logo, ...) are left out: they would teach a colour codec
# little and skew its rate. The eval photos are PNGs: a photo that is already a JPEG (grace_hopper is
# one, saved at quality 80) hands JPEG-like codecs an unearned gain when re-coded on its own 8x8 grid.
# The near-twin motorcycle pair stays together in train so no eval image has a twin in training.
BUILTIN_TRAIN = ("grace_hopper", "hubble_deep_field", "ihc", "motorcycle_left", "motorcycle_right",
                 "retina", "rocket")
BUILTIN_EVAL = ("astronaut", "chelsea", "coffee")


def _builtin_files():
  import matplotlib
  import skimage
  skdir = os.path.join(os.path.dirname(skimage.__file__), "data")
  mpldir = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
  files = {}
  for name in os.listdir(skdir):
    stem, ext = os.path.splitext(name)
    if ext in (".png", ".jpg"):
      files[stem] = os.path.join(skdir, name)
  files["grace_hopper"] = os.path.join(mpldir, "grace_hopper.jpg")
  return files


def builtin_paths(split):
  """Paths of the built-in train or eval photographs."""
  names = {"train": BUILTIN_TRAIN, "eval": BUILTIN_EVAL}[split]
  files = _builtin_files()
  missing = [n for n in names if not os.path.exists(files.get(n, ""))]
  if missing:
    raise UserError(f"built-in images missing from the installed packages: {', '.join(missing)} "
                    "(reinstall scikit-image and matplotlib from requirements.txt)")
  return [files[n] for n in names]


def glob_paths(pattern):
  """Image files matching a glob (any tf.io.gfile file system), sorted."""
  paths = sorted(p for p in tf.io.gfile.glob(pattern)
                 if p.lower().endswith(IMAGE_EXTENSIONS) and not tf.io.gfile.isdir(p))
  if not paths:
    raise UserError(f"no images match {pattern!r}")
  return paths


def image_size(path):
  """(height, width) from the file header, without decoding the pixels."""
  with tf.io.gfile.GFile(path, "rb") as f:
    with Image.open(f) as im:
      return im.height, im.width


ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path, max_pixels=bitstream.MAX_PIXELS):
  """Decodes any Pillow-readable image to uint8 HxWx3 RGB.

  EXIF orientation is applied; 16-bit grayscale is scaled to 8 bits (16-bit colour keeps the high
  byte, as Pillow reads it); palette, grayscale and CMYK images are converted; an alpha channel is
  dropped with a warning. A directory, a file that is not an image, and an image of more than
  `max_pixels` pixels are refused with a UserError before any pixel is decoded.
  """
  # In memory: Pillow probes formats with reads past the end, which a GFile turns into errors.
  encoded = read_bytes(path)
  if not encoded:
    raise UserError(f"cannot read image {path}: the file is empty")
  try:
    with warnings.catch_warnings():
      # The size limit below replaces Pillow's decompression-bomb warning.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(encoded)) as im:
        _check_pixels(path, im.width, im.height, max_pixels)
        im.load()
        return _to_rgb(_upright(im, path), path)
  except UserError:
    raise
  except UnidentifiedImageError:
    raise UserError(f"cannot read image {path}: not an image in a format Pillow reads") from None
  except Image.DecompressionBombError:
    raise UserError(f"cannot read image {path}: it has more than {2 * Image.MAX_IMAGE_PIXELS} "
                    f"pixels; images of at most {max_pixels} pixels are coded") from None
  except Exception as e:  # noqa: BLE001  Pillow's decoders raise many types on damaged files
    raise UserError(f"cannot read image {path}: {_reason(e)}") from None


def _check_pixels(path, width, height, max_pixels):
  if width * height > max_pixels or max(width, height) > bitstream.MAX_SIDE:
    raise UserError(f"{path} is {width}x{height} pixels; images of at most {max_pixels} pixels "
                    f"({bitstream.MAX_SIDE} a side) are coded: crop or downscale it")


def _upright(im, path):
  """The image turned as its EXIF orientation says; unreadable EXIF data is ignored with a warning."""
  try:
    return ImageOps.exif_transpose(im)
  except Exception as e:  # noqa: BLE001  any damage in the EXIF block
    log.warning("%s: EXIF orientation unreadable (%s); the image is coded as stored", path, _reason(e))
    return im


def _to_rgb(im, path):
  if im.mode in SIXTEEN_BIT_MODES:
    # Converting to RGB would clip values above 255 instead of scaling them.
    samples = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
    gray = ((samples * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
  if im.mode in ALPHA_MODES or "transparency" in im.info:
    log.warning("%s: the alpha channel is dropped (transparent areas are coded with the colour they "
                "hold)", path)
  return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _reason(e):
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def write_png(path, image):
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  write_bytes(path, buffer.getvalue())


def _readable_size(path):
  """(height, width), or None for a file that is not an image the training pipeline can decode."""
  if not path.lower().endswith(TRAIN_EXTENSIONS):
    return None
  try:
    return image_size(path)
  except Exception:  # noqa: BLE001  Pillow raises many types on damaged files
    return None


def image_sizes(paths):
  """{path: (height, width), or None for a file that cannot be decoded for training}: for a caller
  that crops the same files at two sizes, so their headers are read once (a COCO folder has 118 287)."""
  return {p: _readable_size(p) for p in paths}


def keep_large_enough(sizes, patch_size):
  """Drops images smaller than the patch in either side (and files that cannot be decoded for
  training), logging how many were dropped. `sizes`: image_sizes() of the candidate files."""
  paths, sizes = list(sizes), list(sizes.values())
  unreadable = sizes.count(None)
  if unreadable:
    log.warning("skipped %d of %d files that are not PNG, JPEG, BMP or GIF images, or are damaged",
                unreadable, len(paths))
  kept = [p for p, size in zip(paths, sizes) if size and min(size) >= patch_size]
  if len(kept) < len(paths) - unreadable:
    log.warning("skipped %d of %d images smaller than the %d-pixel patch",
                len(paths) - unreadable - len(kept), len(paths), patch_size)
  if not kept:
    raise UserError(f"no training image is at least {patch_size}x{patch_size} pixels; "
                    "use a smaller --patch_size")
  return kept


def _decode(path):
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _coco_images(split, data_dir):
  import tensorflow_datasets as tfds
  try:
    ds = tfds.load("coco/2017", split=split, data_dir=data_dir, download=False, shuffle_files=True)
  except (tfds.core.DatasetNotFoundError, AssertionError, FileNotFoundError):
    where = data_dir or "~/tensorflow_datasets"
    raise UserError(
        f"COCO 2017 is not prepared under {where}, and it is not downloaded automatically. "
        "Either build it where there is a network (`tfds build coco/2017 --data_dir DIR`, then copy DIR "
        "here and pass --data_dir DIR), or unpack train2017.zip and use "
        "`--dataset folder --train_glob 'train2017/*.jpg'`") from None
  return ds.map(lambda ex: ex["image"], num_parallel_calls=tf.data.AUTOTUNE)


def train_paths(dataset, train_glob=None):
  if dataset == "builtin":
    return builtin_paths("train")
  if dataset == "folder":
    if not train_glob:
      raise UserError("--dataset folder needs --train_glob, e.g. --train_glob 'train2017/*.jpg'")
    return glob_paths(train_glob)
  raise UserError(f"no file list for dataset {dataset!r}")


def train_dataset(dataset="builtin", patch_size=256, batch_size=8, train_glob=None, data_dir=None,
                  seed=None, sizes=None):
  """Endless batches of random patch_size crops (randomly flipped), float32 in 0..255. `sizes`:
  image_sizes(train_paths(dataset, train_glob)), when the caller has read them (not for coco): its
  files are cropped, not listed again."""
  if dataset not in SOURCES:
    raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(SOURCES)}")
  if dataset == "coco":
    images = _coco_images("train", data_dir)
    images = images.filter(
        lambda im: tf.reduce_all(tf.shape(im)[:2] >= patch_size)).repeat()
    images = images.shuffle(256, seed=seed)
  else:
    if sizes is None:
      sizes = image_sizes(train_paths(dataset, train_glob))
    paths = keep_large_enough(sizes, patch_size)
    files = tf.data.Dataset.from_tensor_slices(paths)
    if dataset == "builtin":
      # A handful of photos: decode them once, then crop from memory forever.
      images = files.map(_decode).cache().repeat()
    else:
      images = files.repeat().shuffle(min(len(paths), 10000), seed=seed).map(
          _decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
      # A file damaged past its header would otherwise stop a long run at a random step.
      images = images.apply(tf.data.experimental.ignore_errors(log_warning=True))

  def crop(image):
    patch = tf.image.random_crop(image, (patch_size, patch_size, 3), seed=seed)
    patch = tf.image.random_flip_left_right(patch, seed=seed)
    return tf.cast(patch, tf.float32)

  ds = images.map(crop, num_parallel_calls=tf.data.AUTOTUNE)
  if dataset == "builtin":
    # Several crops per cached image are cheap; shuffle so a batch mixes photos.
    ds = ds.shuffle(64, seed=seed)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  # tf.data's autotuning thread sleeps ever longer between its optimisations (tens of seconds
  # after a minute of training), and deleting the iterator at the end of model.fit waits for it
  # to wake: a 2-epoch warm job of the cpu preset's sweep sat idle 23-30 s after its last step.
  # Without it, AUTOTUNE means one parallel call per core and a prefetch buffer that grows while
  # the model waits: steps were as fast (README, "Experiments").
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def eval_paths(dataset="builtin", eval_glob=None):
  """The evaluation images: the built-in eval split unless a glob is given."""
  if eval_glob:
    return glob_paths(eval_glob)
  if dataset in ("builtin", "coco", "folder"):
    return builtin_paths("eval")
  raise UserError(f"unknown dataset {dataset!r}")


def eval_dataset(paths, replicas=1):
  """Validation images, float32 in 0..255: whole images, one per batch (sizes differ).

  Split over several replicas, a batch of one leaves a replica an empty batch, which TensorFlow's
  convolutions reject; there the images are centre crops of one common size (the largest multiple
  of 16 up to 256 that fits all), cycled up to a multiple of the number of replicas (so an image can
  count twice) and batched by it: every replica gets one crop.
  """
  images = [read_image(p) for p in paths]
  if replicas == 1:
    return tf.data.Dataset.from_generator(
        lambda: (im[None].astype(np.float32) for im in images),
        output_signature=tf.TensorSpec((1, None, None, 3), tf.float32))
  side = min(256, min(min(im.shape[:2]) for im in images)) // 16 * 16
  if side == 0:
    raise UserError("validation images must be at least 16x16 pixels")
  crops = [im[(im.shape[0] - side) // 2:][:side, (im.shape[1] - side) // 2:][:, :side] for im in images]
  count = -(-len(crops) // replicas) * replicas
  crops = [crops[i % len(crops)] for i in range(count)]
  return tf.data.Dataset.from_tensor_slices(np.stack(crops).astype(np.float32)).batch(replicas)
