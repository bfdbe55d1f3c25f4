"""Training shared by every codec: Keras compile/fit with validation, TensorBoard, NaN guard,
checkpoints that resume, a tf.distribute scope, and export of the coding SavedModel at the end."""
import contextlib
import json
import logging
import math
import os
import signal
import threading

import tensorflow as tf

from utils import codec, data, pool_cpu_memory
from utils.errors import Interrupted, UserError
from utils.model import enable_determinism

log = logging.getLogger("utils.training")

CONFIG = "config.json"
BACKUP = "backup"
LOGS = "logs"


def make_strategy(kind="auto"):
  """The tf.distribute strategy for `--distribute`.

  auto: MirroredStrategy over several local GPUs, else the default (one GPU or the CPU).
  mirrored: MirroredStrategy over all local GPUs, or over all logical CPUs when there is no GPU.
  multiworker: MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG variable.
  """
  if kind == "multiworker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  if kind == "mirrored":
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])
  if len(gpus) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def check_warm_start(source_dir, model_config):
  """--init_from needs a model of the same codec and shape (any lambda)."""
  path = os.path.join(source_dir, CONFIG)
  if not tf.io.gfile.exists(path):
    raise UserError(f"--init_from {source_dir}: not a model directory (no {CONFIG})")
  with tf.io.gfile.GFile(path) as f:
    source = json.load(f)
  mine = {k: v for k, v in model_config.items() if k != "lambda"}
  theirs = {k: v for k, v in source.items() if k != "lambda"}
  if mine != theirs:
    raise UserError(f"--init_from {source_dir}: that model has another shape ({theirs}, not {mine})")


def check_model_dir(model_dir, model_config):
  """Refuses to resume a run whose model differs; records the model's config for the next run."""
  path = os.path.join(model_dir, CONFIG)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      old = json.load(f)
    if old != model_config:
      diff = ", ".join(f"{k}: {old.get(k)} -> {model_config.get(k)}"
                       for k in sorted(set(old) | set(model_config)) if old.get(k) != model_config.get(k))
      raise UserError(f"{model_dir} holds a different model ({diff}); "
                      "pass another --model_path or delete that directory")
  try:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(model_config, f, indent=1, sort_keys=True)
  except (OSError, tf.errors.OpError) as e:
    raise UserError(f"cannot write to the model directory {model_dir}: "
                    f"{getattr(e, 'message', None) or e}") from None


