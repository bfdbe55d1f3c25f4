"""jpeg_baseline.py: Pillow sweeps, the dct/klt teaching codec end to end, energy compaction, bad files."""
import dataclasses
import os
import re

import numpy as np
import pytest
from PIL import Image

import jpeg_baseline as jb
from conftest import natural_image, run_script
from utils import bitstream, data, rd
from utils.errors import BitstreamError

VARIANTS = [("dct", None), ("klt", "global"), ("klt", "image")]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """96x128 crops of the built-in eval photos: real photographs, small enough to code quickly."""
  folder = tmp_path_factory.mktemp("photos")
  for path in data.builtin_paths("eval"):
    name = os.path.splitext(os.path.basename(path))[0]
    Image.fromarray(data.read_image(path)[40:136, 60:188]).save(folder / f"{name}.png")
  return folder


def run_main(capsys, *argv):
  rc = jb.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


# --- transforms --------------------------------------------------------------------------------


def test_zigzag_and_dct_match_their_definitions():
  assert jb.ZIGZAG[:10].tolist() == [0, 1, 8, 16, 9, 2, 3, 10, 17, 24]
  assert sorted(jb.ZIGZAG.tolist()) == list(range(64))
  block = natural_image(8, 8)[..., 0].astype(np.float64)
  c = jb.dct_matrix()
  separable = (c @ block @ c.T).ravel()[jb.ZIGZAG]
  assert np.allclose(jb.dct_basis() @ block.ravel(), separable)
  assert separable[0] == pytest.approx(block.mean() * 8)


def _assert_orthonormal_and_perfect(basis, blocks):
  assert np.allclose(basis @ basis.T, np.eye(64), atol=1e-12)
  assert np.allclose((blocks @ basis.T) @ basis, blocks, atol=1e-9)


def test_transforms_are_orthonormal():
  """Without quantization every transform reconstructs the blocks exactly."""
  image = natural_image(64, 96, 3)
  groups = jb.group_blocks(jb.image_planes(image, "420"))
  blocks = np.concatenate(groups)
  _assert_orthonormal_and_perfect(jb.dct_basis(), blocks)
  fitted = jb.klt_rotation(jb.second_moment(blocks))
  _assert_orthonormal_and_perfect(fitted @ jb.dct_basis(), blocks)
  for rotation in jb.global_rotations("420") + jb.global_rotations("444"):
    _assert_orthonormal_and_perfect(jb.basis_from_rotation(rotation), blocks)
  coarse = jb.quantize_rotation(fitted, jb.IMAGE_PRECISION)
  _assert_orthonormal_and_perfect(jb.basis_from_rotation(coarse), blocks)
  # Even a degenerate rotation (what a crafted file could hold) yields an orthonormal basis.
  _assert_orthonormal_and_perfect(jb.basis_from_rotation(np.zeros((64, 64), np.int64)), blocks)


def test_colour_blocks_and_sampling_invert():
  image = natural_image(37, 53, 4)
  planes = jb.rgb_to_ycbcr(image)
  assert np.array_equal(jb.ycbcr_to_rgb(planes), image)
  for plane in planes:
    assert np.array_equal(jb.from_blocks(jb.to_blocks(plane), 37, 53), plane)
  flat = np.full((19, 27), 42.5)
  assert np.allclose(jb.upsample(jb.downsample(np.full((37, 53), 42.5)), 37, 53), 42.5)
  assert jb.upsample(flat, 37, 53).shape == (37, 53)


def test_klt_beats_dct_in_energy_compaction_on_its_own_image():
  groups = jb.group_blocks(jb.rgb_to_ycbcr(natural_image(96, 128, 7)))
  for blocks, (dct, klt) in zip(groups, jb.compaction_bases(groups)):
    dct_kept, klt_kept = jb.kept_energy(blocks, dct), jb.kept_energy(blocks, klt)
    assert all(k >= d - 1e-12 for d, k in zip(dct_kept, klt_kept)), (dct_kept, klt_kept)
    assert any(k > d + 1e-4 for d, k in zip(dct_kept, klt_kept))
    assert dct_kept[-1] == pytest.approx(1.0) and klt_kept[-1] == pytest.approx(1.0)


