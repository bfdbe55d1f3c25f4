"""The lambda sweep: trains every (model, lambda) pair of a preset into its own model directory.

    python experiments/sweep.py --model all --preset cpu
    python experiments/sweep.py --model bls2017 --preset paper --dataset folder --train_glob 'train2017/*.jpg'
    python experiments/sweep.py --model all --preset paper --shard 0/4      # this machine: jobs 0, 4, 8, ...

Each job runs `python <model>.py train ...` in its own process (the CLI every user runs), so a job
resumes from its checkpoint when rerun, and a finished job (its SavedModel exists and it was trained
with the same flags) is skipped. Presets live in experiments/presets.json. Directories go through
tf.io.gfile, so --models_dir can be on shared or cloud storage, and --shard splits the jobs across
machines; --distribute hands a tf.distribute strategy to every job.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402,F401  (quiets TensorFlow's start-up logs when a job directory is checked)

MODELS = ("bls2017", "bmshj2018", "hcae")
PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets.json")
DONE = "sweep_done.json"


def load_presets(path=PRESETS):
  with open(path) as f:
    return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def job_dir(models_dir, model, lmbda):
  return f"{models_dir.rstrip('/')}/{model}-lambda{lmbda:g}"


def train_argv(preset, model, lmbda, overrides):
  """The `<model>.py train` flags of one job."""
  flags = dict(preset["train"])
  flags.update({k: v for k, v in overrides.items() if v is not None})
  argv = ["--lambda", f"{lmbda:g}"]
  for key, value in sorted(flags.items()):
    if isinstance(value, dict):
      value = value[model]
    argv += [f"--{key}", str(value)]
  model_flags = preset["models"][model]
  high = preset.get("high_rate")
  if high and lmbda >= high["from_lambda"] and model in high["models"]:
    model_flags = high["models"][model]
  return argv + list(model_flags)


def parse_shard(text):
  try:
    index, count = (int(v) for v in text.split("/"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--shard takes i/n, e.g. 0/4, not {text!r}") from None
  if not 0 <= index < count:
    raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
  return index, count


def jobs(models, lambdas, shard):
  every = [(m, l) for m in models for l in lambdas]
  index, count = shard
  return [job for i, job in enumerate(every) if i % count == index]


def is_done(directory, argv):
  import tensorflow as tf
  marker = f"{directory}/{DONE}"
  if not tf.io.gfile.exists(marker) or not tf.io.gfile.exists(f"{directory}/saved_model/saved_model.pb"):
    return False
  with tf.io.gfile.GFile(marker) as f:
    return json.load(f).get("argv") == argv


def mark_done(directory, argv, seconds):
  import tensorflow as tf
  with tf.io.gfile.GFile(f"{directory}/{DONE}", "w") as f:
    json.dump(dict(argv=argv, seconds=round(seconds, 1)), f, indent=1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=MODELS + ("all",), default="all")
  parser.add_argument("--preset", default="cpu", help="smoke, cpu or paper (experiments/presets.json)")
  parser.add_argument("--lambdas", help="comma-separated lambdas instead of the preset's")
  parser.add_argument("--models_dir", help="where the job directories go (default: models/sweep-PRESET)")
  parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="run jobs i, i+n, i+2n, ... (i/n)")
  parser.add_argument("--distribute", choices=("auto", "mirrored", "multiworker"),
                      help="tf.distribute strategy for every job (see `bls2017.py train --help`)")
  parser.add_argument("--dataset", choices=("builtin", "folder", "coco"), help="override the preset's data")
  parser.add_argument("--train_glob", help="with --dataset folder")
  parser.add_argument("--data_dir", help="with --dataset coco")
  parser.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2), help="Keras verbosity of the jobs")
  args = parser.parse_args(argv)
  presets = load_presets()
  if args.preset not in presets:
    parser.error(f"unknown preset {args.preset!r}; choose one of {', '.join(presets)}")
  preset = presets[args.preset]
  try:
    lambdas = ([float(v) for v in args.lambdas.split(",")] if args.lambdas else preset["lambdas"])
  except ValueError:
    parser.error(f"--lambdas takes comma-separated numbers, not {args.lambdas!r}")
  if min(lambdas) <= 0:
    parser.error("lambdas must be positive")
  models = MODELS if args.model == "all" else (args.model,)
  models_dir = args.models_dir or os.path.join("models", f"sweep-{args.preset}")
  overrides = dict(dataset=args.dataset, train_glob=args.train_glob, data_dir=args.data_dir,
                   distribute=args.distribute, verbose=args.verbose)
  todo = jobs(models, lambdas, args.shard)
  start = time.time()
  print(f"sweep {args.preset}: {len(todo)} jobs into {models_dir}", flush=True)
  for i, (model, lmbda) in enumerate(todo):
    directory = job_dir(models_dir, model, lmbda)
    argv = train_argv(preset, model, lmbda, overrides) + ["--model_path", directory]
    if is_done(directory, argv):
      print(f"[{i + 1}/{len(todo)}] {model} lambda {lmbda:g}: finished before, skipped", flush=True)
      continue
    print(f"[{i + 1}/{len(todo)}] {model} lambda {lmbda:g}: training into {directory}", flush=True)
    job_start = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, f"{model}.py"), "train", *argv])
    if result.returncode:
      print(f"error: {model} lambda {lmbda:g} failed (exit {result.returncode}); rerun to resume it",
            file=sys.stderr)
      return result.returncode
    seconds = time.time() - job_start
    mark_done(directory, argv, seconds)
    print(f"[{i + 1}/{len(todo)}] {model} lambda {lmbda:g}: done in {seconds:.0f} s", flush=True)
  print(f"sweep {args.preset} finished in {time.time() - start:.0f} s ({(time.time() - start) / 60:.1f} min)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
