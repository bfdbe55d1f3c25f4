"""The training recipe: the learning-rate schedule, gradient clipping, the straight-through
quantization proxy, the warm start of one lambda from another (--init_from), and the pooled CPU
memory of a training process."""
import argparse
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import COMMON, ROOT, TINY, allocator_env
from utils import codec, training
from utils.errors import UserError
from utils.model import CompressionModel


def test_warmup_then_cosine_decay_to_the_final_rate():
  schedule = training.WarmupCosine(1e-3, total=1000, warmup=100, final=1e-5)
  rates = np.array([float(schedule(s)) for s in range(0, 1001)])
  assert rates[0] == pytest.approx(1e-5) and rates[99] == pytest.approx(1e-3)
  assert np.all(np.diff(rates[:100]) > 0)                 # warm-up rises
  assert np.all(np.diff(rates[100:]) <= 1e-12)            # then only falls
  assert rates[550] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)
  assert rates[1000] == pytest.approx(1e-5) and float(schedule(5000)) == pytest.approx(1e-5)
  # A run shorter than the warm-up still gets to decay.
  short = training.WarmupCosine(1e-3, total=10, warmup=200)
  assert short.warmup == 5 and float(short(10)) == pytest.approx(1e-5)


def _args(**kw):
  base = dict(learning_rate=1e-3, lr_schedule="cosine", warmup_steps=200, final_learning_rate=1e-5,
              clipnorm=1.0)
  base.update(kw)
  return argparse.Namespace(**base)


def test_optimizer_follows_the_flags():
  opt = training.make_optimizer(_args(), 1000)
  assert isinstance(opt._learning_rate, training.WarmupCosine) and opt.global_clipnorm == 1.0
  constant = training.make_optimizer(_args(lr_schedule="constant", learning_rate=1e-4, clipnorm=0), 1000)
  assert float(constant.learning_rate) == pytest.approx(1e-4) and constant.global_clipnorm is None
  assert not isinstance(constant._learning_rate, training.WarmupCosine)


def test_straight_through_quantization_rounds_forward_and_passes_gradients_back():
  model = CompressionModel(0.01)
  y = tf.Variable([[0.2, 1.7, -2.6]])
  for proxy, expected in (("ste", [[0.0, 2.0, -3.0]]), ("noise", [[0.5, 2.0, -2.3]])):
    model.quantization = proxy
    with tf.GradientTape() as tape:
      noisy = y + 0.3  # stands in for the entropy model's noisy latents
      out = model.synthesis_input(noisy, y, tf.round(y), training=True)
      loss = tf.reduce_sum(3.0 * out)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, y).numpy(), [[3.0, 3.0, 3.0]])
    # Outside training the entropy model's output (rounded) goes through untouched.
    assert model.synthesis_input(tf.constant(5.0), y, tf.round(y), training=False).numpy() == 5.0


def test_clipping_keeps_the_direction_of_gradients_whose_norm_overflows():
  huge = [tf.constant([3e20, -4e20]), tf.constant([[0.0, 1.0]])]
  # float32's sum of squares overflows: plain clipping by the global norm gives NaN everywhere.
  assert np.isnan(tf.clip_by_global_norm(huge, 1.0)[0][0].numpy()).all()
  clipped, _ = tf.clip_by_global_norm(training.bound_for_clipping(huge), 1.0)
  np.testing.assert_allclose(clipped[0].numpy(), [0.6, -0.8], rtol=1e-6)
  np.testing.assert_allclose(clipped[1].numpy(), [[0.0, 2e-21]], rtol=1e-5)
  # Ordinary gradients are untouched, bit for bit.
  small = [tf.constant([1e-3, -7.5]), None, tf.constant([[123.25]])]
  out = training.bound_for_clipping(small)
  assert out[1] is None
  assert np.array_equal(out[0].numpy(), small[0].numpy()) and np.array_equal(out[2].numpy(), small[2].numpy())


