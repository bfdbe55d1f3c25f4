"""The suite's speed, in one table: training steps, command-line coding, framing, real vs estimated bits.

    python benchmarks/run.py                  # every neural model, the issue's configurations
    python benchmarks/run.py --quick          # fewer steps and repeats: a few minutes on 2 CPU cores
    python benchmarks/run.py --models bls2017 --json results/benchmark/before.json

For each model:
  train step   median wall time of a training step after warm-up (benchmarks/train_step.py in its own
               process: a real Keras fit, data pipeline included) and images/s, at bls2017 N=128,
               bmshj2018 N=M=192, hcae at its defaults; 256-pixel crops, batch 8
  CLI          wall time of `<model>.py compress` and `<model>.py decompress` of a 768x512 photo, each a
               fresh process as a user runs it (interpreter and TensorFlow start-up, model load,
               coding, file I/O), median of --repeats runs, with the process's peak resident memory
  in-process   the coding alone (utils.codec.Codec.encode / decode, model already loaded), median
  framing      bytes of the file that are not range-coded strings; real file bits vs the entropy
               models' estimate

The CLI needs a trained model of each configuration: one is trained for a few steps into
--models_dir (kept for the next run; coding time does not depend on how well a model is trained).
The table is printed and written as JSON (default results/benchmark/<date-time>.json). Run it on an
otherwise idle machine; it is never a test. Nothing in it is device-specific: on a GPU machine
TensorFlow uses the GPU.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = ("bls2017", "bmshj2018", "hcae")
# The configurations of the targets (tensorflow/compression's reference scripts were timed
# at the same widths).
WIDTHS = {
    "bls2017": ["--num_filters", "128"],
    "bmshj2018": ["--num_filters", "192", "--latent_depth", "192"],
    "hcae": [],
}
# The short training that makes a model to code with.
QUICK_TRAIN = ["--lambda", "0.015", "--patch_size", "64", "--batch_size", "2", "--epochs", "1",
               "--steps_per_epoch", "30", "--verbose", "0"]
IMAGE_SIZE = (512, 768)  # height, width: Kodak's landscape size


def _peak_rss_mib(pid):
  """The process's resident-memory high-water mark so far (VmHWM), in MiB; None once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def run_process(argv, timeout=3600):
  """Runs argv; returns (wall seconds, peak RSS in MiB, exit status, stdout, stderr).

  The peak is the child's VmHWM, read every 20 ms while it runs (its last 20 ms may be missed).
  Not wait4's ru_maxrss: on Linux a child's maxrss starts from this (large, TensorFlow-importing)
  process's, which it was forked from. Where there is no /proc the peak is None.
  """
  start = time.perf_counter()
  peak = None
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT)
    try:
      while process.poll() is None:
        rss = _peak_rss_mib(process.pid)
        if rss is not None:
          peak = max(peak or 0, rss)
        if time.perf_counter() - start > timeout:
          raise TimeoutError(f"{argv[1]} ran for more than {timeout} s")
        time.sleep(0.02)
    except BaseException:
      process.kill()
      raise
    wall = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    return wall, peak, process.returncode, out.read(), err.read()


def check(result, what):
  """`result` of run_process, or the end of this program if the process failed."""
  status, err = result[2], result[4]
  if status != 0:
    sys.exit(f"error: {what} failed with status {status}:\n{err[-2000:]}")
  return result


def test_image(path):
  """A 768x512 photo: the built-in astronaut, resized (the benchmark measures speed, not quality)."""
  from PIL import Image
  from utils import data
  source = [p for p in data.builtin_paths("eval") if "astronaut" in os.path.basename(p)][0]
  image = Image.fromarray(data.read_image(source)).resize(IMAGE_SIZE[::-1], Image.LANCZOS)
  image.save(path)
  return path


def trained_model(model, models_dir):
  """The directory of a briefly trained model of `model` at the benchmark's widths."""
  path = os.path.join(models_dir, model)
  if not os.path.exists(os.path.join(path, "saved_model", "saved_model.pb")):
    print(f"training a {model} model for the CLI benchmark ({' '.join(WIDTHS[model]) or 'defaults'}, "
          "30 steps)", flush=True)
    check(run_process([sys.executable, f"{model}.py", "train", *WIDTHS[model], *QUICK_TRAIN,
                       "--model_path", path]), f"training {model}")
  return path


def train_step(model, args):
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "step.json")
    argv = [sys.executable, "benchmarks/train_step.py", "--model", model, "--json", out,
            "--steps", str(args.steps), "--warmup", str(args.warmup), *WIDTHS[model],
            "--patch_size", "256", "--batch_size", "8", "--precision", args.precision]
    rss = check(run_process(argv), f"the {model} training-step benchmark")[1]
    with open(out) as f:
      result = json.load(f)
  return dict(step_s=result["median_step_s"], images_per_s=result["images_per_s"], train_rss_mib=rss,
              precision=result["precision"])


def cli_coding(model, model_path, image_path, args):
  """Median wall time and peak memory of the compress and decompress commands."""
  with tempfile.TemporaryDirectory() as tmp:
    encoded, decoded = os.path.join(tmp, "image.lic"), os.path.join(tmp, "image.png")
    runs = {"compress": [], "decompress": []}
    for _ in range(args.repeats):
      runs["compress"].append(check(run_process(
          [sys.executable, f"{model}.py", "compress", image_path, encoded, "--overwrite",
           "--model_path", model_path]), f"{model}.py compress"))
      runs["decompress"].append(check(run_process(
          [sys.executable, f"{model}.py", "decompress", encoded, decoded, "--overwrite",
           "--model_path", model_path]), f"{model}.py decompress"))
  result = {}
  for command, results in runs.items():
    result[f"cli_{command}_s"] = statistics.median(r[0] for r in results)
    peaks = [r[1] for r in results if r[1] is not None]
    result[f"cli_{command}_rss_mib"] = max(peaks) if peaks else None
  return result


