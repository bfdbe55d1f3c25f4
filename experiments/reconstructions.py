"""Figures 8-9 of the seed report: reconstructions of the original, JPEG and every neural codec at
low, medium and high bitrate, with zoomed crops and bpp / PSNR captions.

    python experiments/reconstructions.py                            # models under models/, astronaut
    python experiments/reconstructions.py --models_dir models/sweep-cpu --image photo.png --crop 128

The rows are the lowest, a middle and the highest lambda found for each codec (fewer rows when fewer
models exist); in each row the JPEG quality is the one whose real bpp comes closest to the mean bpp
of that row's neural reconstructions. Writes --output_dir/reconstructions_<image>.png.
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import utils  # noqa: E402,F401  (first: quiets TensorFlow start-up logs)

from utils.errors import UserError  # noqa: E402

CODEC_ORDER = ("bls2017", "bmshj2018", "hcae")
LEVELS = ("low", "medium", "high")


def pick_levels(models):
  """{codec: [(level name, model dir), ...]}: lowest, middle and highest lambda of each codec."""
  picked = {}
  for name, runs in models.items():
    runs = sorted(runs, key=lambda r: r[0])
    if len(runs) >= 3:
      chosen = [runs[0], runs[len(runs) // 2], runs[-1]]
    elif len(runs) == 2:
      chosen = [runs[0], None, runs[1]]
    else:
      chosen = [None, runs[0], None]
    picked[name] = [(level, run[1]) for level, run in zip(LEVELS, chosen) if run is not None]
  return picked


def matching_jpeg(image, target_bpp):
  """(quality, bpp, reconstruction) of the Pillow JPEG whose real rate is closest to target_bpp."""
  import jpeg_baseline
  from utils import metrics
  best = None
  for quality in range(1, 96):
    encoded, recon = jpeg_baseline.pillow_code(image, "jpeg", quality)
    bpp = metrics.bpp(len(encoded), *image.shape[:2])
    if best is None or abs(bpp - target_bpp) < abs(best[1] - target_bpp):
      best = (quality, bpp, recon)
  return best


def crop_center(image, size):
  h, w = image.shape[:2]
  top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
  return image[top:top + size, left:left + size]


def render(image, stem, table, crop, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  columns = ["original", "JPEG"] + [c for c in CODEC_ORDER if any(c in row for row in table.values())]
  rows = [level for level in LEVELS if level in table]
  fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns), 2.9 * len(rows)),
                           squeeze=False)
  for i, level in enumerate(rows):
    for j, column in enumerate(columns):
      ax = axes[i][j]
      ax.axis("off")
      if column == "original":
        ax.imshow(crop_center(image, crop), interpolation="nearest")
        ax.set_title(f"{level} rate\noriginal", fontsize=9)
      elif column in table[level]:
        recon, caption = table[level][column]
        ax.imshow(crop_center(recon, crop), interpolation="nearest")
        ax.set_title(f"{column}\n{caption}", fontsize=9)
  fig.suptitle(f"{stem}: {crop}x{crop} centre crops", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models_dir", default="models", help="searched recursively for trained models")
  parser.add_argument("--image", action="append", help="image(s) to show (default: the first built-in "
                      "eval photo)")
  parser.add_argument("--crop", type=int, default=128, help="side of the zoomed centre crop")
  parser.add_argument("--output_dir", default="results")
  args = parser.parse_args(argv)
  import figure6
  from utils import cli, codec, data, metrics
  try:
    model_dirs = figure6.find_models(args.models_dir)
    if not model_dirs:
      raise UserError(f"no trained models under {args.models_dir}; train some first "
                      "(python experiments/sweep.py --preset cpu)")
    models = {}
    for d in model_dirs:
      model = codec.Codec(d)
      models.setdefault(model.name, []).append((float(model.config.get("lambda", 0)), d))
    levels = pick_levels(models)
    paths = args.image or data.builtin_paths("eval")[:1]
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
      for path in paths:
        image = data.read_image(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        table = {}
        for name, chosen in levels.items():
          for level, model_dir in chosen:
            r = cli.code_image(codec.Codec(model_dir), image, os.path.join(tmp, f"{name}.lic"))
            table.setdefault(level, {})[name] = (r["recon"], f"{r['bpp']:.3f} bpp, {r['psnr']:.2f} dB")
        for level, row in table.items():
          target = sum(float(caption.split()[0]) for _, caption in row.values()) / len(row)
          quality, bpp, recon = matching_jpeg(image, target)
          row["JPEG"] = (recon, f"q{quality}: {bpp:.3f} bpp, {metrics.psnr(image, recon):.2f} dB")
        out = os.path.join(args.output_dir, f"reconstructions_{stem}.png")
        render(image, stem, table, args.crop, out)
        print(f"{path}: {out}")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