def test_a_training_step_with_an_exploding_loss_keeps_the_weights_finite():
  import bls2017
  from tools.fuzz import natural_image
  # lambda 1e30 makes the gradients ~1e34: finite, but their global norm is not.
  model = bls2017.BLS2017Model(1e30, num_filters=8)
  model.compile(optimizer=training.make_optimizer(_args(lr_schedule="constant"), 1000))
  x = tf.constant(np.stack([natural_image(32, 32, i) for i in range(2)]), tf.float32)
  with tf.GradientTape() as tape:
    loss = model(x, training=True)["loss"]
  assert not np.isfinite(tf.linalg.global_norm(tape.gradient(loss, model.trainable_variables)).numpy())
  before = [v.numpy() for v in model.trainable_variables]
  model.train_step(x)
  after = [v.numpy() for v in model.trainable_variables]
  assert all(np.isfinite(a).all() for a in after)
  # Adam's first step moves each weight by about the learning rate at most.
  assert max(np.abs(a - b).max() for a, b in zip(after, before)) <= 1.01e-3
  assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(after, before))


def _tiny_bls2017(spike_factor):
  import bls2017
  tf.keras.utils.set_random_seed(0)
  model = bls2017.BLS2017Model(0.01, num_filters=8)
  model.spike_guard.factor = spike_factor
  model.compile(optimizer=training.make_optimizer(_args(lr_schedule="constant"), 1000))
  model.optimizer.build(model.trainable_variables)
  return model


def _batch(seed=0):
  from tools.fuzz import natural_image
  return tf.constant(np.stack([natural_image(32, 32, seed + i) for i in range(2)]), tf.float32)


def test_a_step_far_above_the_running_loss_leaves_weights_and_moments_as_they_were():
  model = _tiny_bls2017(10.0)
  step, guard = tf.function(model.train_step), model.spike_guard
  for seed in range(3):
    logs = step(_batch(seed))
    assert float(logs["skipped"]) == 0
  assert float(guard.taken.numpy()) == 3 and 0 < float(guard.average.numpy()) < 1e4
  # A run that had settled at a loss of 0.01: the same kind of batch is now a spike.
  guard.taken.assign(100.0)
  guard.average.assign(0.01)
  state = [v.numpy() for v in model.trainable_variables + model.optimizer.variables[1:]]
  epoch_loss = float(model.loss_tracker.result())
  logs = step(_batch(7))
  assert float(logs["skipped"]) == 1 and float(guard.in_a_row.numpy()) == 1
  assert float(logs["loss"]) == epoch_loss  # a refused step is not in the epoch's mean either
  assert all(np.array_equal(v.numpy(), s)
             for v, s in zip(model.trainable_variables + model.optimizer.variables[1:], state))
  assert int(model.optimizer.iterations.numpy()) == 4  # the schedule goes on
  assert float(guard.average.numpy()) == pytest.approx(0.01)
  # Back under the factor: the next step is taken.
  guard.average.assign(1e4)
  step(_batch(7))
  assert float(guard.in_a_row.numpy()) == 0
  assert any(not np.array_equal(v.numpy(), s) for v, s in zip(model.trainable_variables, state))


def test_the_spike_guard_changes_no_step_it_takes():
  runs = []
  for factor in (10.0, 0.0):
    model = _tiny_bls2017(factor)
    losses = [float(model.train_step(_batch(seed))["loss"]) for seed in range(3)]
    runs.append((losses, [v.numpy() for v in model.trainable_variables]))
  assert runs[0][0] == runs[1][0]
  assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_adam_leaves_a_variable_whose_gradient_is_not_finite():
  a, b = tf.Variable([1.0, 2.0]), tf.Variable([3.0])
  opt = training.make_optimizer(_args(lr_schedule="constant", clipnorm=0), 1000)
  opt.build([a, b])
  opt.apply_gradients([(tf.constant([np.nan, 1.0]), a), (tf.constant([1.0]), b)])
  _, m_a, v_a, m_b, v_b = (v.numpy() for v in opt.variables)
  assert np.array_equal(a.numpy(), [1.0, 2.0]) and not m_a.any() and not v_a.any()
  assert b.numpy()[0] == pytest.approx(3.0 - 1e-3) and m_b.all() and v_b.all()


def test_warm_start_takes_the_weights_of_another_lambda(trained, tmp_path):
  target = str(tmp_path / "warm")
  # One step at a negligible rate: the result must hold the source's weights.
  rc = trained.main("train", *COMMON, *TINY[trained.name], "--lambda", "0.05", "--epochs", "1",
                    "--steps_per_epoch", "1", "--learning_rate", "1e-9", "--final_learning_rate", "1e-9",
                    "--eval_glob", trained.val_glob, "--init_from", trained.model_path,
                    "--model_path", target)
  assert rc == 0
  source = codec.Codec(trained.model_path)._module.weights
  warm = codec.Codec(target)._module.weights
  weights = [(a, b) for a, b in zip(source, warm) if a.dtype.is_floating]  # not the coding tables
  assert len(weights) > 5
  for a, b in weights:
    # The float64 exact twins hold integer-quantized copies, which a 1e-9 step can move by one unit.
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1.0 if a.dtype == tf.float64 else 1e-6)


