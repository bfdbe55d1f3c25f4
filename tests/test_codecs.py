"""Every neural codec end to end on a tiny model: training, resume, real files across processes
(oneDNN on and off in the decoder), bad files, user errors, evaluation."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY, allocator_env, natural_image, run_script
from utils import bitstream, codec, metrics, rd
from utils.errors import UserError


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "odd.png"
  Image.fromarray(natural_image(37, 53, 5)).save(path)
  return path


def test_loss_goes_down(trained):
  first, resumed = trained.first, trained.resumed
  losses = first.history["loss"] + resumed.history["loss"]
  assert losses[-1] < 0.8 * losses[0], losses
  assert resumed.history["val_loss"][-1] < first.history["val_loss"][0]


def test_rerun_resumes_where_it_stopped(trained):
  first, resumed = trained.first, trained.resumed
  assert first.epoch == [0, 1]
  assert resumed.epoch == [2]  # only the missing epoch ran
  assert int(resumed.model.optimizer.iterations) == 3 * 12  # optimizer state carried over


def test_rerun_with_another_model_is_refused(trained, capsys):
  rc = trained.main("train", "--lambda", "0.5", *TINY[trained.name], "--model_path", trained.model_path)
  assert rc == 2
  assert "holds a different model (lambda: 0.01 -> 0.5)" in capsys.readouterr().err


def test_cross_process_round_trip_is_exact(trained, odd_image, tmp_path):
  model_path = trained.model_path
  lic = tmp_path / "odd.lic"
  out = out_compress = run_script(trained.script, "compress", odd_image, lic, "--model_path", model_path)
  assert out.returncode == 0, out.stderr
  reported = float(re.search(r"([\d.]+) bpp \(estimated ([\d.]+)\)", out.stdout).group(1))
  size = os.path.getsize(lic)
  assert reported == pytest.approx(8 * size / (37 * 53), abs=1e-4)
  names = codec.Codec(model_path).string_names
  if len(names) > 1:  # the per-string (per-level) rate, which with the framing makes up the file
    split = re.search(r"\[(.*)\]", out.stdout).group(1)
    parts = dict(p.rsplit(" ", 2)[:2] for p in split.split(", "))
    assert list(parts) == list(names)
    string_bytes = [round(float(v) * 37 * 53 / 8) for v in parts.values()]
    assert sum(string_bytes) + bitstream.framing_bytes(lic.read_bytes()) == size

  model = codec.Codec(model_path)
  in_process = model.decode(lic.read_bytes())
  data, _ = model.encode(np.asarray(Image.open(odd_image)))
  assert data == lic.read_bytes()  # compressing is deterministic across processes

  for onednn in ("1", "0"):  # the decoding process with oneDNN on, then off
    png = tmp_path / f"odd-onednn{onednn}.png"
    out = run_script(trained.script, "decompress", lic, png, "--model_path", model_path,
                     env={"TF_ENABLE_ONEDNN_OPTS": onednn})
    assert out.returncode == 0, out.stderr
    decoded = np.asarray(Image.open(png))
    assert decoded.shape == (37, 53, 3)
    np.testing.assert_array_equal(decoded, in_process)

  assert "PSNR" not in out_compress.stdout  # compress alone does not decode
  out = run_script(trained.script, "compress", odd_image, lic, "--model_path", model_path, "--overwrite",
                   "--measure")
  assert out.returncode == 0, out.stderr
  assert lic.read_bytes() == data
  psnr = float(re.search(r"PSNR ([\d.]+) dB", out.stdout).group(1))
  assert psnr == pytest.approx(metrics.psnr(np.asarray(Image.open(odd_image)), in_process), abs=0.006)


def test_decompress_imports_no_tensorflow_probability_and_pools_memory(trained, tmp_path):
  # tensorflow-compression is needed for its range-coding ops only; importing it whole imports
  # tensorflow-probability, a second of every command (utils/codec.py). And the decoder keeps its
  # buffers in TensorFlow's pool (utils.pool_cpu_memory) unless told not to, with the same pixels.
  lic = tmp_path / "x.lic"
  lic.write_bytes(codec.Codec(trained.model_path).encode(natural_image(20, 30, 7))[0])
  pngs = {}
  for setting in (None, "false"):
    pngs[setting] = tmp_path / f"x-{setting}.png"
    script = f"""
import sys
import {trained.name} as script
from utils import cli
argv = ["decompress", {str(lic)!r}, {str(pngs[setting])!r}, "--model_path", {trained.model_path!r}]
assert cli.main({trained.name!r}, script.build_model, script.add_model_flags, argv) == 0
import tensorflow as tf
try:
  tf.config.experimental.get_memory_info("CPU:0")  # only a BFC allocator keeps these statistics
  print("pooled")
