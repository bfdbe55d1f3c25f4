"""The command line every codec script shares: train | compress | decompress | evaluate.

A model script calls `main(name, build_model, add_model_flags)`; its own flags (widths, levels, ...)
are added by `add_model_flags` to `train` and recorded with the model.
"""
import argparse
import logging
import os
import sys
import tempfile
import time

from utils.errors import UserError

DEFAULT_EXT = ".lic"


def build_parser(name, add_model_flags):
  """The argparse parser, and the names of the model's own flags."""
  parser = argparse.ArgumentParser(
      prog=f"{name}.py", description=f"The {name} image codec: train it, compress and decompress images, "
      "evaluate it on a set of images.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compress,decompress,evaluate}")

  def add_model_path(p):
    p.add_argument("--model_path", default=os.path.join("models", name),
                   help="directory of the trained model (default: %(default)s)")

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
  train.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate")
  train.add_argument("--dataset", choices=("builtin", "folder", "coco"), default="builtin",
                     help="training images: photos shipped in installed packages, a --train_glob, "
                     "or tensorflow-datasets coco/2017")
  train.add_argument("--train_glob", help="with --dataset folder: the training images, e.g. 'train2017/*.jpg'")
  train.add_argument("--eval_glob", help="validation images (default: the built-in eval photos)")
  train.add_argument("--data_dir", help="with --dataset coco: tensorflow-datasets data directory")
  train.add_argument("--distribute", choices=("auto", "mirrored", "multiworker"), default="auto",
                     help="tf.distribute strategy: auto (several GPUs -> mirrored), mirrored (all local "
                     "GPUs, or logical CPUs), multiworker (MultiWorkerMirroredStrategy via TF_CONFIG)")
  train.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                     help="Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
  add_model_path(train)

  comp = sub.add_parser("compress", help="compress an image into a file")
  comp.add_argument("input", help="image file (PNG, JPEG, ...)")
  comp.add_argument("output", nargs="?", help=f"compressed file (default: INPUT{DEFAULT_EXT})")
  comp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
  add_model_path(comp)

  decomp = sub.add_parser("decompress", help="decompress a file into a PNG image")
  decomp.add_argument("input", help="compressed file")
  decomp.add_argument("output", nargs="?", help="PNG image (default: INPUT.png)")
  decomp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
  add_model_path(decomp)

  ev = sub.add_parser("evaluate", help="compress and decode every evaluation image through real files, "
                      "write RD points (CSV)")
  ev.add_argument("--eval_glob", help="images to evaluate (default: the built-in eval photos)")
  ev.add_argument("--output", help="CSV of RD points (default: results/<model directory name>.csv)")
  ev.add_argument("--files_dir", help="keep the compressed files here (default: a temporary directory)")
  add_model_path(ev)
  return parser, [a.dest for a in model_flags._group_actions]


def check_output(path, overwrite):
  import tensorflow as tf
  if tf.io.gfile.exists(path) and not overwrite:
    raise UserError(f"{path} exists; pass --overwrite to replace it")


def write_bytes(path, data):
  import tensorflow as tf
  try:
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(data)
  except (OSError, tf.errors.OpError) as e:
    raise UserError(f"cannot write {path}: {e}") from None


def read_bytes(path):
  import tensorflow as tf
  if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
    raise UserError(f"no such file: {path}")
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


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
  height, width = image.shape[:2]
  pixels = height * width
  from utils import bitstream
  _, strings = bitstream.unpack(data)
  return dict(bytes=len(data), bpp=metrics.bpp(len(data), height, width),
              est_bpp=float(est_bits.sum()) / pixels,
              string_bpp=[8 * len(s) / pixels for s in strings],
              psnr=metrics.psnr(image, recon), ms_ssim=metrics.ms_ssim(image, recon), recon=recon)


def _compress(args, name):
  from utils import codec, data
  output = args.output or args.input + DEFAULT_EXT
  check_output(output, args.overwrite)
  image = data.read_image(args.input) if os.path.exists(args.input) or "://" in args.input else None
  if image is None:
    raise UserError(f"no such file: {args.input}")
  model = codec.Codec(args.model_path, f"{name}.py")
  r = code_image(model, image, output)
  split = _rate_split(model.string_names, r["string_bpp"])
  print(f"{args.input} ({image.shape[0]}x{image.shape[1]}) -> {output}: {r['bytes']} bytes, "
        f"{r['bpp']:.4f} bpp (estimated {r['est_bpp']:.4f}){split}, PSNR {r['psnr']:.2f} dB, "
        f"MS-SSIM {r['ms_ssim']:.4f}")


def _rate_split(names, string_bpp):
  """' [z 0.0123 bpp, y 0.4567 bpp]': the real rate of each string, for models with several."""
  if len(names) < 2:
    return ""
  return " [" + ", ".join(f"{n} {b:.4f} bpp" for n, b in zip(names, string_bpp)) + "]"


def _decompress(args, name):
  from utils import codec, data
  output = args.output or args.input + ".png"
  check_output(output, args.overwrite)
  raw = read_bytes(args.input)
  model = codec.Codec(args.model_path, f"{name}.py")
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
  config.update({k: getattr(args, k) for k in model_flags})
  return config


def _train(args, name, build_model, model_flags):
  from utils import training
  if args.lmbda <= 0:
    raise UserError(f"--lambda must be positive, not {args.lmbda}")
  for flag in ("patch_size", "batch_size", "epochs", "steps_per_epoch"):
    if getattr(args, flag) <= 0:
      raise UserError(f"--{flag} must be positive, not {getattr(args, flag)}")
  if args.learning_rate <= 0:
    raise UserError(f"--learning_rate must be positive, not {args.learning_rate}")
  start = time.time()
  training.train(build_model, args, model_config(name, args, model_flags))
  print(f"trained {name} in {time.time() - start:.0f} s; model in {args.model_path}")


def main(name, build_model, add_model_flags, argv=None):
  """Runs one command; returns the exit status (2 with a one-line `error:` for user errors)."""
  parser, model_flags = build_parser(name, add_model_flags)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("tensorflow").setLevel(logging.WARNING)
  # tensorflow-compression warns each time validation traces the offset heuristic; it is expected.
  logging.getLogger("absl").addFilter(lambda r: "offset heuristic" not in r.getMessage())
  try:
    if args.command == "train":
      _train(args, name, build_model, model_flags)
    elif args.command == "compress":
      _compress(args, name)
    elif args.command == "decompress":
      _decompress(args, name)
    else:
      _evaluate(args, name)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
