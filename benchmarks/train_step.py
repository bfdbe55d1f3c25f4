"""Median training-step time of a codec model on the built-in photos.

    python benchmarks/train_step.py --model bls2017 --num_filters 128 --patch_size 256 --batch_size 8

Times the steps of a real Keras fit (data pipeline included) after a warm-up, on whatever device
TensorFlow picks. Run it by hand on an idle machine; it is never a test.
"""
import argparse
import importlib
import json
import os
import platform
import statistics
import sys
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="bls2017", help="model script (bls2017, bmshj2018, hcae)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
  parser.add_argument("--json", help="also write the result here")
  known, rest = parser.parse_known_args(argv)
  script = importlib.import_module(known.model)
  model_parser, _ = cli.build_parser(known.model, script.add_model_flags)
  args = model_parser.parse_args(["train", *rest])
  ds = data.train_dataset(args.dataset, args.patch_size, args.batch_size, train_glob=args.train_glob)
  model = script.build_model(args)
  model.quantization = args.quantization
  # The optimizer of a real run: the recipe's schedule and gradient clipping.
  model.compile(optimizer=training.make_optimizer(args, 1000, model))
  timer = _StepTimer()
  model.fit(ds, epochs=1, steps_per_epoch=known.warmup + known.steps, callbacks=[timer], verbose=0)
  times = timer.times[known.warmup:]
  result = dict(model=known.model, num_filters=getattr(args, "num_filters", None),
                patch_size=args.patch_size, batch_size=args.batch_size, steps=len(times),
                median_step_s=statistics.median(times), min_step_s=min(times),
                images_per_s=args.batch_size / statistics.median(times),
                device=("GPU" if tf.config.list_logical_devices("GPU") else "CPU"),
                cpu_count=os.cpu_count(), machine=platform.machine(), tensorflow=tf.__version__)
  print(json.dumps(result, indent=1))
  if known.json:
    with open(known.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