except ValueError:
  print("malloc")
print(sorted(m for m in sys.modules if m.startswith(("tensorflow_probability", "tensorflow_compression."))))
"""
    env = allocator_env(setting)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["malloc" if setting else "pooled", "[]"]
  assert np.asarray(Image.open(pngs[None])).shape == (20, 30, 3)
  assert pngs[None].read_bytes() == pngs["false"].read_bytes()


def test_saved_model_codes_without_the_python_class(trained, tmp_path):
  model_path = trained.model_path
  image = natural_image(20, 30, 7)
  data, _ = codec.Codec(model_path).encode(image)
  (tmp_path / "x.lic").write_bytes(data)
  np.save(tmp_path / "expected.npy", codec.Codec(model_path).decode(data))
  # tensorflow_compression is imported only for its range-coding ops.
  script = f"""
import numpy as np, tensorflow as tf, tensorflow_compression
m = tf.saved_model.load({os.path.join(model_path, 'saved_model')!r})
strings, bits = m.compress(tf.constant(np.load({str(tmp_path / 'expected.npy')!r})))
image = m.decompress(strings, tf.constant([20, 30]))
assert image.shape == (20, 30, 3) and image.dtype == tf.uint8
print("ok", strings.shape[0], float(bits[0]))
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=""), timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(f"ok {len(codec.Codec(model_path).string_names)} ")