def test_warm_start_from_another_shape_fails_before_training(trained, tmp_path, capsys):
  flags = list(TINY[trained.name])
  flags[flags.index("--num_filters") + 1] = "8"
  rc = trained.main("train", *COMMON, *flags, "--epochs", "1", "--init_from", trained.model_path,
                    "--model_path", str(tmp_path / "other"))
  assert rc == 2 and "another shape" in capsys.readouterr().err
  assert not (tmp_path / "other").exists()
  with pytest.raises(UserError, match="not a model directory"):
    training.check_warm_start(str(tmp_path), {"codec": trained.name, "lambda": 1.0})


def test_bmshj2018_scales_start_near_one_not_at_the_smallest():
  import bmshj2018
  from utils.entropy_models import scale_fn
  model = bmshj2018.BMSHJ2018Model(0.01, num_filters=8, latent_depth=6)
  z_hat = tf.zeros((1, 2, 3, 8))
  np.testing.assert_array_equal(model.hyper_synthesis(z_hat).numpy(), bmshj2018.INITIAL_SCALE_INDEX)
  assert 0.9 < float(scale_fn(bmshj2018.INITIAL_SCALE_INDEX)) < 1.1
  # The coder's exact twin of the hyper-synthesis starts at the same table entry.
  model.build_coding_tables()
  np.testing.assert_array_equal(model.scale_indexes(z_hat).numpy(), bmshj2018.INITIAL_SCALE_INDEX)



POOLED_TRAINING = """
import hashlib, sys
sys.path.insert(0, {root!r})
import bls2017
from conftest import natural_image
from utils import cli, codec
status = cli.main("bls2017", bls2017.build_model, bls2017.add_model_flags, ["train", "--num_filters", "8",
    "--patch_size", "32", "--batch_size", "2", "--epochs", "1", "--steps_per_epoch", "6", "--verbose", "0",
    "--deterministic", "--model_path", {model_path!r}])
import tensorflow as tf
try:
  tf.config.experimental.get_memory_info("CPU:0")  # only a BFC allocator keeps these statistics
  allocator = "pooled"
except ValueError:
  allocator = "malloc"
encoded, _ = codec.Codec({model_path!r}).encode(natural_image(40, 56, 7))
print(status, allocator, hashlib.sha256(encoded).hexdigest())
"""


