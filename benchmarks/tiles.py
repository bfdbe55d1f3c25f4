"""How a trained model's rate depends on the size of what it codes: every eval photo coded whole,
and as separate tiles of T x T pixels, through the model's own encoder.

    python benchmarks/tiles.py models/sweep-cpu/bmshj2018-lambda0.015 models/sweep-cpu/bls2017-lambda0.015
    python benchmarks/tiles.py MODEL_DIR --tiles 64,128,256 --eval_glob 'kodak/*.png' --json tiles.json
    python benchmarks/tiles.py models/sweep-cpu/*-lambda* --tiles 128 --decode \
        --jpeg_points results/sweep-cpu/rd_points.csv     # also PSNR, and BD-rate against JPEG

Why: a model whose entropy model has spatial context (bmshj2018's hyperprior, hcae's top-down
levels) learns it on the training crops. On 128-pixel crops bmshj2018's z is 2x2, every position a
border one, and such a model codes a whole photo for far more than the sum of its 128-pixel tiles,
where a factorized prior (bls2017) codes both for about the same (README, "Experiments").

The rate counts the range-coded strings of each file, not its framing (a few bytes per
file, which would charge a 64-pixel tile 0.02-0.03 bpp more); tiles are the whole T x T tiles from
the top left, so a photo's last rows and columns that do not fill one are left out.

With --decode it also asks whether coding in tiles pays once the seams are counted: every photo is
coded whole and as tiles that cover all of it (the last row and column of tiles cut short), each
tile its own file, decoded and put back together; the rate is then the bytes of all the files,
framing included, and the PSNR that of the assembled photo. With --jpeg_points (an rd_points.csv
of `experiments/sweep.py`, whose jpeg rows are the anchor) it prints each codec's BD-rate against
JPEG coded whole and in tiles, over the lambdas of the model directories given. Run by hand; never a
test of speed.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402,F401  (quiets TensorFlow start-up logs)

import numpy as np  # noqa: E402

from utils import bitstream, data, metrics, rd  # noqa: E402
from utils.codec import Codec  # noqa: E402
from utils.errors import UserError  # noqa: E402


def payload_bits(data):
  """Bits of the range-coded strings of a file: its bytes without the framing."""
  return 8 * (len(data) - bitstream.framing_bytes(data))


class Files:
  """The files `codec` makes of an image and of its tiles, each coded once: the rates and the
  decoded tiles (--decode) share them."""

  def __init__(self, codec, image):
    self.codec, self.image, self._made = codec, image, {}

  def get(self, top=0, left=0, tile=None):
    """The file of the tile x tile crop at (top, left), cut short at the image's edges; the whole
    image by default."""
    height, width = self.image.shape[:2]
    tile = tile or max(height, width)
    key = (top, left, min(top + tile, height), min(left + tile, width))
    if key not in self._made:
      self._made[key] = self.codec.encode(self.image[top:key[2], left:key[3]])[0]
    return self._made[key]


def tiled_bpp(files, tile):
  """Bits per pixel of the whole tile x tile tiles of the image, each coded on its own; None if
  the image holds no whole tile."""
  height, width = files.image.shape[:2]
  bits = pixels = 0
  for top in range(0, height - tile + 1, tile):
    for left in range(0, width - tile + 1, tile):
      bits += payload_bits(files.get(top, left, tile))
      pixels += tile * tile
  return bits / pixels if pixels else None


def coded_rd(files, tile=None):
  """(bpp, PSNR) of the image coded whole, or as tiles of tile x tile pixels that cover all of
  it, each its own file: all the files' bytes over the image's pixels, the PSNR of what they
  decode to."""
  image = files.image
  height, width = image.shape[:2]
  tile = tile or max(height, width)
  decoded = np.zeros_like(image)
  size = 0
  for top in range(0, height, tile):
    for left in range(0, width, tile):
      file = files.get(top, left, tile)
      size += len(file)
      decoded[top:top + tile, left:left + tile] = files.codec.decode(file)
  return metrics.bpp(size, height, width), metrics.psnr(image, decoded)


def measure(model_dir, paths, tiles, decode=False):
  codec = Codec(model_dir, part=None if decode else "encoder")
  rows = []
  for path in paths:
    image = data.read_image(path)
    files = Files(codec, image)
    height, width = image.shape[:2]
    row = dict(image=os.path.basename(path), width=width, height=height,
               whole=payload_bits(files.get()) / (height * width))
    row["tiles"] = {str(t): tiled_bpp(files, t) for t in tiles}
    line = f"  {row['image']} ({width}x{height}): whole {row['whole']:.4f} bpp; " + ", ".join(
        f"tiles {t}: " + ("-" if v is None else f"{v:.4f}") for t, v in row["tiles"].items())
    if decode:
      row["coded"] = {"whole": coded_rd(files), **{str(t): coded_rd(files, t) for t in tiles}}
      line += "; files, bpp / dB: " + ", ".join(f"{k} {b:.4f} / {q:.2f}" for k, (b, q) in row["coded"].items())
    rows.append(row)
    print(line, flush=True)
  return dict(model_dir=model_dir, codec=codec.name, config=codec.config, images=rows)


def bd_rates(results, jpeg_points):
  """{codec: {"whole" or tile size: BD-rate in % against the JPEG rows of `jpeg_points`}}, each
  codec's curve the mean over photos of its decoded results, one point per model directory."""
  jpeg = [r for r in rd.read_points(jpeg_points) if r["codec"] == "jpeg"]
  if not jpeg:
    raise UserError(f"{jpeg_points} has no jpeg rows to compare with")
  out = {}
  for name in sorted({r["codec"] for r in results}):
    mine = [r for r in results if r["codec"] == name]
    out[name] = {}
    for key in mine[0]["images"][0]["coded"]:
      rows = [dict(setting=r["model_dir"], image=i["image"], bpp=i["coded"][key][0], psnr=i["coded"][key][1])
              for r in mine for i in r["images"]]
      try:
        out[name][key] = rd.bd_rate(jpeg, rows)
      except ValueError as e:  # one model directory, or curves that do not overlap
        print(f"{name} {key}: no BD-rate ({e})", file=sys.stderr)
        out[name][key] = None
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model_dirs", nargs="+", help="trained model directories (each with its saved_model)")
  parser.add_argument("--tiles", default="64,128,256", help="tile sizes in pixels, comma-separated")
  parser.add_argument("--eval_glob", help="images to code (default: the built-in eval photos)")
  parser.add_argument("--decode", action="store_true",
                      help="also decode: rate of the whole files and PSNR, whole and in tiles covering every pixel")
  parser.add_argument("--jpeg_points", help="with --decode: an rd_points.csv whose jpeg rows to give BD-rates against")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  if args.jpeg_points and not args.decode:
    parser.error("--jpeg_points needs --decode")
  if args.jpeg_points and not os.path.isfile(args.jpeg_points):
    parser.error(f"--jpeg_points: no file {args.jpeg_points}")
  try:
    tiles = [int(t) for t in args.tiles.split(",")]
    if not tiles or min(tiles) < 1:
      raise ValueError
  except ValueError:
    parser.error(f"--tiles must be positive integers separated by commas, not {args.tiles!r}")
  try:
    paths = data.eval_paths(eval_glob=args.eval_glob)
    results = []
    for model_dir in args.model_dirs:
      print(f"{model_dir}: payload bpp, whole and as tiles of {args.tiles} pixels", flush=True)
      results.append(measure(model_dir, paths, tiles, args.decode))
    bd = bd_rates(results, args.jpeg_points) if args.jpeg_points else None
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for result in results:
    # Whole over tiled, per photo: above 1, the model codes large images worse than small ones.
    ratios = {t: [r["whole"] / r["tiles"][str(t)] for r in result["images"] if r["tiles"][str(t)]]
              for t in tiles}
    result["whole_over_tiles"] = {str(t): statistics.mean(v) if v else None for t, v in ratios.items()}
    print(f"{result['model_dir']} ({result['codec']}): whole / tiles, mean over photos: " + ", ".join(
        f"{t}: " + ("-" if v is None else f"{v:.3f}") for t, v in result["whole_over_tiles"].items()))
  for name, values in (bd or {}).items():
    print(f"{name}: BD-rate against JPEG, " + ", ".join(
        f"{'whole' if k == 'whole' else 'tiles ' + k}: " + ("-" if v is None else f"{v:+.1f} %")
        for k, v in values.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(models=results, bd_rate_vs_jpeg=bd), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
