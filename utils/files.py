"""Whole files through tf.io.gfile (local, or any file system TensorFlow knows): reading with a
one-line error, checking an output before the work that produces it, and writing atomically."""
import os

import tensorflow as tf

from utils.errors import UserError


def _is_local(path):
  return "://" not in path


def check_input(path):
  if not tf.io.gfile.exists(path):
    raise UserError(f"no such file: {path}")
  if tf.io.gfile.isdir(path):
    raise UserError(f"{path} is a directory, not a file")


def read_bytes(path):
  check_input(path)
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except (OSError, tf.errors.OpError) as e:
    raise UserError(f"cannot read {path}: {_reason(e)}") from None


def check_output(path, overwrite):
  """Refuses, before any work, an output that exists (unless `overwrite`) or cannot be written."""
  if tf.io.gfile.isdir(path):
    raise UserError(f"{path} is a directory; give a file name")
  if tf.io.gfile.exists(path) and not overwrite:
    raise UserError(f"{path} exists; pass --overwrite to replace it")
  parent = os.path.dirname(path) or "."
  if not _is_local(path):
    return
  if not os.path.isdir(parent):
    raise UserError(f"cannot write {path}: no directory {parent}")
  if not os.access(parent, os.W_OK):
    raise UserError(f"cannot write {path}: the directory {parent} is not writable")


def write_bytes(path, data):
  """Writes `data` to a temporary file beside `path`, then renames it over `path`: an interrupted or
  failed write never leaves a truncated output (or destroys the file it was to replace)."""
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    with tf.io.gfile.GFile(temporary, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  except (OSError, tf.errors.OpError) as e:
    if tf.io.gfile.exists(temporary):
      tf.io.gfile.remove(temporary)
    raise UserError(f"cannot write {path}: {_reason(e)}") from None


def _reason(e):
  text = getattr(e, "message", None) or str(e)
  return text.strip().splitlines()[0] if text.strip() else type(e).__name__