class WarmupCosine(tf.keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `final` at `total`.

  A function of the optimizer's step count alone, so a resumed run continues on the same curve.
  """

  def __init__(self, peak, total, warmup=200, final=1e-5):
    self.peak, self.total, self.final = float(peak), int(total), float(final)
    self.warmup = int(min(warmup, max(self.total // 2, 1)))  # short runs still decay

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = self.peak * (step + 1) / max(self.warmup, 1)
    progress = tf.clip_by_value((step - self.warmup) / max(self.total - self.warmup, 1), 0.0, 1.0)
    decay = self.final + 0.5 * (self.peak - self.final) * (1 + tf.cos(math.pi * progress))
    return tf.where(step < self.warmup, warm, decay)

  def get_config(self):
    return dict(peak=self.peak, total=self.total, warmup=self.warmup, final=self.final)


# Above this, a gradient's square may overflow float32 in the global norm that clipping computes
# (its sum of squares reaches inf for ~1e19, or less with many elements), and clipping by an
# infinite norm turns every gradient into NaN: a single exploding step would end the run.
HUGE_GRADIENT = 1e15


def bound_for_clipping(grads):
  """`grads` scaled by one common factor so that none exceeds HUGE_GRADIENT in magnitude.

  Clipping by the global norm keeps only the direction of a gradient whose norm is above the clip,
  and a common factor keeps that direction (the scaled norm stays >= HUGE_GRADIENT, far above any
  clip): the clipped gradients are those of exact arithmetic, but finite. Gradients below the bound
  are left exactly as they are (scaled by 1.0); non-finite ones stay non-finite.
  """
  present = [g for g in grads if g is not None]
  if not present:
    return grads
  largest = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(tf.convert_to_tensor(g))) for g in present]))
  scale = tf.where(largest > HUGE_GRADIENT, HUGE_GRADIENT / largest, tf.ones_like(largest))
  return [None if g is None else tf.convert_to_tensor(g) * tf.cast(scale, g.dtype) for g in grads]


class Adam(tf.keras.optimizers.Adam):
  """Keras' Adam, whose global-norm clipping survives gradients that overflow its norm, and which
  leaves a variable whose gradient is not finite as it is, with its moments (the step of a batch
  that utils.model.SpikeGuard refuses: train_step makes its gradients NaN).

  Keras clips after summing the replicas' gradients; bounding them there too keeps the clipped
  direction that of the summed gradient under tf.distribute.
  """

  def _clip_gradients(self, grads):
    if self.global_clipnorm and self.global_clipnorm > 0:
      grads = bound_for_clipping(grads)
    return super()._clip_gradients(grads)

  def _update_step(self, gradient, variable):
    # Runs per variable on its device (and under XLA on a GPU): no cross-replica work in the cond.
    values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
    update = super()._update_step
    tf.cond(tf.reduce_all(tf.math.is_finite(values)), lambda: update(gradient, variable), lambda: None)


def make_optimizer(args, total_steps, model=None, rate_scale=1.0):
  """Adam under the training recipe of args (see README: training recipe).

  cosine (default): warm-up to --learning_rate, cosine decay to --final_learning_rate over the
  run's steps. On 2 CPU cores it reaches in 15 minutes what a constant 1e-4 does not reach in an
  hour (benchmarks/convergence.py). constant: --learning_rate throughout (the papers' recipe).
  Gradients are clipped to a global norm of --clipnorm (0: no clipping; a model may ask for it).
  `rate_scale` scales the learning rate (a rolled-back run, see train); the final rate stays at
  most the peak.
  """
  peak = args.learning_rate * rate_scale
  if getattr(args, "lr_schedule", "cosine") == "cosine":
    rate = WarmupCosine(peak, total_steps, getattr(args, "warmup_steps", 200),
                        min(getattr(args, "final_learning_rate", 1e-5), peak))
  else:
    rate = peak
  clipnorm = getattr(args, "clipnorm", 0) or getattr(model, "GLOBAL_CLIPNORM", None) or None
  return Adam(learning_rate=rate, global_clipnorm=clipnorm)


# grappler's oneDNN rewrite: float32 convolutions, matrix products and the elementwise ops around
# them run in bfloat16 (casts inserted at the edges), the variables and the optimizer stay float32.
BFLOAT16_REWRITE = "auto_mixed_precision_onednn_bfloat16"


def native_bfloat16():
  """Whether this CPU computes bfloat16 itself (AVX512-BF16 or AMX, read from /proc/cpuinfo);
  elsewhere oneDNN emulates it, slower than float32."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = set(f.read().split())
  except OSError:
    return False
  return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision):
  """`precision` with "auto" made bfloat16 where the CPU computes it itself and no GPU is used
  (a GPU's ops are not rewritten), float32 elsewhere."""
  if precision == "auto":
    return "bfloat16" if native_bfloat16() and not tf.config.list_logical_devices("GPU") else "float32"
  return precision


@contextlib.contextmanager
def training_precision(precision):
  """Runs what is inside (the steps and validation of a fit) at `precision` (see resolve_precision).

  float32: as written. bfloat16: every graph function executed inside is rewritten by
  BFLOAT16_REWRITE; the option is read at each call, so functions run after it (export, coding)
  are float32 again, and the files a model codes do not depend on how it was trained. Ops placed
  on a GPU are not rewritten.
  """
  precision = resolve_precision(precision)
  if precision == "float32":
    yield
    return
  if precision != "bfloat16":
    raise ValueError(f"unknown precision {precision!r}")
  if tf.config.list_logical_devices("GPU"):
    log.warning("--precision bfloat16 rewrites the ops on the CPU only; those on the GPU stay float32")
  elif not native_bfloat16():
    log.warning("this CPU has no bfloat16 instructions (AVX512-BF16, AMX): oneDNN emulates them, "
                "and --precision bfloat16 will likely be slower than float32")
  # Restored on exit, not switched off: a scope inside another bfloat16 scope leaves it on.
  before = tf.config.optimizer.get_experimental_options().get(BFLOAT16_REWRITE, False)
  tf.config.optimizer.set_experimental_options({BFLOAT16_REWRITE: True})
  try:
    yield
  finally:
    tf.config.optimizer.set_experimental_options({BFLOAT16_REWRITE: before})


def restore_weights(model, source_dir, build):
  """Initialises `model` from the last checkpoint in `source_dir` (a trained model directory): the
  warm start of a lambda sweep. Weights only: the optimizer and its step count start afresh, so the
  learning-rate schedule runs its whole course again.

  The checkpoint is read into a separate model made by `build()` and copied over: restoring into
  `model` itself would also restore its optimizer (the checkpoint tracks it through the model).
  """
  latest = _latest_checkpoint(source_dir)
  if latest is None:
    raise UserError(f"--init_from {source_dir}: no checkpoint there (train that model first)")
  source = build()
  tf.train.Checkpoint(model=source).restore(latest).expect_partial()
  mine, theirs = model.coding_variables(), source.coding_variables()
  if [v.shape for v in mine] != [v.shape for v in theirs]:
    raise UserError(f"--init_from {source_dir}: its variables do not fit this model")
  for dst, src in zip(mine, theirs):
    dst.assign(src)
  log.info("initialised from %s", latest)


def _latest_checkpoint(model_dir):
  """The newest BackupAndRestore checkpoint of a model directory, or None."""
  # Keras keeps the chief worker's checkpoints in backup/chief.
  for directory in (os.path.join(model_dir, BACKUP, "chief"), os.path.join(model_dir, BACKUP)):
    if tf.io.gfile.exists(directory):
      latest = tf.train.latest_checkpoint(directory)
      if latest:
        return latest
  return None


def _has_checkpoint(model_dir):
  return _latest_checkpoint(model_dir) is not None


class _NaNLoss(Exception):
  pass


# So many refused steps in a row (utils.model.SpikeGuard) mean the weights, not some batches, went
# wrong: training stops instead of running on without learning.
REFUSED_IN_A_ROW = 100
# A run stopped that way, or by a NaN loss, goes back to its last checkpoint (saved before the
# refusals, see _Backup) and on at this share of its learning rate, at most --rollbacks times. Why:
# one accepted step at the peak rate can wreck the weights, at random (the cpu preset's bmshj2018
# anchor, peak 2e-3, did at step ~250 in one of two runs); stopping made the sweep's main job fail.
ROLLBACK_RATE = 0.5


class _Refused(Exception):
  pass


class _StopOnNaN(tf.keras.callbacks.Callback):
  """Aborts fit at the first NaN/inf loss, or after REFUSED_IN_A_ROW refused steps.

  Raising (rather than setting stop_training) skips the backups of that step and of the epoch end,
  so the checkpoint on disk stays the last good one.
  """

  def __init__(self):
    super().__init__()
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      raise _NaNLoss(self._epoch + 1, batch + 1, int(self.model.optimizer.iterations.numpy()))
    guard = getattr(self.model, "spike_guard", None)
    if guard is not None and guard.factor and int(guard.in_a_row.numpy()) >= REFUSED_IN_A_ROW:
      raise _Refused(self._epoch + 1, batch + 1, int(self.model.optimizer.iterations.numpy()),
                     float(guard.average.numpy()), guard.factor)


class _Backup(tf.keras.callbacks.BackupAndRestore):
  """Keras' BackupAndRestore, saving model and optimizer every `steps` steps and at every epoch end
  (restored mid-epoch by the next run), never saving weights that are not finite, and saving before
  the run stops on SIGTERM or SIGINT (see _stopping_on_signals)."""

  def __init__(self, backup_dir, steps, steps_per_epoch):
    super().__init__(backup_dir, save_freq=steps, delete_checkpoint=False)
    self._steps_per_epoch = steps_per_epoch
    self.signal = None  # set by the signal handler; acted on at the end of the current step

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    saved_batch = self._training_state._ckpt_saved_batch
    if int(saved_batch.numpy()) >= self._steps_per_epoch:
      # Saved by a run with a larger --steps_per_epoch: go on with the next epoch.
      saved_batch.assign(self._steps_per_epoch - 1)
    step = int(self.model.optimizer.iterations.numpy())
    if step:
      log.info("resuming from the checkpoint at step %d", step)

  def on_train_batch_end(self, batch, logs=None):
    super().on_train_batch_end(batch, logs)
    if self.signal is not None:
      self._backup(self._current_epoch, batch)
      name = signal.Signals(self.signal).name
      step = int(self.model.optimizer.iterations.numpy())
      raise Interrupted(
          f"{name} at step {step} (epoch {self._current_epoch + 1}, step {batch + 1}); the checkpoint "
          "is saved: rerun the same command to resume", self.signal)

  def on_epoch_end(self, epoch, logs=None):
    self._backup(epoch, self._steps_per_epoch - 1)

  def _backup(self, epoch, batch=0):
    if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.trainable_variables):
      raise _NaNLoss(epoch + 1, batch + 1, int(self.model.optimizer.iterations.numpy()))
    guard = getattr(self.model, "spike_guard", None)
    if guard is not None and guard.factor and int(guard.in_a_row.numpy()) and self.signal is None:
      # While steps are refused the weights may be what went wrong (an accepted step before the
      # refusals wrecked them): the checkpoint to rerun from stays the one from before.
      return
    super()._backup(epoch, batch)


