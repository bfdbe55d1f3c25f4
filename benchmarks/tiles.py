"""How a trained model's rate depends on the size of what it codes: every eval photo coded whole,
and as separate tiles of T x T pixels, through the model's own encoder.

    python benchmarks/tiles.py models/sweep-cpu/bmshj2018-lambda0.015 models/sweep-cpu/bls2017-lambda0.015
    python benchmarks/tiles.py MODEL_DIR --tiles 64,128,256 --eval_glob 'kodak/*.png' --json tiles.json

Why: a model whose entropy model has spatial context (bmshj2018's hyperprior, hcae's top-down
levels) learns it on the training crops. On 128-pixel crops bmshj2018's z is 2x2, every position a
border one, and such a model codes a whole photo for far more than the sum of its 128-pixel tiles,
where a factorized prior (bls2017) codes both for about the same (README, "Experiments").

The rate counts the range-coded strings of each file, not its framing (a few bytes per
file, which would charge a 64-pixel tile 0.02-0.03 bpp more); tiles are the whole T x T tiles from
the top left, so a photo's last rows and columns that do not fill one are left out. Run by hand;
never a test of speed.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402,F401  (quiets TensorFlow start-up logs)

from utils import bitstream, data  # noqa: E402
from utils.codec import Codec  # noqa: E402
from utils.errors import UserError  # noqa: E402


def payload_bits(codec, image):
  """Bits of the range-coded strings of the file `codec` makes of `image`."""
  data = codec.encode(image)[0]
  return 8 * (len(data) - bitstream.framing_bytes(data))


def tiled_bpp(codec, image, tile):
  """Bits per pixel of the whole tile x tile tiles of `image`, each coded on its own; None if
  the image holds no whole tile."""
  height, width = image.shape[:2]
  bits = pixels = 0
  for top in range(0, height - tile + 1, tile):
    for left in range(0, width - tile + 1, tile):
      bits += payload_bits(codec, image[top:top + tile, left:left + tile])
      pixels += tile * tile
  return bits / pixels if pixels else None


def measure(model_dir, paths, tiles):
  codec = Codec(model_dir, part="encoder")
  rows = []
  for path in paths:
    image = data.read_image(path)
    height, width = image.shape[:2]
    row = dict(image=os.path.basename(path), width=width, height=height,
               whole=payload_bits(codec, image) / (height * width))
    row["tiles"] = {str(t): tiled_bpp(codec, image, t) for t in tiles}
    rows.append(row)
    print(f"  {row['image']} ({width}x{height}): whole {row['whole']:.4f} bpp; " + ", ".join(
        f"tiles {t}: " + ("-" if v is None else f"{v:.4f}") for t, v in row["tiles"].items()), flush=True)
  return dict(model_dir=model_dir, codec=codec.name, images=rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model_dirs", nargs="+", help="trained model directories (each with its saved_model)")
  parser.add_argument("--tiles", default="64,128,256", help="tile sizes in pixels, comma-separated")
  parser.add_argument("--eval_glob", help="images to code (default: the built-in eval photos)")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
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
      results.append(measure(model_dir, paths, tiles))
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
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