# --- the codec in memory ----------------------------------------------------------------------


@pytest.mark.parametrize("codec,basis", VARIANTS)
@pytest.mark.parametrize("subsampling", ["420", "444"])
def test_round_trip_any_size(codec, basis, subsampling):
  for size in [(37, 53), (1, 1), (8, 8), (9, 17)]:
    image = natural_image(*size, seed=sum(size))
    settings = jb.Settings(codec, 90, subsampling, basis)
    encoded = jb.encode(image, settings)
    assert encoded == jb.encode(image, settings)
    header = bitstream.unpack(encoded)[0]
    assert (header.codec, header.height, header.width) == (codec, *size)
    decoded, back = jb.decode(encoded)
    assert back == settings and decoded.shape == image.shape and decoded.dtype == np.uint8
    if size == (37, 53):
      assert 10 * np.log10(255 ** 2 / np.mean((decoded - image.astype(float)) ** 2)) > 30


def test_rate_and_quality_grow_with_quality():
  image = natural_image(64, 80, 9)
  for codec, basis in VARIANTS:
    sizes, errors = [], []
    for quality in (5, 25, 50, 75, 95):
      encoded = jb.encode(image, jb.Settings(codec, quality, "420", basis))
      sizes.append(len(encoded))
      errors.append(np.mean((jb.decode(encoded)[0] - image.astype(float)) ** 2))
    assert np.all(np.diff(sizes) > 0) and np.all(np.diff(errors) < 0), (codec, basis, sizes, errors)


def test_dct_lands_near_libjpeg():
  image = data.read_image(data.builtin_paths("eval")[0])
  qualities = (10, 30, 50, 75, 90)

  def curve(code):
    points = []
    for q in qualities:
      encoded, decoded = code(q)
      points.append((8 * len(encoded) / image[..., 0].size,
                     10 * np.log10(255 ** 2 / np.mean((decoded - image.astype(float)) ** 2))))
    return points

  jpeg = curve(lambda q: jb.pillow_code(image, "jpeg", q))
  dct = curve(lambda q: (lambda e: (e, jb.decode(e)[0]))(jb.encode(image, jb.Settings("dct", q))))
  assert -15 < rd.bd_rate(jpeg, dct) < 5


def _repack(encoded, strings):
  return bitstream.pack(bitstream.unpack(encoded)[0], strings)


def test_crafted_payloads_with_valid_checksums_are_bitstream_errors():
  """Damage inside the strings, re-framed (without the key): an error or a picture, nothing else."""
  rng = np.random.default_rng(0)
  image = natural_image(24, 40, 11)
  raised = 0
  trials = 0
  for codec, basis in [("dct", None), ("klt", "image")]:
    encoded = jb.encode(image, jb.Settings(codec, 60, "420", basis))
    strings = bitstream.unpack(encoded)[1]
    candidates = [strings[:-1], strings + [b"x"], strings[::-1]]
    for i, s in enumerate(strings):
      candidates += [strings[:i] + [s[:-1]] + strings[i + 1:], strings[:i] + [s + b"\0"] + strings[i + 1:]]
      for _ in range(25):
        bad = bytearray(s)
        bad[rng.integers(len(bad))] = rng.integers(256)
        candidates.append(strings[:i] + [bytes(bad)] + strings[i + 1:])
    for candidate in candidates:
      trials += 1
      try:
        decoded, _ = jb.decode(_repack(encoded, candidate))
        assert decoded.shape == image.shape
      except BitstreamError:
        raised += 1
  assert raised > trials // 2


# --- command line ------------------------------------------------------------------------------