@contextlib.contextmanager
def _stopping_on_signals(backup):
  """SIGTERM and SIGINT ask `backup` to save and stop after the current step; a second one stops at
  once (the periodic checkpoint remains, as after SIGKILL)."""
  if threading.current_thread() is not threading.main_thread():
    yield  # signal handlers can only be installed from the main thread
    return

  def handler(signum, frame):
    if backup.signal is not None:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    backup.signal = signum

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def train(build_model, args, model_config, export=True):
  """Trains (or resumes) the model of model_config in args.model_path and exports it (unless not
  `export`: the checkpoint alone is written).

  A run stopped by a NaN loss or by REFUSED_IN_A_ROW refused steps rolls back to its last checkpoint
  and goes on at ROLLBACK_RATE of the learning rate, at most `args.rollbacks` times.

  Returns the Keras History of this invocation (empty when the run had already finished); its
  `model` is the trained model.
  """
  pool_cpu_memory()
  # First: MultiWorkerMirroredStrategy must exist before other TensorFlow work in the process.
  strategy = make_strategy(getattr(args, "distribute", "auto"))
  deterministic = getattr(args, "deterministic", False)
  if deterministic:
    enable_determinism(args.seed)
  model_dir = args.model_path
  # The data first: a glob that matches nothing or a patch larger than every image fails here,
  # before the model directory is made.
  train_ds = train_dataset(args, model_dir)
  val_ds = data.eval_dataset(data.eval_paths(args.dataset, args.eval_glob),
                             replicas=strategy.num_replicas_in_sync)
  init_from = getattr(args, "init_from", None)
  if init_from:
    check_warm_start(init_from, model_config)
  check_model_dir(model_dir, model_config)
  rollbacks, rate_scale = getattr(args, "rollbacks", 0), 1.0
  finish = finish_crops(args)
  crops = f"batch {args.batch_size}, patch {args.patch_size}"
  if finish:
    large = f"batch {finish[2]}, patch {finish[1]}"
    crops = large if finish[0] == args.epochs else f"{crops}; the last {finish[0]} at {large}"
  log.info("training %s (lambda %g) into %s: %d epochs x %d steps, %s, %s",
           model_config["codec"], model_config["lambda"], model_dir, args.epochs,
           args.steps_per_epoch, crops, resolve_precision(getattr(args, "precision", "float32")))
  for done in range(rollbacks + 1):
    try:
      history = _fit(build_model, args, model_config, strategy, train_ds, val_ds, rate_scale)
      break
    except (_NaNLoss, _Refused) as e:
      if done == rollbacks:
        raise _stopped_error(e, model_config, done) from None
      rate_scale *= ROLLBACK_RATE
      if finish:  # the crops switch counted from that checkpoint
        train_ds = train_dataset(args, model_dir)
      log.warning("%s; rolling back to the last checkpoint, on at %g of the learning rate (rollback "
                  "%d of at most %d)", _stop_reason(e), rate_scale, done + 1, rollbacks)
  if not export:
    return history
  fingerprint = codec.export(history.model, model_dir, model_config)
  log.info("exported %s (weights %s)", os.path.join(model_dir, codec.SAVED_MODEL), fingerprint.hex())
  return history


