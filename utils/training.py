"""Training shared by every codec: Keras compile/fit with validation, TensorBoard, NaN guard,
checkpoints that resume, a tf.distribute scope, and export of the coding SavedModel at the end."""
import json
import logging
import math
import os

import tensorflow as tf

from utils import codec, data
from utils.errors import UserError

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
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump(model_config, f, indent=1, sort_keys=True)


class _NaNLoss(Exception):
  pass


class _StopOnNaN(tf.keras.callbacks.Callback):
  """Aborts fit at the first NaN/inf loss.

  Raising (rather than setting stop_training) skips the epoch-end backup, so the checkpoint on disk
  stays the last good one.
  """

  def __init__(self):
    super().__init__()
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      raise _NaNLoss(self._epoch + 1, batch + 1)


def train(build_model, args, model_config, export=True):
  """Trains (or resumes) the model of model_config in args.model_path and exports it (unless not
  `export`: the checkpoint alone is written).

  Returns the Keras History of this invocation (empty when the run had already finished).
  """
  # First: MultiWorkerMirroredStrategy must exist before other TensorFlow work in the process.
  strategy = make_strategy(getattr(args, "distribute", "auto"))
  model_dir = args.model_path
  check_model_dir(model_dir, model_config)
  train_ds = data.train_dataset(args.dataset, args.patch_size, args.batch_size,
                                train_glob=args.train_glob, data_dir=args.data_dir)
  val_ds = data.eval_dataset(data.eval_paths(args.dataset, args.eval_glob),
                             replicas=strategy.num_replicas_in_sync)
  with strategy.scope():
    model = build_model(args)
    model.compile(optimizer=tf.keras.optimizers.Adam(
        learning_rate=args.learning_rate, global_clipnorm=model.GLOBAL_CLIPNORM))
    # Slots now, not at the first step: a resumed run restores them even when no step is left to run.
    model.optimizer.build(model.trainable_variables)
  callbacks = [
      _StopOnNaN(),
      # Saves model and optimizer state at every epoch end and restores them on the next run, so an
      # interrupted command resumes where its last finished epoch left off.
      tf.keras.callbacks.BackupAndRestore(os.path.join(model_dir, BACKUP), delete_checkpoint=False),
      tf.keras.callbacks.TensorBoard(os.path.join(model_dir, LOGS), write_graph=False,
                                     update_freq="epoch"),
  ]
  log.info("training %s (lambda %g) into %s: %d epochs x %d steps, batch %d, patch %d",
           model_config["codec"], model_config["lambda"], model_dir, args.epochs,
           args.steps_per_epoch, args.batch_size, args.patch_size)
  try:
    history = model.fit(train_ds, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                        validation_data=val_ds, validation_freq=1, callbacks=callbacks,
                        verbose=args.verbose)
  except _NaNLoss as e:
    epoch, step = e.args
    raise UserError(
        f"loss became NaN at epoch {epoch}, step {step} (lambda {model_config['lambda']}); "
        "the checkpoint of the last finished epoch is kept: lower --learning_rate and rerun") from None
  if not export:
    return history
  fingerprint = codec.export(model, model_dir, model_config)
  log.info("exported %s (weights %s)", os.path.join(model_dir, codec.SAVED_MODEL), fingerprint.hex())
  return history
