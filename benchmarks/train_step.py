"""Median training-step time of a codec model on the built-in photos.

    python benchmarks/train_step.py --model bls2017 --num_filters 128 --patch_size 256 --batch_size 8
    python benchmarks/train_step.py --model bmshj2018 --num_filters 192 --latent_depth 192 --profile

Times the steps of a real Keras fit (data pipeline included) after a warm-up, on whatever device
TensorFlow picks. --profile then runs --profile_steps more steps under TensorFlow's profiler and
prints where a step's time goes: the CPU kernels' time per step by op type (summed over threads,
so with inter-op parallelism it can exceed the wall time), forward and backward apart; on a GPU
this table holds only the ops that ran on the host. Run it by hand on an idle machine; it is
never a test.
"""
import argparse
import collections
import glob
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402,F401  (quiets TensorFlow start-up logs)
import tensorflow as tf  # noqa: E402

from utils import cli, data, training  # noqa: E402


class _StepTimer(tf.keras.callbacks.Callback):
  def __init__(self):
    super().__init__()
    self.times = []

  def on_train_batch_begin(self, batch, logs=None):
    self._start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    float(logs["loss"])  # wait for the step to finish
    self.times.append(time.perf_counter() - self._start)


# Profiler events that are not kernels: the executor's and the runtime's own spans.
_NOT_KERNELS = ("ExecutorState", "EagerExecute", "EagerKernelExecute", "KernelAndDevice", "TFE_",
                "Iterator", "FunctionRun", "EagerLocalExecute", "ThreadpoolListener")


def kernel_times(xspace_path, steps):
  """{(op type, "forward"/"backward"): [milliseconds per step, kernel launches per step]} from a
  profiler trace: the host's compute threads' events, named "<node name>:<op type>"."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  with open(xspace_path, "rb") as f:
    space.ParseFromString(f.read())
  totals = collections.defaultdict(lambda: [0.0, 0.0])
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_Compute"):
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if ":" not in name or name.startswith(_NOT_KERNELS):
          continue
        node, op = name.rsplit(":", 1)
        key = (op.replace("_MklNative", "").replace("_Mkl", ""),
               "backward" if "gradient" in node.lower() else "forward")
        totals[key][0] += event.duration_ps / 1e9 / steps
        totals[key][1] += 1 / steps
  return totals


def profile(model, ds, steps):
  """Runs `steps` more training steps under the profiler; prints and returns the kernel times."""
  with tempfile.TemporaryDirectory() as logdir:
    tf.profiler.experimental.start(logdir)
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    tf.profiler.experimental.stop()
    paths = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    totals = kernel_times(paths[0], steps)
  total = sum(ms for ms, _ in totals.values())
  print(f"kernel time per step: {total:.0f} ms (summed over threads)")
  print(f"{'op':32s} {'pass':9s} {'ms/step':>9s} {'share':>6s} {'calls':>6s}")
  rows = sorted(totals.items(), key=lambda item: -item[1][0])
  for (op, kind), (ms, calls) in rows:
    if ms >= 0.005 * total:
      print(f"{op:32s} {kind:9s} {ms:9.1f} {100 * ms / total:5.1f}% {calls:6.0f}")
  return [dict(op=op, kind=kind, ms_per_step=ms, calls_per_step=calls) for (op, kind), (ms, calls) in rows]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="bls2017", help="model script (bls2017, bmshj2018, hcae)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
  parser.add_argument("--json", help="also write the result here")
  parser.add_argument("--profile", action="store_true",
                      help="then profile --profile_steps more steps: kernel time by op type")
  parser.add_argument("--profile_steps", type=int, default=3, help="steps profiled with --profile")
  known, rest = parser.parse_known_args(argv)
  training.pool_cpu_memory()  # as `train` does (TF_CPU_ALLOCATOR_USE_BFC=false: malloc)
  script = importlib.import_module(known.model)
  model_parser, _ = cli.build_parser(known.model, script.add_model_flags)
  args = model_parser.parse_args(["train", *rest])
  ds = data.train_dataset(args.dataset, args.patch_size, args.batch_size, train_glob=args.train_glob)
  model = script.build_model(args)
  model.quantization = args.quantization
  # The optimizer of a real run: the recipe's schedule and gradient clipping.
  model.compile(optimizer=training.make_optimizer(args, 1000, model))
  timer = _StepTimer()
  with training.training_precision(args.precision):
    model.fit(ds, epochs=1, steps_per_epoch=known.warmup + known.steps, callbacks=[timer], verbose=0)
  times = timer.times[known.warmup:]
  result = dict(model=known.model, num_filters=getattr(args, "num_filters", None),
                patch_size=args.patch_size, batch_size=args.batch_size,
                precision=training.resolve_precision(args.precision), steps=len(times),
                median_step_s=statistics.median(times), min_step_s=min(times),
                images_per_s=args.batch_size / statistics.median(times),
                device=("GPU" if tf.config.list_logical_devices("GPU") else "CPU"),
                cpu_count=os.cpu_count(), machine=platform.machine(), tensorflow=tf.__version__)
  print(json.dumps(result, indent=1))
  if known.profile:
    with training.training_precision(args.precision):
      result["kernels"] = profile(model, ds, known.profile_steps)
  if known.json:
    with open(known.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