def finish_crops(args):
  """(epochs, patch size, batch size) of the --finish_epochs stage, or None when it is off."""
  epochs = min(getattr(args, "finish_epochs", 0) or 0, args.epochs)
  if epochs <= 0:
    return None
  size = getattr(args, "finish_patch_size", None) or 2 * args.patch_size
  batch = getattr(args, "finish_batch_size", None) or max(1, args.batch_size * args.patch_size ** 2 // size ** 2)
  return epochs, size, batch


def checkpoint_step(model_dir):
  """The optimizer step of the last checkpoint in model_dir (0 without one): where a rerun resumes."""
  latest = _latest_checkpoint(model_dir)
  if latest is None:
    return 0
  return int(tf.train.load_variable(latest, "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))


def train_dataset(args, model_dir):
  """The training batches: --patch_size crops, then from the step where the last --finish_epochs
  begin, the larger crops of finish_crops (counted from the checkpoint a rerun resumes at)."""
  finish = finish_crops(args)
  if finish is None:
    return staged_batches(args, 0)
  return staged_batches(args, (args.epochs - finish[0]) * args.steps_per_epoch - checkpoint_step(model_dir))


def staged_batches(args, small_steps):
  """`small_steps` batches of --patch_size crops, then the larger crops of finish_crops for ever;
  without a finish stage, --patch_size crops for ever."""
  seed = args.seed if getattr(args, "deterministic", False) else None

  def crops(size, batch, sizes=None):
    return data.train_dataset(args.dataset, size, batch, train_glob=args.train_glob,
                              data_dir=args.data_dir, seed=seed, sizes=sizes)

  finish = finish_crops(args)
  if finish is None:
    return crops(args.patch_size, args.batch_size)
  _, size, batch = finish
  # Both stages crop the same files: listed, and their headers read, once.
  sizes = (None if args.dataset == "coco"
           else data.image_sizes(data.train_paths(args.dataset, args.train_glob)))
  small = crops(args.patch_size, args.batch_size, sizes) if small_steps > 0 else None
  try:
    large = crops(size, batch, sizes)
  except UserError as e:
    raise UserError(f"--finish_patch_size {size}: {e}") from None
  return small.take(small_steps).concatenate(large) if small is not None else large


def _fit(build_model, args, model_config, strategy, train_ds, val_ds, rate_scale):
  """One model.fit of a fresh model, from the last checkpoint when there is one."""
  model_dir = args.model_path
  init_from = getattr(args, "init_from", None)
  with strategy.scope():
    model = build_model(args)
    model.quantization = getattr(args, "quantization", model.quantization)
    model.spike_guard.factor = getattr(args, "spike_factor", model.spike_guard.factor)
    model.compile(optimizer=make_optimizer(args, args.epochs * args.steps_per_epoch, model,
                                           rate_scale=rate_scale))
    # Slots now, not at the first step: a resumed run restores them even when no step is left to run.
    model.optimizer.build(model.trainable_variables)
    if init_from and not _has_checkpoint(model_dir):
      restore_weights(model, init_from, lambda: build_model(args))
  # Restores model and optimizer state on the next run, so an interrupted command resumes at the
  # last saved step.
  backup = _Backup(os.path.join(model_dir, BACKUP), getattr(args, "backup_steps", 100),
                   args.steps_per_epoch)
  callbacks = [
      _StopOnNaN(),
      backup,
      tf.keras.callbacks.TensorBoard(os.path.join(model_dir, LOGS), write_graph=False,
                                     update_freq="epoch"),
  ]
  with _stopping_on_signals(backup), training_precision(getattr(args, "precision", "float32")):
    history = model.fit(train_ds, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                        validation_data=val_ds, validation_freq=1, callbacks=callbacks,
                        verbose=args.verbose)
  return history


def _stop_reason(e):
  epoch, step, total = e.args[:3]  # both exceptions start with these
  if isinstance(e, _NaNLoss):
    return f"loss became NaN at step {total} (epoch {epoch}, step {step})"
  return (f"training refused its last {REFUSED_IN_A_ROW} steps up to step {total} (epoch {epoch}, "
          f"step {step})")


def _stopped_error(e, model_config, rollbacks):
  after = (f" (after {rollbacks} rollback{'s' if rollbacks > 1 else ''} to the last checkpoint, "
           f"each on at {ROLLBACK_RATE:g} times the learning rate before it)" if rollbacks else "")
  if isinstance(e, _NaNLoss):
    return UserError(
        f"{_stop_reason(e)} with lambda {model_config['lambda']}{after}; the last checkpoint before "
        "it is kept: lower --learning_rate and rerun")
  average, factor = e.args[3:]
  return UserError(
      f"{_stop_reason(e)} with lambda {model_config['lambda']}{after}: each loss was above "
      f"--spike_factor {factor:g} times the running mean {average:.4g}, or its gradient was not "
      "finite; the last checkpoint from before these steps is kept: lower --learning_rate (or "
      "raise --spike_factor) and rerun to resume from it")