def test_training_pools_cpu_memory_unless_told_not_to_with_the_same_bits(tmp_path):
  """The allocator changes where tensors live, not what is computed: the same seed trains the same
  weights (the exported file's fingerprint) and codes the same file."""
  outputs = {}
  for setting in (None, "false"):
    env = allocator_env(setting)
    code = POOLED_TRAINING.format(root=ROOT, model_path=str(tmp_path / f"model-{setting}"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=os.path.join(ROOT, "tests"), timeout=600)
    outputs[setting] = result.stdout.split()[-3:]
    assert outputs[setting][0] == "0", result.stdout + result.stderr
  assert outputs[None][1] == "pooled" and outputs["false"][1] == "malloc"
  assert outputs[None][2] == outputs["false"][2]


def test_bfloat16_precision_holds_only_inside_its_scope():
  x = tf.random.stateless_normal([2, 32, 32, 16], seed=(1, 2))
  w = tf.random.stateless_normal([3, 3, 16, 16], seed=(3, 4))
  conv = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
  exact = tf.nn.conv2d(x, w, 1, "SAME").numpy()
  with training.training_precision("bfloat16"):
    inside = conv(x, w).numpy()
  # The same function, called again after the scope: float32 again.
  assert np.array_equal(conv(x, w).numpy(), exact)
  with training.training_precision("float32"):
    assert np.array_equal(conv(x, w).numpy(), exact)
  assert np.allclose(inside, exact, rtol=0.05, atol=0.05 * np.abs(exact).max())
  if training.native_bfloat16():  # elsewhere oneDNN may leave the graph as it is
    assert not np.array_equal(inside, exact)
  with pytest.raises(ValueError):
    with training.training_precision("float16"):
      pass
  # Nested: leaving the inner scope restores the outer one's setting.
  options = tf.config.optimizer.get_experimental_options
  with training.training_precision("bfloat16"):
    with training.training_precision("bfloat16"):
      pass
    assert options().get(training.BFLOAT16_REWRITE) is True
  assert not options().get(training.BFLOAT16_REWRITE, False)


def test_auto_precision_is_bfloat16_only_on_a_cpu_that_has_it(monkeypatch):
  for native, expected in ((True, "bfloat16"), (False, "float32")):
    monkeypatch.setattr(training, "native_bfloat16", lambda: native)
    assert training.resolve_precision("auto") == expected
    assert training.resolve_precision("float32") == "float32"
    assert training.resolve_precision("bfloat16") == "bfloat16"


def test_a_bfloat16_trained_model_codes_as_a_float32_process_does(tmp_path, image_folder):
  """Training at bfloat16 changes the weights it reaches, not how the exported codec computes: the
  training process compresses, after its fit, the same bytes as a fresh process does."""
  import bls2017
  from PIL import Image
  from conftest import run_script
  from utils import cli
  model_path = str(tmp_path / "model")
  argv = ["train", *COMMON, *TINY["bls2017"], "--epochs", "2", "--precision", "bfloat16", "--deterministic",
          "--eval_glob", str(image_folder / "a.png"), "--model_path", model_path]
  assert cli.main("bls2017", bls2017.build_model, bls2017.add_model_flags, argv) == 0
  logs = training_logs(model_path)
  assert all(np.isfinite(logs["epoch_loss"])) and logs["epoch_loss"][1] < logs["epoch_loss"][0]
  image = np.asarray(Image.open(image_folder / "c.png").convert("RGB"))
  here = codec.Codec(model_path).encode(image)[0]
  out = tmp_path / "c.lic"
  result = run_script("bls2017.py", "compress", image_folder / "c.png", out, "--model_path", model_path)
  assert result.returncode == 0, result.stderr
  assert out.read_bytes() == here


def training_logs(model_path):
  """{tag: [value per epoch]} of a model directory's TensorBoard training logs."""
  import glob
  values = {}
  for path in glob.glob(os.path.join(model_path, training.LOGS, "train", "events*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        values.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  return {tag: [steps[s] for s in sorted(steps)] for tag, steps in values.items()}


def _finish_args(tmp_path, **kw):
  base = dict(dataset="folder", train_glob=None, data_dir=None, patch_size=32, batch_size=4, epochs=3,
              steps_per_epoch=2, finish_epochs=1, finish_patch_size=None, finish_batch_size=None,
              deterministic=False, seed=0)
  base.update(kw)
  return argparse.Namespace(**base)


def test_the_last_finish_epochs_train_on_larger_crops_with_the_same_pixels(image_folder, tmp_path):
  args = _finish_args(tmp_path, train_glob=str(image_folder / "*.png"))
  assert training.finish_crops(args) == (1, 64, 1)  # twice the side, a quarter of the batch
  shapes = [tuple(b.shape) for b in training.train_dataset(args, str(tmp_path / "none")).take(6)]
  assert shapes == [(4, 32, 32, 3)] * 4 + [(1, 64, 64, 3)] * 2
  assert training.train_dataset(args, str(tmp_path / "none")).options().autotune.enabled is False
  args.finish_epochs = 5  # more than --epochs: every step
  assert {tuple(b.shape) for b in training.train_dataset(args, str(tmp_path)).take(3)} == {(1, 64, 64, 3)}
  args.finish_epochs, args.finish_patch_size, args.finish_batch_size = 1, 48, 3
  assert training.finish_crops(args) == (1, 48, 3)
  args.finish_epochs = 0
  assert training.finish_crops(args) is None
  with pytest.raises(UserError, match="--finish_patch_size 256"):
    training.train_dataset(_finish_args(tmp_path, train_glob=str(image_folder / "*.png"),
                                        finish_patch_size=256), str(tmp_path))


def test_staged_batches_switch_crops_after_the_given_steps(image_folder, tmp_path):
  """What train_dataset and benchmarks/convergence.py's chunks share: the switch at a given step."""
  args = _finish_args(tmp_path, train_glob=str(image_folder / "*.png"))

  def sides(small_steps, n):
    return [int(b.shape[1]) for b in training.staged_batches(args, small_steps).take(n)]

  assert sides(2, 4) == [32, 32, 64, 64]
  assert sides(0, 2) == [64, 64]
  assert sides(5, 6) == [32] * 5 + [64]
  args.finish_epochs = 0
  assert sides(0, 2) == [32, 32]  # no finish stage


def test_a_resumed_run_switches_crops_at_the_same_step(image_folder, tmp_path):
  """The switch is counted from the checkpoint a rerun resumes at, not from its own first step."""
  model_dir = str(tmp_path / "model")
  args = _finish_args(tmp_path, train_glob=str(image_folder / "*.png"))
  ckpt = tf.train.Checkpoint(model=tf.Module())
  ckpt.model.optimizer = tf.Module()
  ckpt.model.optimizer._iterations = tf.Variable(3, dtype=tf.int64)
  ckpt.save(os.path.join(model_dir, training.BACKUP, "chief", "ckpt"))
  assert training.checkpoint_step(model_dir) == 3
  shapes = [tuple(b.shape) for b in training.train_dataset(args, model_dir).take(3)]
  assert shapes == [(4, 32, 32, 3)] + [(1, 64, 64, 3)] * 2


def test_both_crop_stages_read_the_image_headers_once(image_folder, tmp_path, monkeypatch):
  from utils import data
  args = _finish_args(tmp_path, train_glob=str(image_folder / "*.png"))
  read, readable_size = [], data._readable_size
  monkeypatch.setattr(data, "_readable_size", lambda p: read.append(p) or readable_size(p))
  listed, train_paths = [], data.train_paths
  monkeypatch.setattr(data, "train_paths", lambda *a: listed.append(a) or train_paths(*a))
  shapes = [tuple(b.shape) for b in training.train_dataset(args, str(tmp_path / "none")).take(6)]
  assert shapes == [(4, 32, 32, 3)] * 4 + [(1, 64, 64, 3)] * 2
  assert sorted(read) == sorted(glob.glob(str(image_folder / "*.png")))  # each once, not once a stage
  assert len(listed) == 1  # the folder is globbed once, so both stages crop the same files


def test_a_run_resumed_past_the_switch_builds_only_the_larger_crops(image_folder, tmp_path, monkeypatch):
  from utils import data
  model_dir = str(tmp_path / "model")
  ckpt = tf.train.Checkpoint(model=tf.Module())
  ckpt.model.optimizer = tf.Module()
  ckpt.model.optimizer._iterations = tf.Variable(5, dtype=tf.int64)  # past the switch at step 4
  ckpt.save(os.path.join(model_dir, training.BACKUP, "chief", "ckpt"))
  built, train_dataset = [], data.train_dataset
  monkeypatch.setattr(data, "train_dataset",
                      lambda dataset, size, *a, **kw: built.append(size) or train_dataset(dataset, size, *a, **kw))
  args = _finish_args(tmp_path, train_glob=str(image_folder / "*.png"))
  assert {tuple(b.shape) for b in training.train_dataset(args, model_dir).take(3)} == {(1, 64, 64, 3)}
  assert built == [64]


def test_training_goes_on_through_the_crop_switch(image_folder, tmp_path):
  import bls2017
  from utils import cli
  rc = cli.main("bls2017", bls2017.build_model, bls2017.add_model_flags, [
      "train", *COMMON, *TINY["bls2017"], "--dataset", "folder", "--train_glob", str(image_folder / "*"),
      "--patch_size", "32", "--epochs", "2", "--steps_per_epoch", "3", "--finish_epochs", "1",
      "--eval_glob", str(image_folder / "a.png"), "--model_path", str(tmp_path / "m")])
  assert rc == 0
  logs = training_logs(str(tmp_path / "m"))
  assert len(logs["epoch_loss"]) == 2 and all(np.isfinite(logs["epoch_loss"]))
  assert codec.Codec(str(tmp_path / "m")).name == "bls2017"


def test_bad_finish_flags_are_refused_before_any_work(tmp_path, capsys):
  import bls2017
  from utils import cli
  for flag, value in (("--finish_epochs", "-1"), ("--finish_patch_size", "0"), ("--finish_batch_size", "-2")):
    rc = cli.main("bls2017", bls2017.build_model, bls2017.add_model_flags, [
        "train", *COMMON, *TINY["bls2017"], flag, value, "--model_path", str(tmp_path / "m")])
    assert rc == 2 and flag in capsys.readouterr().err
  assert not (tmp_path / "m").exists()
