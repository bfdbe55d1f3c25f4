"""Figure 6 of the seed report: rate-PSNR (and rate-MS-SSIM) of every trained model and the
classical codecs on the evaluation images, all through real files.

    python experiments/figure6.py                          # models under models/, built-in eval photos
    python experiments/figure6.py --eval_glob 'kodak/*.png' --reference ../shared/reference_rd/compressai_kodak_points.csv

Writes, in --output_dir (default results/): rd_points.csv (one row per codec, setting and image),
figure6_psnr.png/.pdf, figure6_msssim.png/.pdf, and bd_rate.md (BD-rate and BD-PSNR of each codec
against Pillow JPEG on the same images, by utils/rd.py's Bjøntegaard implementation).
"""
import argparse
import csv
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402,F401  (first: quiets TensorFlow start-up logs)

from utils.errors import UserError  # noqa: E402

ANCHOR = "jpeg"
CLASSICAL = "jpeg,jpeg2000,webp,avif"


def find_models(models_dir):
  """Directories under models_dir holding an exported model, sorted."""
  import tensorflow as tf
  found = []
  if not tf.io.gfile.isdir(models_dir):
    return found
  for directory, subdirs, files in tf.io.gfile.walk(models_dir):
    if os.path.basename(directory.rstrip("/")) == "saved_model" and "saved_model.pb" in files:
      found.append(os.path.dirname(directory.rstrip("/")))
  return sorted(found)


def neural_rows(model_dirs, images, models_dir):
  """RD rows of every model. A codec's models in several folders (a sweep's and a single run's,
  say) get the folder in their label, so runs of the same lambda are not averaged together."""
  from utils import cli, codec
  models = [(d, codec.Codec(d)) for d in model_dirs]
  parents = {}
  for d, model in models:
    parents.setdefault(model.name, set()).add(os.path.relpath(os.path.dirname(d), models_dir))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for model_dir, model in models:
      label = model.name
      if len(parents[model.name]) > 1:
        label += f" ({os.path.relpath(os.path.dirname(model_dir), models_dir)})"
      start = time.time()
      for stem, image in images:
        r = cli.code_image(model, image, os.path.join(tmp, stem + ".lic"))
        rows.append(dict(codec=label, setting=model.config.get("lambda", ""), image=stem,
                         bpp=r["bpp"], psnr=r["psnr"], ms_ssim=r["ms_ssim"], est_bpp=r["est_bpp"]))
      print(f"{model.name} lambda {model.config.get('lambda')}: {model_dir} "
            f"({time.time() - start:.1f} s)", flush=True)
  return rows


def classical_rows(names, images):
  import jpeg_baseline
  rows = []
  for name in names:
    start = time.time()
    _, some = jpeg_baseline.rd_rows(name, images)
    rows += some
    print(f"{name}: {len(some)} points ({time.time() - start:.1f} s)", flush=True)
  return rows


def read_reference(path):
  """Published curves: a CSV with codec, bpp, psnr (ms_ssim optional) columns, or a tensorflow/
  compression text file of `bpp, psnr` lines (the curve is named after the file)."""
  curves = {}
  if path.endswith(".csv"):
    with open(path) as f:
      for row in csv.DictReader(f):
        curves.setdefault(row["codec"], []).append((float(row["bpp"]), float(row["psnr"])))
  else:
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
      for line in f:
        line = line.split("#")[0].strip()
        if line:
          bpp, psnr = (float(v) for v in line.replace(",", " ").split()[:2])
          curves.setdefault(name, []).append((bpp, psnr))
  return {k: sorted(v) for k, v in curves.items()}


def msssim_db(value):
  return -10 * math.log10(max(1 - value, 1e-10))