def test_dct_and_klt_round_trip_through_files_in_separate_processes(tmp_path, capsys):
  """A dct file made in another process decodes here; a klt file made here decodes in another one
  (which relearns the global KLT basis: it must come out the same bits)."""
  src = tmp_path / "photo.png"
  image = natural_image(45, 67, 12)
  Image.fromarray(image).save(src)
  out = run_script("jpeg_baseline.py", "compress", src, "--quality", "60")
  assert out.returncode == 0, out.stderr
  lic = tmp_path / "photo.png.lic"
  bpp = float(re.search(r"([\d.]+) bpp", out.stdout).group(1))
  assert bpp == pytest.approx(8 * lic.stat().st_size / (45 * 67), abs=1e-4)
  assert "PSNR" in out.stdout and "MS-SSIM" in out.stdout
  assert lic.read_bytes() == jb.encode(image, jb.Settings("dct", 60, "420"))
  rc, out, err = run_main(capsys, "decompress", lic)
  assert rc == 0, err
  decoded = np.asarray(Image.open(tmp_path / "photo.png.lic.png"))
  assert 10 * np.log10(255 ** 2 / np.mean((decoded - image.astype(float)) ** 2)) > 30

  klt = tmp_path / "klt.lic"
  rc, out, err = run_main(capsys, "compress", src, klt, "--codec", "klt", "--subsampling", "444")
  assert rc == 0, err
  out = run_script("jpeg_baseline.py", "decompress", klt, tmp_path / "klt.png")
  assert out.returncode == 0, out.stderr
  assert "klt (global basis), quality 75, 4:4:4" in out.stdout
  assert np.array_equal(np.asarray(Image.open(tmp_path / "klt.png")), jb.decode(klt.read_bytes())[0])


def test_bad_files_exit_2_with_one_line(tmp_path, capsys):
  image = natural_image(30, 40, 13)
  good = {name: jb.encode(image, jb.Settings(codec, 50, "420", basis))
          for name, (codec, basis) in zip(("dct", "global", "image"), VARIANTS)}
  header = bitstream.unpack(good["dct"])[0]
  other = bitstream.pack(bitstream.Header("bls2017", b"\1\2", 30, 40), [b"\0" * 50])
  png = tmp_path / "real.png"
  Image.fromarray(image).save(png)
  cases = {
      "truncated": (good["dct"][:-7], "truncated|check does not match"),
      "random": (np.random.default_rng(0).bytes(500), "not a compressed image"),
      "empty": (b"", "not a compressed image"),
      "png": (png.read_bytes(), "not a compressed image"),
      "other": (other, "made by bls2017"),
      "fingerprint": (bitstream.pack(dataclasses.replace(header, fingerprint=b"\0\0"),
                                     bitstream.unpack(good["dct"])[1]), "incompatible version"),
      "basis": (bitstream.pack(dataclasses.replace(bitstream.unpack(good["global"])[0], fingerprint=b"\0\0"),
                               bitstream.unpack(good["global"])[1]), "another global KLT basis"),
      "strings": (_repack(good["image"], bitstream.unpack(good["image"])[1][:5]), "strings"),
  }
  for name, (payload, match) in cases.items():
    path = tmp_path / f"{name}.lic"
    path.write_bytes(payload)
    rc, _, err = run_main(capsys, "decompress", path, tmp_path / f"{name}.png")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert re.search(match, lines[0]), (name, lines[0])
    assert not (tmp_path / f"{name}.png").exists()