def in_process_coding(model_path, image_path, args):
  """Coding time with the model loaded, framing bytes and real vs estimated bits (in this process)."""
  from utils import bitstream, codec, data, metrics
  coder = codec.Codec(model_path)
  image = data.read_image(image_path)
  encode, decode = [], []
  for _ in range(args.repeats + 1):  # the first run of each traces nothing, but warms caches
    start = time.perf_counter()
    encoded, estimated = coder.encode(image)
    encode.append(time.perf_counter() - start)
    start = time.perf_counter()
    coder.decode(encoded)
    decode.append(time.perf_counter() - start)
  real_bits, estimated_bits = 8 * len(encoded), float(sum(estimated))
  return dict(encode_s=statistics.median(encode[1:]), decode_s=statistics.median(decode[1:]),
              file_bytes=len(encoded), framing_bytes=bitstream.framing_bytes(encoded),
              real_bits=real_bits, estimated_bits=estimated_bits, bits_ratio=real_bits / estimated_bits,
              bpp=metrics.bpp(len(encoded), *image.shape[:2]))


COLUMNS = (
    ("train step (s)", "step_s", "{:.3f}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("train peak RSS (MiB)", "train_rss_mib", "{:.0f}"),
    ("CLI compress (s)", "cli_compress_s", "{:.2f}"),
    ("compress peak RSS (MiB)", "cli_compress_rss_mib", "{:.0f}"),
    ("CLI decompress (s)", "cli_decompress_s", "{:.2f}"),
    ("decompress peak RSS (MiB)", "cli_decompress_rss_mib", "{:.0f}"),
    ("encode in-process (s)", "encode_s", "{:.3f}"),
    ("decode in-process (s)", "decode_s", "{:.3f}"),
    ("file bytes", "file_bytes", "{}"),
    ("framing bytes", "framing_bytes", "{}"),
    ("real / estimated bits", "bits_ratio", "{:.4f}"),
)


def table(results):
  """A Markdown table, one column per model."""
  models = list(results)
  lines = ["| measure | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
  for label, key, fmt in COLUMNS:
    cells = [fmt.format(results[m][key]) if results[m].get(key) is not None else "-" for m in models]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: %(default)s)")
  parser.add_argument("--quick", action="store_true", help="fewer timed steps and repeats (a few minutes)")
  parser.add_argument("--skip", default="", help="comma-separated parts to skip: train, cli, coding")
  parser.add_argument("--steps", type=int, help="timed training steps (default 10, --quick 4)")
  parser.add_argument("--warmup", type=int, help="untimed training steps first (default 3, --quick 2)")
  parser.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="float32",
                      help="arithmetic of the timed training steps (train --precision; default: %(default)s)")
  parser.add_argument("--repeats", type=int, help="runs of each coding measure (default 5, --quick 3)")
  parser.add_argument("--models_dir", default=os.path.join(ROOT, "models", "benchmark"),
                      help="trained models for the coding measures (made if missing; default: %(default)s)")
  parser.add_argument("--json", help="write the results here (default: results/benchmark/<date-time>.json)")
  args = parser.parse_args(argv)
  args.steps = args.steps or (4 if args.quick else 10)
  args.warmup = args.warmup or (2 if args.quick else 3)
  args.repeats = args.repeats or (3 if args.quick else 5)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    sys.exit(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  if skip - {"train", "cli", "coding"}:
    sys.exit(f"error: --skip takes train, cli, coding, not {args.skip}")

  import utils  # noqa: F401  (quiets TensorFlow start-up logs)
  import tensorflow as tf
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    image_path = test_image(os.path.join(tmp, "photo.png"))
    for model in models:
      results[model] = r = {}
      if "train" not in skip:
        print(f"{model}: training steps ...", flush=True)
        r.update(train_step(model, args))
      if skip >= {"cli", "coding"}:
        continue
      model_path = trained_model(model, args.models_dir)
      if "cli" not in skip:
        print(f"{model}: command-line compress / decompress x {args.repeats} ...", flush=True)
        r.update(cli_coding(model, model_path, image_path, args))
      if "coding" not in skip:
        print(f"{model}: in-process coding ...", flush=True)
        r.update(in_process_coding(model_path, image_path, args))
      print(json.dumps(r), flush=True)

  machine = dict(machine=platform.machine(), processor=platform.processor(), cpu_count=os.cpu_count(),
                 device="GPU" if tf.config.list_logical_devices("GPU") else "CPU",
                 tensorflow=tf.__version__, python=platform.python_version(),
                 git=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
  print()
  print(table(results))
  print(f"\n{machine['device']}, {machine['cpu_count']} cores ({machine['machine']}), TensorFlow "
        f"{machine['tensorflow']}, commit {machine['git']}; image {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}")
  output = args.json or os.path.join(ROOT, "results", "benchmark", time.strftime("%Y%m%d-%H%M%S") + ".json")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(dict(results=results, machine=machine, quick=args.quick, steps=args.steps,
                   repeats=args.repeats, image=list(IMAGE_SIZE)), f, indent=1)
  print(f"results in {output}")


if __name__ == "__main__":
  main()
