"""hcae specifics: the hierarchy's shape, and training that stays finite at the sweep's top lambda."""
import math

import numpy as np
import pytest
import tensorflow as tf

import hcae
from utils import cli, training
from utils.errors import UserError


def test_levels_and_strings():
  model = hcae.HCAEModel(0.01, levels=6, num_filters=8, latent_channels=[4, 4, 4, 4, 4, 6])
  assert hcae.level_strides(6) == [16, 16, 32, 32, 64, 64]
  assert model.DOWNSAMPLING == 64
  assert model.STRING_NAMES == ("z6", "z5", "z4", "z3", "z2", "z1")
  terms = model(tf.random.uniform((1, 37, 53, 3), 0, 255), training=False)
  assert all(math.isfinite(float(v)) for v in terms.values())
  with pytest.raises(UserError, match="1 or 6 values"):
    hcae.HCAEModel(0.01, levels=6, latent_channels=[4, 4])


def test_high_lambda_training_stays_finite_and_improves(tmp_path):
  # lambda 8.02 (the sweep's highest) with a large learning rate: gradient clipping must keep it
  # finite; the loss must still go down.
  parser, flags = cli.build_parser("hcae", hcae.add_model_flags)
  args = parser.parse_args([
      "train", "--lambda", "8.02", "--levels", "4", "--num_filters", "16", "--latent_channels", "8",
      "--patch_size", "64", "--batch_size", "4", "--epochs", "3", "--steps_per_epoch", "10",
      "--learning_rate", "3e-3", "--verbose", "0", "--model_path", str(tmp_path / "m"),
      "--eval_glob", str(tmp_path / "val.png")])
  from PIL import Image
  from conftest import natural_image
  Image.fromarray(natural_image(64, 64)).save(tmp_path / "val.png")
  history = training.train(hcae.build_model, args, cli.model_config("hcae", args, flags),
                           export=False)
  assert history.model.optimizer.global_clipnorm == hcae.HCAEModel.GLOBAL_CLIPNORM == 1.0
  losses = history.history["loss"]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