def test_user_errors_and_default_outputs(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  Image.fromarray(natural_image(20, 30, 14)).save("in.png")
  assert run_main(capsys, "compress", "in.png")[0] == 0
  assert os.path.exists("in.png.lic")
  rc, _, err = run_main(capsys, "compress", "in.png")
  assert rc == 2 and "exists; pass --overwrite" in err
  assert run_main(capsys, "compress", "in.png", "--overwrite", "--quality", "20")[0] == 0
  assert run_main(capsys, "decompress", "in.png.lic")[0] == 0
  assert Image.open("in.png.lic.png").size == (30, 20)
  for argv, match in [(("compress", "missing.png"), "no such file"),
                      (("compress", "in.png", "x.lic", "--quality", "0"), "quality must be 1..100"),
                      (("decompress", "missing.lic"), "no such file"),
                      (("compaction", "missing.png"), "no such file")]:
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2 and err.startswith("error: ") and match in err, (argv, err)


def test_jpeg_sweep_rate_strictly_increases_with_quality(photo_folder, tmp_path, capsys):
  csv = tmp_path / "jpeg.csv"
  rc, out, err = run_main(capsys, "sweep", "--codec", "jpeg", "--eval_glob", photo_folder / "*.png",
                          "--output", csv)
  assert rc == 0, err
  rows = rd.read_points(str(csv))
  assert {r["codec"] for r in rows} == {"jpeg"} and len(rows) == 3 * len(jb.JPEG_LADDER)
  for image in {r["image"] for r in rows}:
    mine = [r for r in rows if r["image"] == image]
    assert [int(r["setting"]) for r in mine] == list(jb.JPEG_LADDER)
    assert np.all(np.diff([r["bpp"] for r in mine]) > 0), image
    assert np.all(np.diff([r["psnr"] for r in mine]) > 0), image
  assert "jpeg 50:" in out


def test_sweep_of_every_codec(photo_folder, tmp_path, capsys):
  csv = tmp_path / "all.csv"
  rc, out, err = run_main(capsys, "sweep", "--eval_glob", photo_folder / "coffee.png", "--output", csv,
                          "--qualities", "30,60")
  assert rc == 0, err
  rows = rd.read_points(str(csv))
  assert sorted({r["codec"] for r in rows}) == sorted(
      ["jpeg", "jpeg2000", "webp", "avif", "dct", "klt-global", "klt-image"])
  assert all(r["bpp"] > 0 and 15 < r["psnr"] < 60 and 0 < r["ms_ssim"] <= 1 for r in rows)
  assert all(r["est_bpp"] != r["est_bpp"] for r in rows)  # empty for classical codecs
  assert re.search(r"dct: [+-][\d.]+ % bitrate", out)


def test_sweep_writes_one_csv_per_codec_by_default(photo_folder, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  rc, out, err = run_main(capsys, "sweep", "--codec", "klt", "--basis", "image", "--subsampling", "444",
                          "--eval_glob", photo_folder / "chelsea.png", "--qualities", "50")
  assert rc == 0, err
  assert os.listdir("results") == ["klt-image-444.csv"]
  assert "BD-rate against jpeg-444" in out


def test_missing_pillow_codec_is_a_clear_error(photo_folder, capsys, monkeypatch):
  monkeypatch.setattr(jb.features, "check", lambda feature: feature != "avif")
  rc, _, err = run_main(capsys, "sweep", "--codec", "avif", "--eval_glob", photo_folder / "*.png")
  assert rc == 2 and "no AVIF support" in err
  rc, _, err = run_main(capsys, "sweep", "--codec", "webp", "--qualities", "101",
                        "--eval_glob", photo_folder / "*.png")
  assert rc == 2 and "outside webp's range" in err


def test_compaction_figure(photo_folder, tmp_path, capsys):
  prefix = tmp_path / "fig" / "coffee"
  rc, out, err = run_main(capsys, "compaction", photo_folder / "coffee.png", "--output", prefix,
                          "--crop", "64")
  assert rc == 0, err
  assert (tmp_path / "fig" / "coffee_panel.png").stat().st_size > 1000
  assert (tmp_path / "fig" / "coffee_psnr.png").stat().st_size > 1000
  table = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
  assert [int(r[0]) for r in table] == list(jb.COMPACTION_KS)
  dct = [float(r[1]) for r in table[:-1]]
  klt = [float(r[3]) for r in table[:-1]]
  assert np.all(np.diff(dct) > 0) and np.all(np.diff(klt) > 0)
  assert table[-1][1] == table[-1][2] == "lossless"
