import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run_script(script, *args, env=None, cwd=None):
  """Runs `python script args...` in a fresh process; returns the CompletedProcess."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


def natural_image(height, width, seed=0):
  """A smooth, photo-like uint8 RGB test image (random noise would not compress like a photo)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.stack([
      128 + 60 * np.sin(xx / 7 + c) * np.cos(yy / 11 - c) + 30 * np.sin((xx + yy) / 17 * (c + 1))
      for c in range(3)], axis=-1)
  image += rng.normal(0, 4, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
  """A folder of PNG and JPEG images: three large enough for 64-pixel crops, one too small."""
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  Image.fromarray(natural_image(80, 96, 1)).save(folder / "a.png")
  Image.fromarray(natural_image(72, 70, 2)).save(folder / "b.jpg", quality=95)
  Image.fromarray(natural_image(65, 130, 3)).save(folder / "c.png")
  Image.fromarray(natural_image(40, 90, 4)).save(folder / "small.png")
  return folder
