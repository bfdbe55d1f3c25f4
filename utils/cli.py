"""The command line every codec script shares: train | compress | decompress | evaluate.

A model script calls `main(name, build_model, add_model_flags)`; its own flags (widths, levels, ...)
are added by `add_model_flags` to `train` and recorded with the model.
"""
import argparse
import logging
import math
import os
import sys
import tempfile
import time

from utils.errors import DecodeTimeout, Interrupted, UserError

DEFAULT_EXT = ".lic"


def build_parser(name, add_model_flags):
  """The argparse parser, and the names of the model's own flags."""
  parser = argparse.ArgumentParser(
      prog=f"{name}.py", description=f"The {name} image codec: train it, compress and decompress images, "
      "evaluate it on a set of images.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compress,decompress,evaluate}")

  def add_shared_flags(p):
    p.add_argument("--model_path", default=os.path.join("models", name),
                   help="directory of the trained model (default: %(default)s)")
    p.add_argument("--deterministic", action="store_true",
                   help="enable TensorFlow's op determinism (for GPUs; see README: exact decoding)")

  train = sub.add_parser("train", help="train a model (resumes an interrupted run in --model_path)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  train.add_argument("--lambda", dest="lmbda", type=float, default=0.01,
                     help="rate-distortion trade-off: loss = bpp + lambda * MSE (MSE on 0..255)")
  model_flags = train.add_argument_group(f"{name} model")
  add_model_flags(model_flags)
  train.add_argument("--patch_size", type=int, default=256, help="side of the random training crops")
  train.add_argument("--batch_size", type=int, default=8, help="crops per training step")
  train.add_argument("--epochs", type=int, default=1000, help="epochs to train in all (a resumed run counts "
                     "the epochs already done)")
  train.add_argument("--steps_per_epoch", type=int, default=1000, help="training steps per epoch")
  train.add_argument("--finish_epochs", type=int, default=0,
                     help="train the last this many of --epochs (all of them, if more) on larger crops: "
                     "a model that saw only small crops can code whole photos with levels tuned to "
                     "tiny maps (README: training recipe); 0: off")
  train.add_argument("--finish_patch_size", type=int,
                     help="side of the crops of the last --finish_epochs (default: twice --patch_size)")
  train.add_argument("--finish_batch_size", type=int,
                     help="crops per step in the last --finish_epochs (default: as many pixels per step "
                     "as before, at least one crop)")
  recipe = train.add_argument_group("training recipe (README: training recipe)")
  recipe.add_argument("--learning_rate", type=float, default=1e-3,
                      help="Adam learning rate: the peak of the cosine schedule, or the constant rate")
  recipe.add_argument("--lr_schedule", choices=("cosine", "constant"), default="cosine",
                      help="cosine: linear warm-up, then cosine decay to --final_learning_rate at the "
                      "last step; constant: --learning_rate throughout (the papers' 1e-4)")
  recipe.add_argument("--warmup_steps", type=int, default=200, help="steps of the linear warm-up")
  recipe.add_argument("--final_learning_rate", type=float, default=1e-5,
                      help="learning rate at the last step of the cosine schedule")
  recipe.add_argument("--clipnorm", type=float, default=1.0,
                      help="clip the gradients to this global norm (0: no clipping)")
  recipe.add_argument("--spike_factor", type=float, default=10.0,
                      help="skip the update of a step whose loss exceeds this many times the running "
                      "mean of the loss, or whose gradient is not finite (0: apply every step)")
  recipe.add_argument("--rollbacks", type=int, default=2,
                      help="times a run stopped by a NaN loss, or by a run of refused steps (see "
                      "--spike_factor), goes back to its last checkpoint and on at half the learning "
                      "rate, before it stops with an error (0: stop at once)")
  recipe.add_argument("--quantization", choices=("ste", "noise"), default="ste",
                      help="what the synthesis sees in training: ste = rounded latents with a "
                      "straight-through gradient, noise = additive uniform noise (the papers); the rate "
                      "term uses noise either way")
  recipe.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="float32",
                      help="arithmetic of the training steps: bfloat16 runs their convolutions in "
                      "bfloat16 (variables, optimizer and the exported codec stay float32), faster "
                      "on CPUs with AVX512-BF16 or AMX, slower on others; auto: bfloat16 on such a "
                      "CPU without a GPU, else float32 (README: training recipe)")
  recipe.add_argument("--init_from", metavar="MODEL_DIR",
                      help="start from the weights of this trained model (same codec and shape, any "
                      "lambda): the warm start of a lambda sweep; ignored when resuming")
  train.add_argument("--dataset", choices=("builtin", "folder", "coco"), default="builtin",
                     help="training images: photos shipped in installed packages, a --train_glob, "
                     "or tensorflow-datasets coco/2017")
  train.add_argument("--train_glob", help="with --dataset folder: the training images, e.g. 'train2017/*.jpg'")
  train.add_argument("--eval_glob", help="validation images (default: the built-in eval photos)")
  train.add_argument("--data_dir", help="with --dataset coco: tensorflow-datasets data directory")
  train.add_argument("--distribute", choices=("auto", "mirrored", "multiworker"), default="auto",
                     help="tf.distribute strategy: auto (several GPUs -> mirrored), mirrored (all local "
                     "GPUs, or logical CPUs), multiworker (MultiWorkerMirroredStrategy via TF_CONFIG)")
  train.add_argument("--backup_steps", type=int, default=100,
                     help="save a resumable checkpoint every this many steps, and at every epoch end "
                     "(a killed run loses at most this many steps)")
  train.add_argument("--seed", type=int, default=0, help="with --deterministic: the seed of every "
                     "random choice (initial weights, crops, noise)")
  train.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                     help="Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
  add_shared_flags(train)

  comp = sub.add_parser("compress", help="compress an image into a file")
  comp.add_argument("input", help="image file (PNG, JPEG, ...)")
  comp.add_argument("output", nargs="?", help=f"compressed file (default: INPUT{DEFAULT_EXT})")
  comp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
  comp.add_argument("--measure", action="store_true", help="also decode the written file and print its "
                    "PSNR and MS-SSIM (a decode costs about as much as the compression)")
  add_shared_flags(comp)

  decomp = sub.add_parser("decompress", help="decompress a file into a PNG image")
  decomp.add_argument("input", help="compressed file")
  decomp.add_argument("output", nargs="?", help="PNG image (default: INPUT.png)")
  decomp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
  add_shared_flags(decomp)

  ev = sub.add_parser("evaluate", help="compress and decode every evaluation image through real files, "
                      "write RD points (CSV)")
  ev.add_argument("--eval_glob", help="images to evaluate (default: the built-in eval photos)")
  ev.add_argument("--output", help="CSV of RD points (default: results/<model directory name>.csv)")
  ev.add_argument("--files_dir", help="keep the compressed files here (default: a temporary directory)")
  add_shared_flags(ev)
  return parser, [a.dest for a in model_flags._group_actions]


