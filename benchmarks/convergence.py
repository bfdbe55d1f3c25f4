"""Rate-distortion per CPU-minute: trains a codec for a wall-clock budget and, at checkpoints along
the way, codes the built-in eval photos into real files and compares them with Pillow's JPEG.

    python benchmarks/convergence.py --model bls2017 --minutes 20                # the suite's recipe
    python benchmarks/convergence.py --model bls2017 --minutes 20 --baseline     # the papers' recipe
    python benchmarks/convergence.py --model bmshj2018 --minutes 30 -- --lambda 0.05

Model and training flags default to the `cpu` preset of experiments/presets.json at --lambda 0.015;
anything after `--` is passed to `<model>.py train` and overrides them. --baseline trains with
tensorflow-compression's recipe instead: Adam at a constant 1e-4, uniform noise, no clipping.

The budget counts training steps only: the step count is set from a probe (the mean step of at
least 40 steps and PROBE_SECONDS, or a tenth of the budget if less: a run of 40 came out up to
13 % fast, the steps' pace swinging by a fifth from one hundred to the next) so the learning rate
schedule ends with the budget, and the evaluations (untimed) run between chunks of steps. A
preset or flags with --finish_epochs K of --epochs E train the last K/E of the steps on the larger
crops of that stage, as `train` does (the probe times both crops and weighs them so). A chunk's
minutes run from the end of its first step to the end of its last, plus one step: what a fit pays
before its first step ends is not training (the first one traces the train function, tens of
seconds for hcae, which made its runs end 13-16 % over budget).
At every checkpoint, for each eval image, the model's real file gives (bpp, PSNR), and Pillow JPEG
4:2:0 at qualities 1..95 gives the anchor curve of that image:
  rate vs JPEG   bpp / (JPEG's bpp at the same PSNR) - 1, geometric mean over the images: the
                 Bjontegaard delta rate of one point (negative: fewer bits than JPEG)
  dB vs JPEG     PSNR - (JPEG's PSNR at the same bpp), mean over the images
Each run writes results/convergence/<model>-<label>.json; the plot results/convergence/convergence.png
shows every run in that directory. A run whose loss or weights stop being finite ends at that
checkpoint, is marked "diverged" in its JSON and exits with status 1. Run it on an otherwise idle
machine; it is never a test.
"""
import argparse
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402,F401  (quiets TensorFlow start-up logs)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from utils import cli, codec, data, metrics, rd, training  # noqa: E402

JPEG_QUALITIES = (1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)
BASELINE = ["--lr_schedule", "constant", "--learning_rate", "1e-4", "--quantization", "noise",
            "--clipnorm", "0"]


PROBE_SECONDS = 30