def test_each_half_of_the_codec_loads_alone(trained, tmp_path):
  # `compress` loads saved_model/encoder and `decompress` saved_model/decoder: their functions and
  # the weights those read. Each codes what the whole model codes, refuses the other half's work,
  # and is refused when damaged.
  model_path = trained.model_path
  whole = codec.Codec(model_path)
  encoder = codec.Codec(model_path, part="encoder")
  decoder = codec.Codec(model_path, part="decoder")
  for half in (encoder, decoder):
    assert len(half._module.weights) < len(whole._module.weights)
  assert not hasattr(decoder._module, "compress") and not hasattr(encoder._module, "synthesize")
  image = natural_image(20, 30, 7)
  data, _ = whole.encode(image)
  assert encoder.encode(image)[0] == data
  np.testing.assert_array_equal(decoder.decode(data), whole.decode(data))
  with pytest.raises(UserError, match="decode only"):
    decoder.encode(image)
  with pytest.raises(UserError, match="encode only"):
    encoder.decode(data)

  # A model exported before the halves existed codes with the whole SavedModel.
  old = tmp_path / "old"
  shutil.copytree(model_path, old)
  for part in codec.PARTS:
    shutil.rmtree(old / codec.SAVED_MODEL / part)
  assert codec.Codec(str(old), part="encoder").encode(image)[0] == data
  np.testing.assert_array_equal(codec.Codec(str(old), part="decoder").decode(data), whole.decode(data))

  # One weight of each half changed: its digest no longer matches.
  damaged = tmp_path / "damaged"
  shutil.copytree(model_path, damaged)
  script = f"""
import sys, tensorflow as tf
sys.path.insert(0, {ROOT!r})
from utils import codec
for part in codec.PARTS:
  path = {str(damaged / codec.SAVED_MODEL)!r} + "/" + part
  m = tf.saved_model.load(path)
  w = m.weights[-1]
  w.assign(w + tf.ones_like(w))
  tf.saved_model.save(m, path)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  for part in codec.PARTS:
    with pytest.raises(UserError, match="is damaged"):
      codec.Codec(str(damaged), part=part)
  lic = tmp_path / "x.lic"
  lic.write_bytes(data)
  out = run_script(trained.script, "decompress", lic, tmp_path / "x.png", "--model_path", damaged)
  assert out.returncode == 2 and "is damaged" in out.stderr, out.stderr


def _decompress_in_process(trained, capsys, path):
  rc = trained.main("decompress", str(path), str(path) + ".png", "--model_path", trained.model_path)
  err = capsys.readouterr().err.strip()
  return rc, err


def test_bad_files_exit_2_with_one_line(trained, odd_image, tmp_path, capsys):
  model_path = trained.model_path
  model = codec.Codec(model_path)
  good, _ = model.encode(np.asarray(Image.open(odd_image)))
  header, strings = bitstream.unpack(good)
  other = "bls2017" if trained.name != "bls2017" else "hcae"
  cases = {
      "truncated": good[:len(good) // 2],
      "one byte short": good[:-1],
      "random": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
      "wrong magic": b"GIF89a" + good[6:],
      "empty": b"",
      "flipped bit": good[:20] + bytes([good[20] ^ 4]) + good[21:],
      "other codec": bitstream.pack(bitstream.Header(other, header.fingerprint, 37, 53), strings),
      "other model": bitstream.pack(
          bitstream.Header(trained.name, bytes(b ^ 0xFF for b in header.fingerprint), 37, 53), strings),
  }
  expected = {"other codec": f"made by {other}, not {trained.name}",
              "other model": f"another {trained.name} model",
              "wrong magic": "wrong magic", "flipped bit": "check does not match"}
  for name, data in cases.items():
    path = tmp_path / f"{name.replace(' ', '_')}.lic"
    path.write_bytes(data)
    rc, err = _decompress_in_process(trained, capsys, path)
    assert rc == 2, name
    assert err.startswith("error: ") and "\n" not in err, (name, err)
    assert expected.get(name, "") in err, (name, err)
    assert not os.path.exists(str(path) + ".png"), name


def test_bad_file_in_a_real_process(trained, tmp_path):
  model_path = trained.model_path
  path = tmp_path / "junk.lic"
  path.write_bytes(b"\x89L\x01" + b"\x00" * 10)
  out = run_script(trained.script, "decompress", path, "--model_path", model_path)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert "Traceback" not in out.stderr


def test_user_errors(trained, odd_image, tmp_path, capsys):
  model_path = trained.model_path
  run = lambda *argv: (trained.main(*argv), capsys.readouterr().err)
  rc, err = run("compress", str(tmp_path / "missing.png"), "--model_path", model_path)
  assert rc == 2 and "no such file" in err
  rc, err = run("compress", str(odd_image), "--model_path", str(tmp_path / "nomodel"))
  assert rc == 2 and "no trained model at" in err
  existing = tmp_path / "exists.lic"
  existing.write_bytes(b"keep me")
  rc, err = run("compress", str(odd_image), str(existing), "--model_path", model_path)
  assert rc == 2 and "--overwrite" in err and existing.read_bytes() == b"keep me"
  rc, _ = run("compress", str(odd_image), str(existing), "--model_path", model_path, "--overwrite")
  assert rc == 0 and existing.read_bytes()[:2] == bitstream.MAGIC
  rc, err = run("train", "--lambda", "0", "--model_path", str(tmp_path / "m"))
  assert rc == 2 and "--lambda must be positive" in err


def test_evaluate_writes_rd_points_from_real_files(trained, image_folder, tmp_path, capsys):
  model_path = trained.model_path
  csv_path, files = tmp_path / "points.csv", tmp_path / "files"
  rc = trained.main("evaluate", "--eval_glob", str(image_folder / "*.png"), "--output", str(csv_path),
                    "--files_dir", str(files), "--model_path", model_path)
  assert rc == 0
  assert "mean over 3 images" in capsys.readouterr().out
  rows = rd.read_points(str(csv_path))
  assert [r["image"] for r in rows] == ["a.png", "c.png", "small.png"]
  for row in rows:
    assert row["codec"] == trained.name and float(row["setting"]) == 0.01
    h, w = Image.open(image_folder / row["image"]).size[::-1]
    size = os.path.getsize(files / (row["image"] + ".lic"))
    assert row["bpp"] == pytest.approx(8 * size / (h * w), abs=1e-5)
    # tf.image.ssim_multiscale clips each scale's terms at 0: a tiny model whose reconstruction
    # has lost the photo's structure scores exactly 0 (the hcae fixture did once in CI).
    assert row["est_bpp"] > 0 and 0 <= row["ms_ssim"] <= 1 and row["psnr"] > 0


def test_factorized_tables_built_in_a_graph_are_the_librarys():
  """utils.entropy_models builds a factorized prior's range-coding tables in a graph (seconds
  faster per export); they must be the tables tensorflow-compression builds eagerly, bit for bit,
  or the same weights would code other files."""
  import tensorflow as tf
  import tensorflow_compression as tfc
  from utils.entropy_models import factorized
  tf.random.set_seed(3)
  prior = tfc.NoisyDeepFactorized(batch_shape=(6,))
  for v in prior.trainable_variables:  # away from the initialisation, as a trained prior is
    v.assign(v + tf.random.normal(v.shape, stddev=0.5))
  ours = factorized(prior, True)
  theirs = tfc.ContinuousBatchedEntropyModel(prior, coding_rank=3, compression=True,
                                             offset_heuristic=False)
  assert type(ours) is not type(theirs) and ours.name == theirs.name
  np.testing.assert_array_equal(ours.cdf.numpy(), theirs.cdf.numpy())
  np.testing.assert_array_equal(ours.cdf_offset.numpy(), theirs.cdf_offset.numpy())
  latents = tf.round(tf.random.normal((2, 5, 7, 6), stddev=4.0))
  np.testing.assert_array_equal(ours.compress(latents).numpy(), theirs.compress(latents).numpy())