def check_output(path, overwrite):
  from utils import files
  files.check_output(path, overwrite)


def write_bytes(path, data):
  from utils import files
  files.write_bytes(path, data)


def read_bytes(path):
  from utils import files
  return files.read_bytes(path)


def code_image(model, image, path):
  """Compresses `image` into the file `path`, decodes that file, and measures it.

  Returns a dict with bpp (from the file size), est_bpp, psnr, ms_ssim, per-string bpp and the
  reconstruction.
  """
  from utils import metrics
  data, est_bits = model.encode(image)
  write_bytes(path, data)
  data = read_bytes(path)
  recon = model.decode(data)
  return dict(_measure_file(data, est_bits, image.shape[:2]), psnr=metrics.psnr(image, recon),
              ms_ssim=metrics.ms_ssim(image, recon), recon=recon)


def _measure_file(data, est_bits, size):
  """The rate of a file: bytes, bpp, the entropy models' estimate, and the real bpp of each string."""
  from utils import bitstream, metrics
  pixels = size[0] * size[1]
  _, strings = bitstream.unpack(data)
  return dict(bytes=len(data), bpp=metrics.bpp(len(data), *size),
              est_bpp=float(est_bits.sum()) / pixels, string_bpp=[8 * len(s) / pixels for s in strings])


