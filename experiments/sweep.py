"""The lambda sweep: trains every (model, lambda) pair of a preset into its own model directory.

    python experiments/sweep.py --model all --preset cpu --figure6    # the main job: train, then Figure 6
    python experiments/sweep.py --model bls2017 --preset paper --dataset folder --train_glob 'train2017/*.jpg'
    python experiments/sweep.py --model all --preset paper --shard 0/4      # this machine: jobs 0, 4, 8, ...

Each job runs `python <model>.py train ...` in its own process (the CLI every user runs), so a job
resumes from its checkpoint when rerun, and a finished job (its SavedModel exists and it was trained
with the same flags) is skipped. Presets live in experiments/presets.json. Directories go through
tf.io.gfile, so --models_dir can be on shared or cloud storage, and --shard splits the jobs across
machines; --distribute hands a tf.distribute strategy to every job.

Warm start (default; --cold turns it off for the papers' protocol): for each model, the preset's
`warm_start_anchor` lambda (else the middle one) is trained from scratch, then its neighbours
outwards, each initialised from the nearest finished lambda of the same model shape
(`train --init_from`) and trained for the preset's `warm_start_fraction` of the epochs at its
`warm_start_learning_rate_scale` of the learning rate: lambdas change the rate-distortion balance,
not what the transforms must learn, so a neighbour's weights are most of the way there. With
--shard, a job whose neighbour is not finished yet (on another machine) starts cold.

Parallel jobs (--jobs N; the cpu preset asks for 2): N jobs train at once, each pinned to its own
share of the cores, and a warm-started job waits for the neighbour it starts from. On 2 CPU cores
one cpu-preset training step does not keep both cores busy: two single-core jobs side by side
make 17-42 % more steps per second in all than one job on both cores (README, "Experiments").
Their output lines are prefixed with the model and lambda. On a GPU they share it, each growing
its memory as it needs (TF_FORCE_GPU_ALLOW_GROWTH); --jobs 1 runs one job at a time.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
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


def scale_epochs(preset, scale):
  """A copy of `preset` in which every model trains `scale` times its epochs and its finish_epochs
  (rounded, at least 1); warm jobs then take their fraction of those. For a machine slower or
  faster than the one the preset was timed on, or a quick look (README, "Experiments": the cpu
  preset's epochs are 0.75 of those it had until 2026-12-07, measured both ways)."""
  if scale == 1:
    return preset
  train = dict(preset["train"])
  if "epochs" not in train:
    raise ValueError("--epochs_scale needs a preset that gives its epochs")

  def scaled(epochs):
    return max(1, round(epochs * scale))

  for key in ("epochs", "finish_epochs"):
    if key in train:
      value = train[key]
      train[key] = {m: scaled(v) for m, v in value.items()} if isinstance(value, dict) else scaled(value)
  return dict(preset, train=train)


def job_dir(models_dir, model, lmbda):
  return f"{models_dir.rstrip('/')}/{model}-lambda{lmbda:g}"


def train_argv(preset, model, lmbda, overrides):
  """The `<model>.py train` flags of one job."""
  flags = dict(preset["train"])
  flags.update({k: v for k, v in overrides.items() if v is not None})
  argv = ["--lambda", f"{lmbda:g}"]
  for key, value in sorted(flags.items()):
    if isinstance(value, dict):
      if model not in value:  # a flag for some models only: the others keep its default
        continue
      value = value[model]
    argv += [f"--{key}", str(value)]
  return argv + model_flags(preset, model, lmbda)


def model_flags(preset, model, lmbda):
  flags = preset["models"][model]
  high = preset.get("high_rate")
  if high and lmbda >= high["from_lambda"] and model in high["models"]:
    flags = high["models"][model]
  return list(flags)


def warm_argv(argv, preset, model, source):
  """`argv` of a job started from the model in `source`, for the preset's fraction of the epochs
  and at its `warm_start_learning_rate_scale` of the learning rate."""
  argv = list(argv)
  epochs = int(argv[argv.index("--epochs") + 1])  # as train_argv resolved it for this model
  argv[argv.index("--epochs") + 1] = str(max(1, round(epochs * preset.get("warm_start_fraction", 1.0))))
  scale = preset.get("warm_start_learning_rate_scale", 1.0)
  scale = scale[model] if isinstance(scale, dict) else scale
  if scale != 1.0:
    # A trained model sits in a narrow valley: fine-tuned at the peak rate that trained it from
    # scratch, hcae at lambda 0.05 blew up within 25 steps of reaching it (README, "Experiments").
    if "--learning_rate" not in argv:
      raise ValueError("a preset with warm_start_learning_rate_scale must give its learning_rate")
    rate = float(argv[argv.index("--learning_rate") + 1])
    argv[argv.index("--learning_rate") + 1] = f"{rate * scale:g}"
  return argv + ["--init_from", source]


def warm_order(lambdas, anchor=None):
  """`anchor` first (default, or when it is not among `lambdas`: the middle lambda), then outwards,
  alternating above and below: every lambda after the first has a finished neighbour to start from."""
  ordered = sorted(lambdas)
  middle = ordered.index(anchor) if anchor in ordered else (len(ordered) - 1) // 2
  out = [ordered[middle]]
  for step in range(1, len(ordered)):
    for i in (middle + step, middle - step):
      if 0 <= i < len(ordered):
        out.append(ordered[i])
  return out


def warm_source(models_dir, preset, model, lmbda, lambdas):
  """The directory of the finished job of `model` nearest to `lmbda` (in log lambda) with the same
  model flags, or None."""
  import math
  candidates = [(abs(math.log(other / lmbda)), other) for other in lambdas
                if other != lmbda and model_flags(preset, model, other) == model_flags(preset, model, lmbda)
                and is_finished(job_dir(models_dir, model, other))]
  return job_dir(models_dir, model, min(candidates)[1]) if candidates else None


def plan(todo, preset, warm):
  """For each job of `todo`, the index of the job it waits for, or None: with warm start, the
  neighbour it will start from (the nearest lambda in log lambda, of the same model and shape,
  earlier in `todo`), which the sequential sweep has finished by then."""
  import math
  waits = []
  for i, (model, lmbda) in enumerate(todo):
    earlier = [(abs(math.log(other / lmbda)), j) for j, (m, other) in enumerate(todo[:i])
               if m == model and model_flags(preset, m, other) == model_flags(preset, model, lmbda)]
    waits.append(min(earlier)[1] if warm and earlier else None)
  return waits


def chain_lengths(waits):
  """For each job of a plan, the length of the longest chain of jobs waiting on it, one after the
  other (0: none waits for it)."""
  below = [0] * len(waits)
  for i in reversed(range(len(waits))):  # a job only ever waits for an earlier one
    if waits[i] is not None:
      below[waits[i]] = max(below[waits[i]], below[i] + 1)
  return below


def job_epochs(todo, waits, preset, overrides):
  """The epochs each job of a plan trains for (a warm one: its preset's share of the model's)."""
  epochs = []
  for (model, lmbda), wait in zip(todo, waits):
    argv = train_argv(preset, model, lmbda, overrides)
    if "--epochs" not in argv:  # every job at the script's default
      epochs.append(0)
      continue
    if wait is not None:
      argv = warm_argv(argv, preset, model, "")
    epochs.append(int(argv[argv.index("--epochs") + 1]))
  return epochs


def next_job(ready, waits, chains, epochs=None):
  """Which of the `ready` jobs to start. Cold jobs first: they are the longest, and every warm job
  waits for one. Then the one with the longest chain waiting on it (chain_lengths): started last,
  such a chain runs alone at the end while the other cores idle. Then the one with the most epochs
  (`epochs`, job_epochs): the cpu preset's hcae and bmshj2018 anchors take about 30 minutes,
  bls2017's 12; started after bls2017's, one of them ran on alone (sweep-cpu-s20, 2026-12-07)."""
  epochs = epochs or [0] * len(waits)
  return min(ready, key=lambda j: (waits[j] is not None, -chains[j], -epochs[j], j))


def core_sets(jobs):
  """The cores each of `jobs` parallel jobs is pinned to: contiguous, equal shares of this
  process's cores; [None] * jobs where affinity cannot be set (no pinning)."""
  if jobs == 1 or not hasattr(os, "sched_getaffinity"):
    return [None] * jobs
  cores = sorted(os.sched_getaffinity(0))
  if jobs > len(cores):
    print(f"--jobs {jobs} on {len(cores)} cores: running {len(cores)} at once", flush=True)
    jobs = len(cores)
  return [set(cores[k * len(cores) // jobs:(k + 1) * len(cores) // jobs]) for k in range(jobs)]


def start_job(command, cores, prefix):
  """Starts `command`, pinned to `cores` (None: not pinned), its output lines prefixed with
  `prefix` (None: the job writes to this process's stdout and stderr); returns the process and
  the thread relaying its output (or None)."""
  mine = os.sched_getaffinity(0) if cores else None
  if cores:  # the child inherits the affinity of the thread that starts it: pin this one meanwhile
    os.sched_setaffinity(0, cores)
  try:
    if prefix is None:
      return subprocess.Popen(command), None
    # Jobs side by side on one GPU: each takes the memory it needs, not all of it (TensorFlow's default).
    env = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH=os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "true"))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, env=env)
  finally:
    if cores:
      os.sched_setaffinity(0, mine)
  reader = threading.Thread(target=_relay, args=(process.stdout, prefix), daemon=True)
  reader.start()
  return process, reader


_print_lock = threading.Lock()


def _relay(stream, prefix):
  for line in stream:
    with _print_lock:
      print(f"{prefix} {line}", end="" if line.endswith("\n") else "\n", flush=True)


def parse_shard(text):
  try:
    index, count = (int(v) for v in text.split("/"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--shard takes i/n, e.g. 0/4, not {text!r}") from None
  if not 0 <= index < count:
    raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
  return index, count


def jobs(models, lambdas, shard, warm=False, anchor=None):
  every = [(m, l) for m in models for l in (warm_order(lambdas, anchor) if warm else lambdas)]
  index, count = shard
  return [job for i, job in enumerate(every) if i % count == index]


def is_finished(directory):
  import tensorflow as tf
  return (tf.io.gfile.exists(f"{directory}/{DONE}")
          and tf.io.gfile.exists(f"{directory}/saved_model/saved_model.pb"))


def is_done(directory, argv):
  """Finished, with these flags."""
  import tensorflow as tf
  if not is_finished(directory):
    return False
  with tf.io.gfile.GFile(f"{directory}/{DONE}") as f:
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
  parser.add_argument("--figure6", action="store_true",
                      help="then run experiments/figure6.py on the models and the built-in eval photos, "
                      "writing into --output_dir")
  parser.add_argument("--output_dir", help="with --figure6: where the results go (default: results/sweep-PRESET)")
  parser.add_argument("--cold", action="store_true",
                      help="train every lambda from scratch for all its epochs (the papers' protocol; "
                      "default: warm start from the nearest finished lambda, see above)")
  parser.add_argument("--epochs_scale", type=float, default=1.0,
                      help="train every job for this many times the preset's epochs (and finish "
                      "epochs), rounded: < 1 for a slower machine or a quick look (default 1; the "
                      "default directories get the suffix -xSCALE)")
  parser.add_argument("--jobs", type=int,
                      help="jobs trained at once, each pinned to its own share of the CPU cores "
                      "(default: the preset's 'jobs', else 1; see above)")
  args = parser.parse_args(argv)
  presets = load_presets()
  if args.preset not in presets:
    parser.error(f"unknown preset {args.preset!r}; choose one of {', '.join(presets)}")
  if args.epochs_scale <= 0:
    parser.error(f"--epochs_scale must be positive, not {args.epochs_scale:g}")
  try:
    preset = scale_epochs(presets[args.preset], args.epochs_scale)
  except ValueError as e:
    parser.error(str(e))
  suffix = f"-x{args.epochs_scale:g}" if args.epochs_scale != 1 else ""
  try:
    lambdas = ([float(v) for v in args.lambdas.split(",")] if args.lambdas else preset["lambdas"])
  except ValueError:
    parser.error(f"--lambdas takes comma-separated numbers, not {args.lambdas!r}")
  if min(lambdas) <= 0:
    parser.error("lambdas must be positive")
  jobs_at_once = args.jobs if args.jobs is not None else preset.get("jobs", 1)
  if jobs_at_once < 1:
    parser.error(f"--jobs must be 1 or more, not {jobs_at_once}")
  models = MODELS if args.model == "all" else (args.model,)
  models_dir = args.models_dir or os.path.join("models", f"sweep-{args.preset}{suffix}")
  overrides = dict(dataset=args.dataset, train_glob=args.train_glob, data_dir=args.data_dir,
                   distribute=args.distribute, verbose=args.verbose)
  warm = not args.cold and preset.get("warm_start_fraction") is not None
  todo = jobs(models, lambdas, args.shard, warm, preset.get("warm_start_anchor"))
  start = time.time()
  slots = core_sets(min(jobs_at_once, max(len(todo), 1)))
  at_once = f", {len(slots)} at once" if len(slots) > 1 else ""
  print(f"sweep {args.preset}: {len(todo)} jobs into {models_dir}{at_once}", flush=True)
  status = run_jobs(todo, plan(todo, preset, warm), slots, preset, lambdas, models_dir, overrides, warm)
  if status:
    return status
  print(f"sweep {args.preset} finished in {time.time() - start:.0f} s ({(time.time() - start) / 60:.1f} min)",
        flush=True)
  if args.figure6:
    import figure6
    output_dir = args.output_dir or os.path.join("results", f"sweep-{args.preset}{suffix}")
    status = figure6.main(["--models_dir", models_dir, "--output_dir", output_dir])
    print(f"sweep and Figure 6 took {time.time() - start:.0f} s ({(time.time() - start) / 60:.1f} min) "
          "in all", flush=True)
    return status
  return 0


def run_jobs(todo, waits, slots, preset, lambdas, models_dir, overrides, warm):
  """Trains the jobs of `todo`, len(slots) at a time, each job once the one it waits for is done.

  A failed job stops new starts; the running ones finish (their work is kept), then its exit
  status is returned. Ctrl-C stops every job after its current step with its checkpoint saved.
  """
  pending, running, finished, failure = list(range(len(todo))), {}, set(), 0
  free = list(slots)
  chains, epochs = chain_lengths(waits), job_epochs(todo, waits, preset, overrides)
  try:
    while pending or running:
      while free and not failure:
        ready = [i for i in pending if waits[i] is None or waits[i] in finished]
        if not ready:
          break
        i = next_job(ready, waits, chains, epochs)
        pending.remove(i)
        started = _start(i, todo, free[0], len(slots) > 1, preset, lambdas, models_dir, overrides, warm)
        if started is None:  # finished before: what waits for it may start now
          finished.add(i)
        else:
          running[i] = (*started, free.pop(0))
      if not running:  # all done, or a failure left jobs that cannot start
        break
      time.sleep(0.2)
      for i, (process, reader, argv, directory, job_start, cores) in list(running.items()):
        if process.poll() is None:
          continue
        if reader is not None:
          reader.join()
        del running[i]
        free.append(cores)
        model, lmbda = todo[i]
        if process.returncode:
          print(f"error: {model} lambda {lmbda:g} failed (exit {process.returncode}); rerun to resume it",
                file=sys.stderr, flush=True)
          failure = failure or process.returncode
          continue
        seconds = time.time() - job_start
        mark_done(directory, argv, seconds)
        finished.add(i)
        print(f"[{i + 1}/{len(todo)}] {model} lambda {lmbda:g}: done in {seconds:.0f} s", flush=True)
  except KeyboardInterrupt:
    for process, *_ in running.values():  # each saves its checkpoint at the end of its step
      process.wait()
    return 130
  assert failure or not pending, "a job waits for one that is neither done nor failed"
  return failure


def _start(i, todo, cores, prefixed, preset, lambdas, models_dir, overrides, warm):
  """Starts job i; returns (process, reader, argv, directory, start time), or None when the job
  finished before with the same flags."""
  model, lmbda = todo[i]
  directory = job_dir(models_dir, model, lmbda)
  argv = train_argv(preset, model, lmbda, overrides) + ["--model_path", directory]
  skipped = f"[{i + 1}/{len(todo)}] {model} lambda {lmbda:g}: finished before, skipped"
  if is_done(directory, argv):
    print(skipped, flush=True)
    return None
  source = warm_source(models_dir, preset, model, lmbda, lambdas) if warm else None
  if source:
    argv = warm_argv(argv, preset, model, source)
  if is_done(directory, argv):
    print(skipped, flush=True)
    return None
  start_from = f"from {source}, {argv[argv.index('--epochs') + 1]} epochs" if source else "from scratch"
  on = f" on core{'s' if len(cores) > 1 else ''} {','.join(map(str, sorted(cores)))}" if cores else ""
  print(f"[{i + 1}/{len(todo)}] {model} lambda {lmbda:g}: training {start_from}{on} into {directory}", flush=True)
  command = [sys.executable, os.path.join(ROOT, f"{model}.py"), "train", *argv]
  process, reader = start_job(command, cores, f"[{model} {lmbda:g}]" if prefixed else None)
  return process, reader, argv, directory, time.time()


if __name__ == "__main__":
  sys.exit(main())
