import logging

import numpy as np
import pytest

from utils import data
from utils.errors import UserError


def _check_batch(batch, batch_size, patch):
  assert batch.shape == (batch_size, patch, patch, 3)
  assert batch.dtype.name == "float32"
  values = batch.numpy()
  assert values.min() >= 0 and values.max() <= 255
  assert values.std() > 5  # real picture content, not a constant


def test_builtin_split_is_disjoint_and_complete():
  train, evals = data.builtin_paths("train"), data.builtin_paths("eval")
  assert len(train) == 7 and len(evals) == 3
  assert not set(train) & set(evals)
  for path in evals:
    image = data.read_image(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_builtin_training_batches():
  ds = data.train_dataset("builtin", patch_size=64, batch_size=4)
  batches = [b for b in ds.take(3)]
  for b in batches:
    _check_batch(b, 4, 64)
  # Random crops: consecutive batches differ.
  assert not np.array_equal(batches[0].numpy(), batches[1].numpy())


def test_training_batches_are_not_autotuned(image_folder):
  """tf.data's autotuning thread kept a finished model.fit waiting for it (23-30 s in a pinned warm job)."""
  for ds in (data.train_dataset("builtin", patch_size=64, batch_size=4),
             data.train_dataset("folder", patch_size=64, batch_size=3, train_glob=str(image_folder / "*"))):
    assert ds.options().autotune.enabled is False
    _check_batch(next(iter(ds)), ds.element_spec.shape[0], 64)


def test_folder_batches_skip_small_images(image_folder, caplog):
  with caplog.at_level(logging.WARNING, logger="utils.data"):
    ds = data.train_dataset("folder", patch_size=64, batch_size=3,
                            train_glob=str(image_folder / "*"))
  assert "skipped 1 of 4 images" in caplog.text
  for b in ds.take(2):
    _check_batch(b, 3, 64)


def test_folder_errors(image_folder, tmp_path):
  with pytest.raises(UserError, match="no images match"):
    data.train_dataset("folder", train_glob=str(tmp_path / "nothing" / "*.jpg"))
  with pytest.raises(UserError, match="needs --train_glob"):
    data.train_dataset("folder")
  with pytest.raises(UserError, match="at least 200x200"):
    data.train_dataset("folder", patch_size=200, train_glob=str(image_folder / "*"))


def test_coco_through_tfds_mock():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=4):
    ds = data.train_dataset("coco", patch_size=32, batch_size=2, data_dir="/nonexistent")
    for b in ds.take(2):
      _check_batch(b, 2, 32)


def test_coco_absent_says_how_to_provide_it(tmp_path):
  with pytest.raises(UserError, match="--dataset folder --train_glob"):
    data.train_dataset("coco", data_dir=str(tmp_path))


def test_eval_images_are_whole(image_folder):
  paths = data.eval_paths("folder", str(image_folder / "*.png"))
  shapes = [tuple(x.shape) for x in data.eval_dataset(paths)]
  assert shapes == [(1, 80, 96, 3), (1, 65, 130, 3), (1, 40, 90, 3)]


def test_read_image_converts_to_rgb(tmp_path):
  from PIL import Image
  Image.fromarray(np.full((5, 7), 100, np.uint8), "L").save(tmp_path / "gray.png")
  Image.fromarray(np.full((5, 7, 4), 200, np.uint8), "RGBA").save(tmp_path / "rgba.png")
  assert data.read_image(str(tmp_path / "gray.png")).shape == (5, 7, 3)
  assert data.read_image(str(tmp_path / "rgba.png")).shape == (5, 7, 3)
  (tmp_path / "text.png").write_text("not an image")
  with pytest.raises(UserError, match="cannot read image"):
    data.read_image(str(tmp_path / "text.png"))