def preset_argv(model, preset):
  """The train flags of `model` in an experiments/presets.json preset, at lambda 0.015."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import sweep
  argv = sweep.train_argv(sweep.load_presets()[preset], model, 0.015, {})
  # Steps come from the budget here; --epochs stays, as the denominator of --finish_epochs.
  drop = {"--steps_per_epoch"}
  return [a for i, a in enumerate(argv) if a not in drop and (i == 0 or argv[i - 1] not in drop)]


def jpeg_anchor(images):
  """Per image: the (bpp, PSNR) points of Pillow JPEG 4:2:0."""
  import jpeg_baseline
  curves = []
  for image in images:
    curve = []
    for quality in JPEG_QUALITIES:
      encoded, decoded = jpeg_baseline.pillow_code(image, "jpeg", quality)
      curve.append((metrics.bpp(len(encoded), *image.shape[:2]), metrics.psnr(image, decoded)))
    curves.append(curve)
  return curves


def evaluate(script, args, config, weights_path, images, anchors):
  """Codes every image through a real file with a copy of the model at `weights_path`."""
  model = script.build_model(args)
  model(tf.zeros((1, model.DOWNSAMPLING, model.DOWNSAMPLING, 3)))
  tf.train.Checkpoint(model=model).read(weights_path).expect_partial()
  coder = codec.Codec.from_model(model, config)
  rows = []
  for image, anchor in zip(images, anchors):
    encoded, bits = coder.encode(image)
    decoded = coder.decode(encoded)
    bpp = metrics.bpp(len(encoded), *image.shape[:2])
    psnr = metrics.psnr(image, decoded)
    rows.append(dict(bpp=bpp, psnr=psnr, jpeg_bpp=rd.rate_at_quality(anchor, psnr),
                     jpeg_psnr=rd.quality_at_rate(anchor, bpp)))
  log_ratios = [math.log(r["bpp"] / r["jpeg_bpp"]) for r in rows if not math.isnan(r["jpeg_bpp"])]
  gains = [r["psnr"] - r["jpeg_psnr"] for r in rows if not math.isnan(r["jpeg_psnr"])]
  return dict(bpp=float(np.mean([r["bpp"] for r in rows])), psnr=float(np.mean([r["psnr"] for r in rows])),
              rate_vs_jpeg=(100 * (math.exp(np.mean(log_ratios)) - 1) if log_ratios else math.nan),
              db_vs_jpeg=(float(np.mean(gains)) if gains else math.nan), images=rows)


class StepClock(tf.keras.callbacks.Callback):
  """Training seconds of one fit: its steps from the end of the first to the end of the last,
  scaled by n / (n - 1) to count the first step at the pace of the others."""

  def on_train_begin(self, logs=None):
    self.ends = []

  def on_train_batch_end(self, batch, logs=None):
    float(logs["loss"])  # wait for the step to finish
    self.ends.append(time.perf_counter())

  def seconds(self, wall):
    """The steps' seconds, or `wall` (the fit's whole time) for a fit of a single step."""
    if len(self.ends) < 2:
      return wall
    return (self.ends[-1] - self.ends[0]) * len(self.ends) / (len(self.ends) - 1)


class _StopAfter(StepClock):
  """A StepClock that ends the fit once `steps` steps after the first `warmup` took `seconds`."""

  def __init__(self, warmup, steps, seconds):
    super().__init__()
    self.warmup, self.steps, self.limit = warmup, steps, seconds

  def on_train_batch_end(self, batch, logs=None):
    super().on_train_batch_end(batch, logs)
    timed = len(self.ends) - self.warmup
    if timed >= self.steps and self.ends[-1] - self.ends[self.warmup - 1] >= self.limit:
      self.model.stop_training = True


def probe_step_time(script, args, dataset, steps=40, warmup=5, seconds=PROBE_SECONDS):
  """Mean seconds of a training step on the batches of `dataset`, on a throwaway copy of the model.

  The mean of a run of consecutive steps, end to end, at least `steps` and at least `seconds`
  long: a budget pays for the slow steps too; a median of a few steps came out up to a fifth below
  what the real runs then took, a mean of 40 up to 13 % below.
  """
  model = script.build_model(args)
  model.quantization = args.quantization
  model.compile(optimizer=training.make_optimizer(args, 1000, model))
  clock = _StopAfter(warmup, steps, seconds)
  with training.training_precision(args.precision):
    model.fit(dataset, epochs=1, steps_per_epoch=10 ** 9, callbacks=[clock], verbose=0)
  return (clock.ends[-1] - clock.ends[warmup - 1]) / (len(clock.ends) - warmup)


def finite(loss, model):
  """Whether training is still numerically sound: a finite loss and finite weights."""
  return math.isfinite(loss) and all(bool(np.isfinite(v.numpy()).all()) for v in model.weights)


def plot(directory):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = []
  for name in sorted(os.listdir(directory)):
    if name.endswith(".json"):
      with open(os.path.join(directory, name)) as f:
        runs.append(json.load(f))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for run in runs:
    minutes = [c["minutes"] for c in run["checkpoints"]]
    label = f"{run['model']} {run['label']} (lambda {run['lambda']:g})"
    axes[0].plot(minutes, [c["db_vs_jpeg"] for c in run["checkpoints"]], "o-", label=label)
    axes[1].plot(minutes, [c["rate_vs_jpeg"] for c in run["checkpoints"]], "o-", label=label)
  for ax, title in zip(axes, ("PSNR - JPEG's PSNR at the same bpp (dB)",
                              "bits vs JPEG at the same PSNR (%)")):
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("training minutes (2 CPU cores)" if os.cpu_count() == 2 else "training minutes")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(directory, "convergence.png")
  fig.savefig(path, dpi=110)
  return path


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  rest = []
  if "--" in argv:
    argv, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="bls2017", choices=("bls2017", "bmshj2018", "hcae"))
  parser.add_argument("--minutes", type=float, default=20, help="training budget (wall clock)")
  parser.add_argument("--eval_every", type=float, default=2, help="minutes of training between checkpoints")
  parser.add_argument("--baseline", action="store_true", help="tensorflow-compression's recipe: " + " ".join(BASELINE))
  parser.add_argument("--preset", default="cpu", help="experiments/presets.json preset of the default flags")
  parser.add_argument("--label", help="name of the run (default: recipe or baseline)")
  parser.add_argument("--output_dir", default=os.path.join("results", "convergence"))
  known = parser.parse_args(argv)
  training.pool_cpu_memory()  # as `train` does
  label = known.label or ("baseline" if known.baseline else "recipe")
  script = importlib.import_module(known.model)
  model_parser, model_flags = cli.build_parser(known.model, script.add_model_flags)
  train_argv = ["train"] + preset_argv(known.model, known.preset) + (BASELINE if known.baseline else []) + rest
  args = model_parser.parse_args(train_argv)
  args.steps_per_epoch = 1  # steps come from the budget
  cli.check_train_flags(args, model_flags)
  config = cli.model_config(known.model, args, model_flags)
  finish = training.finish_crops(args)
  share = finish[0] / args.epochs if finish else 0.0

  images = [data.read_image(p) for p in data.eval_paths("builtin")]
  anchors = jpeg_anchor(images)
  # A tenth of the budget at most: a test's budget of seconds is probed by its 40 steps alone.
  probe_s = min(PROBE_SECONDS, known.minutes * 6)
  step_s = small_s = probe_step_time(script, args, training.staged_batches(args, 10 ** 9), seconds=probe_s)
  if finish:
    large_s = probe_step_time(script, args, training.staged_batches(args, 0), seconds=probe_s)
    step_s = (1 - share) * small_s + share * large_s
  total = max(int(known.minutes * 60 / step_s), 1)
  large_steps = round(total * share)
  small_steps = total - large_steps
  checkpoints = max(round(known.minutes / known.eval_every), 1)
  chunk = -(-total // checkpoints)
  probed = (f"{small_s:.3f} s a step, {large_s:.3f} on the finish's crops" if finish
            else f"{step_s:.3f} s a step")
  stage = (f" (the last {large_steps} on {finish[1]}-pixel crops, batch {finish[2]})"
           if finish else "")
  print(f"{known.model} {label}: {' '.join(train_argv[1:])}\nprobe: {probed} -> {total} steps{stage} "
        f"in {known.minutes:g} min, a checkpoint every {chunk} steps", flush=True)

  model = script.build_model(args)
  model.quantization = args.quantization
  model.compile(optimizer=training.make_optimizer(args, total, model))
  result = dict(model=known.model, label=label, argv=train_argv[1:], **{"lambda": args.lmbda},
                probe_step_s=step_s, total_steps=total, checkpoints=[],
                finish=(dict(steps=large_steps, patch_size=finish[1], batch_size=finish[2],
                             probe_step_s=large_s, first_crops_probe_step_s=small_s) if finish else None),
                machine=f"{platform.machine()}, {os.cpu_count()} cores, "
                f"{'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'}", tensorflow=tf.__version__)
  os.makedirs(known.output_dir, exist_ok=True)
  out = os.path.join(known.output_dir, f"{known.model}-{label}.json")
  print(f"{'minutes':>8} {'steps':>6} {'loss':>8} {'bpp':>7} {'PSNR':>7} {'rate vs JPEG':>13} {'dB vs JPEG':>11}")
  trained_s, step, epoch, parity = 0.0, 0, 0, None
  with tempfile.TemporaryDirectory() as tmp:
    while step < total:
      steps = min(chunk, total - step)
      start, clock = time.perf_counter(), StepClock()
      with training.training_precision(args.precision):  # the checkpoints' coding stays float32
        history = model.fit(training.staged_batches(args, small_steps - step), initial_epoch=epoch,
                            epochs=epoch + 1, steps_per_epoch=steps, verbose=0, callbacks=[clock])
      trained_s += clock.seconds(time.perf_counter() - start)
      step, epoch = step + steps, epoch + 1
      loss = float(history.history["loss"][-1])
      if not finite(loss, model):
        # Coding tables cannot be built from non-finite weights: record where it broke and stop.
        result["diverged"] = dict(steps=step, minutes=trained_s / 60, loss=loss)
        with open(out, "w") as f:
          json.dump(result, f, indent=1)
        print(f"diverged: loss {loss} after {step} steps ({trained_s / 60:.2f} training minutes); "
              "lower --learning_rate or keep --clipnorm", flush=True)
        break
      weights = tf.train.Checkpoint(model=model).write(os.path.join(tmp, "weights"))
      point = evaluate(script, args, config, weights, images, anchors)
      point.update(minutes=trained_s / 60, steps=step, loss=loss)
      result["checkpoints"].append(point)
      if parity is None and point["rate_vs_jpeg"] <= 0:
        parity = point["minutes"]
      print(f"{point['minutes']:8.2f} {step:6d} {point['loss']:8.3f} {point['bpp']:7.4f} "
            f"{point['psnr']:7.2f} {point['rate_vs_jpeg']:+12.1f}% {point['db_vs_jpeg']:+10.2f}", flush=True)
      result["jpeg_parity_minutes"] = parity
      with open(out, "w") as f:
        json.dump(result, f, indent=1)
  if "diverged" in result:
    print(f"wrote {out} and {plot(known.output_dir)}")
    return 1
  print(f"JPEG parity (rate vs JPEG <= 0): "
        f"{'after %.1f training minutes' % parity if parity is not None else 'not reached'}")
  print(f"wrote {out} and {plot(known.output_dir)}")


if __name__ == "__main__":
  sys.exit(main())