def _compress(args, name):
  from utils import codec, data
  output = args.output or args.input + DEFAULT_EXT
  check_output(output, args.overwrite)
  image = data.read_image(args.input) if os.path.exists(args.input) or "://" in args.input else None
  if image is None:
    raise UserError(f"no such file: {args.input}")
  # --measure decodes too: the whole model.
  model = codec.Codec(args.model_path, f"{name}.py", part=None if args.measure else "encoder")
  if args.measure:
    r = code_image(model, image, output)
  else:
    encoded, est_bits = model.encode(image)
    write_bytes(output, encoded)
    r = _measure_file(encoded, est_bits, image.shape[:2])
  split = _rate_split(model.string_names, r["string_bpp"])
  quality = f", PSNR {r['psnr']:.2f} dB, MS-SSIM {r['ms_ssim']:.4f}" if args.measure else ""
  print(f"{args.input} ({image.shape[0]}x{image.shape[1]}) -> {output}: {r['bytes']} bytes, "
        f"{r['bpp']:.4f} bpp (estimated {r['est_bpp']:.4f}){split}{quality}")


def _rate_split(names, string_bpp):
  """' [z 0.0123 bpp, y 0.4567 bpp]': the real rate of each string, for models with several."""
  if len(names) < 2:
    return ""
  return " [" + ", ".join(f"{n} {b:.4f} bpp" for n, b in zip(names, string_bpp)) + "]"


def _decompress(args, name):
  from utils import pool_cpu_memory
  pool_cpu_memory()  # before the first TensorFlow op: the synthesis's tiles reuse their buffers
  from utils import codec, data
  output = args.output or args.input + ".png"
  check_output(output, args.overwrite)
  raw = read_bytes(args.input)
  model = codec.Codec(args.model_path, f"{name}.py", part="decoder")
  image = model.decode(raw)
  try:
    data.write_png(output, image)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot write {output}: {e}") from None
  print(f"{args.input} -> {output} ({image.shape[0]}x{image.shape[1]})")


def _evaluate(args, name):
  from utils import codec, data, rd
  model = codec.Codec(args.model_path, f"{name}.py")
  paths = data.eval_paths("builtin", args.eval_glob)
  setting = model.config.get("lambda", "")
  output = args.output or os.path.join(
      "results", os.path.basename(os.path.normpath(args.model_path)) + ".csv")
  rows, splits = [], []
  with tempfile.TemporaryDirectory() as tmp:
    files_dir = args.files_dir or tmp
    os.makedirs(files_dir, exist_ok=True)
    for i, path in enumerate(paths):
      image = data.read_image(path)
      stem = os.path.basename(path)
      r = code_image(model, image, os.path.join(files_dir, stem + DEFAULT_EXT))
      rows.append(dict(codec=name, setting=setting, image=stem, bpp=r["bpp"], psnr=r["psnr"],
                       ms_ssim=r["ms_ssim"], est_bpp=r["est_bpp"]))
      splits.append(r["string_bpp"])
      print(f"[{i + 1}/{len(paths)}] {stem}: {r['bpp']:.4f} bpp (estimated {r['est_bpp']:.4f})"
            f"{_rate_split(model.string_names, r['string_bpp'])}, PSNR {r['psnr']:.2f} dB, "
            f"MS-SSIM {r['ms_ssim']:.4f}", flush=True)
  rd.write_points(output, rows)
  m = rd.means(rows)
  mean_split = [sum(col) / len(col) for col in zip(*splits)]
  print(f"mean over {len(rows)} images: {m['bpp']:.4f} bpp (estimated {m['est_bpp']:.4f})"
        f"{_rate_split(model.string_names, mean_split)}, PSNR {m['psnr']:.2f} dB, "
        f"MS-SSIM {m['ms_ssim']:.4f}; points in {output}")