def plot(curves, references, metric, path_stem, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 5))
  for codec, points in sorted(curves.items()):
    points = sorted(points, key=lambda p: p["bpp"])
    ys = [p["psnr"] if metric == "psnr" else msssim_db(p["ms_ssim"]) for p in points]
    style = "--" if codec in CLASSICAL.split(",") or codec.startswith(("dct", "klt")) else "-"
    ax.plot([p["bpp"] for p in points], ys, style, marker="o", markersize=4, label=codec)
  if metric == "psnr":
    for name, points in sorted(references.items()):
      ax.plot(*zip(*points), ":", linewidth=1, label=f"{name} (published)")
  ax.set_xlabel("rate (bits per pixel, from the compressed files)")
  ax.set_ylabel("PSNR (dB, RGB)" if metric == "psnr" else "MS-SSIM (dB: -10 log10(1 - MS-SSIM))")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  for ext in ("png", "pdf"):
    fig.savefig(f"{path_stem}.{ext}", dpi=120)
  plt.close(fig)


def bd_table(rows):
  """Markdown: BD-rate / BD-PSNR of every codec against Pillow JPEG."""
  from utils import rd
  by_codec = {}
  for row in rows:
    by_codec.setdefault(row["codec"], []).append(row)
  anchor = by_codec.get(ANCHOR)
  lines = ["| codec | settings | BD-rate vs JPEG | BD-PSNR vs JPEG |", "| --- | --- | --- | --- |"]
  for codec, some in sorted(by_codec.items()):
    if codec == ANCHOR or anchor is None:
      continue
    settings = sorted({r["setting"] for r in some}, key=float)
    try:
      rate = f"{rd.bd_rate(anchor, some):+.1f} %"
      gain = f"{rd.bd_psnr(anchor, some):+.2f} dB"
    except ValueError:
      rate = gain = "n/a (needs 2+ settings overlapping JPEG's range)"
    lines.append(f"| {codec} | {', '.join(map(str, settings))} | {rate} | {gain} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models_dir", default="models", help="searched recursively for trained models")
  parser.add_argument("--eval_glob", help="evaluation images (default: the built-in eval photos)")
  parser.add_argument("--classical", default=CLASSICAL,
                      help="comma-separated classical codecs of jpeg_baseline.py (jpeg is the BD anchor)")
  parser.add_argument("--reference", action="append", default=[],
                      help="published curves to overlay (CSV with codec,bpp,psnr or a bpp,psnr text file)")
  parser.add_argument("--output_dir", default="results")
  args = parser.parse_args(argv)
  from utils import data, rd
  try:
    start = time.time()
    paths = data.eval_paths("builtin", args.eval_glob)
    images = [(os.path.basename(p), data.read_image(p)) for p in paths]
    names = [n for n in args.classical.split(",") if n]
    if ANCHOR not in names:
      names.insert(0, ANCHOR)
    references = {}
    for path in args.reference:
      if not os.path.exists(path):
        raise UserError(f"no such reference file: {path}")
      references.update(read_reference(path))
    model_dirs = find_models(args.models_dir)
    if not model_dirs:
      print(f"no trained models under {args.models_dir}: plotting the classical codecs only", flush=True)
    rows = neural_rows(model_dirs, images, args.models_dir) + classical_rows(names, images)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(args.output_dir, exist_ok=True)
  rd.write_points(os.path.join(args.output_dir, "rd_points.csv"), rows)
  curves = {}
  for codec in sorted({r["codec"] for r in rows}):
    curves[codec] = rd.mean_curve([r for r in rows if r["codec"] == codec])
  title = f"{len(images)} images ({'built-in eval photos' if not args.eval_glob else args.eval_glob})"
  plot(curves, references, "psnr", os.path.join(args.output_dir, "figure6_psnr"), title)
  plot(curves, references, "ms_ssim", os.path.join(args.output_dir, "figure6_msssim"), title)
  table = bd_table(rows)
  with open(os.path.join(args.output_dir, "bd_rate.md"), "w") as f:
    f.write(f"# BD-rate against Pillow JPEG on {title}\n\n{table}")
  print("\nmean bpp / PSNR per setting:")
  for codec, points in curves.items():
    print(f"  {codec}: " + ", ".join(f"{p['setting']}: {p['bpp']:.3f} / {p['psnr']:.2f}" for p in points))
  print("\n" + table)
  print(f"wrote rd_points.csv, figure6_psnr.png/.pdf, figure6_msssim.png/.pdf, bd_rate.md in "
        f"{args.output_dir} ({time.time() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