def model_config(name, args, model_flags):
  """What defines a trained model: recorded with it, and checked before a run resumes."""
  config = {"codec": name, "lambda": args.lmbda}
  # A switch that is off is left out: a model trained before the switch existed is the same model,
  # and its recorded config still matches (resume, warm start).
  config.update({k: getattr(args, k) for k in model_flags
                 if getattr(args, k) is not False and getattr(args, k) is not None})
  return config


def check_train_flags(args, model_flags):
  """Refuses flags that make no sense, before any work (and before the model directory is made)."""
  for flag, value in (("lambda", args.lmbda), ("learning_rate", args.learning_rate)):
    if not (math.isfinite(value) and value > 0):
      raise UserError(f"--{flag} must be positive and finite, not {value}")
  if args.lr_schedule == "cosine" and not (
      math.isfinite(args.final_learning_rate) and 0 < args.final_learning_rate <= args.learning_rate):
    raise UserError(f"--final_learning_rate must be in (0, --learning_rate], not {args.final_learning_rate}")
  if not (math.isfinite(args.clipnorm) and args.clipnorm >= 0):
    raise UserError(f"--clipnorm must be 0 (off) or positive, not {args.clipnorm}")
  if not (math.isfinite(args.spike_factor) and (args.spike_factor == 0 or args.spike_factor > 1)):
    raise UserError(f"--spike_factor must be 0 (off) or above 1, not {args.spike_factor}")
  for flag in ("warmup_steps", "rollbacks", "finish_epochs"):
    if getattr(args, flag) < 0:
      raise UserError(f"--{flag} must be 0 or more, not {getattr(args, flag)}")
  int_flags = ["patch_size", "batch_size", "epochs", "steps_per_epoch", "backup_steps"]
  int_flags += [k for k in model_flags if type(getattr(args, k)) is int]  # not the switches
  int_flags += ["finish_patch_size", "finish_batch_size"]  # None: derived from --patch_size, --batch_size
  for flag in int_flags:
    if getattr(args, flag) is not None and getattr(args, flag) <= 0:
      raise UserError(f"--{flag} must be positive, not {getattr(args, flag)}")


def _train(args, name, build_model, model_flags):
  from utils import training
  check_train_flags(args, model_flags)
  start = time.time()
  history = training.train(build_model, args, model_config(name, args, model_flags))
  steps = int(history.model.optimizer.iterations.numpy())
  print(f"trained {name} in {time.time() - start:.0f} s ({steps} steps in all); model in {args.model_path}")


def main(name, build_model, add_model_flags, argv=None, fast_exit=False):
  """Runs one command; returns the exit status (2 with a one-line `error:` for user errors).

  fast_exit (for a script's __main__): `compress` and `decompress` end the process themselves once
  their output is written and closed. The interpreter's teardown of TensorFlow takes 0.6-1 s, a
  fifth of such a command, and frees nothing a finished process needs.
  """
  parser, model_flags = build_parser(name, add_model_flags)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("tensorflow").setLevel(logging.WARNING)
  # tensorflow-compression warns each time validation traces the offset heuristic; it is expected.
  logging.getLogger("absl").addFilter(lambda r: "offset heuristic" not in r.getMessage())
  commands = {"train": lambda: _train(args, name, build_model, model_flags),
              "compress": lambda: _compress(args, name), "decompress": lambda: _decompress(args, name),
              "evaluate": lambda: _evaluate(args, name)}
  if args.deterministic and args.command != "train":  # train sets it up after its strategy
    from utils.model import enable_determinism
    enable_determinism()
  status = run_reporting_errors(commands[args.command])
  if fast_exit and args.command in ("compress", "decompress"):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  return status


def run_reporting_errors(command):
  """Runs command(); returns the exit status, every failure reported in one line on stderr:
  0 done, 2 `error: ...` (bad input, file, flag; out of memory), 128 + N `stopped: ...` (training
  interrupted by signal N after saving a checkpoint)."""
  try:
    command()
  except DecodeTimeout as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    # The decoding thread cannot be stopped, and would hold the interpreter's exit: leave now.
    os._exit(2)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except MemoryError:
    print("error: out of memory", file=sys.stderr)
    return 2
  except Interrupted as e:
    print(f"stopped: {e}", file=sys.stderr)
    return e.exit_status
  return 0
