"""Hostile and unusual inputs: fuzzed files for every decoder, images of every kind for compress,
senseless training flags, tiled decoding, and a training run killed and resumed.

The neural codecs use the session's tiny models (conftest.trained); tools/fuzz.py is the long run.
"""
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import jpeg_baseline as jb
from conftest import ROOT, natural_image
from tools import fuzz
from utils import bitstream, codec, data, model as model_lib
from utils.errors import BitstreamError, DecodeTimeout, UserError


def _one_line_error(capsys):
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
  return err


def _outcomes(target, cases, crafted_share):
  counts = {}
  for index in range(cases):
    case = fuzz.make_case(target, index, seed=1, crafted_share=crafted_share)
    outcome, seconds, message = fuzz.run_case(target, case)
    assert not outcome.startswith("FAIL"), (case.kind, outcome, message)
    counts[outcome] = counts.get(outcome, 0) + 1
  return counts


# --- bitstreams ------------------------------------------------------------------------------


def test_neural_decoders_reject_damaged_and_edited_files(trained):
  target = fuzz.neural_target(trained.name, trained.model_path, [natural_image(37, 53, 5)] * 2)
  # Crafted (re-signed) cases can hang tensorflow-compression's decoder: tools/fuzz.py runs them in
  # a worker process; here only what anyone can make without the model.
  counts = _outcomes(target, 150, crafted_share=0)
  assert counts["rejected"] > 140 and set(counts) <= {"rejected", "intact"}, counts


def test_a_string_re_signed_with_the_model_key_reaches_the_range_decoder(trained):
  model = codec.Codec(trained.model_path)
  good, _ = model.encode(natural_image(20, 30, 3))
  header, strings = bitstream.unpack(good)
  # Bytes after the end of a range-coded string: tensorflow-compression's end test fails.
  forged = bitstream.pack(header, strings[:-1] + [strings[-1] + b"\xff" * 8], key=model._key)
  with pytest.raises(BitstreamError, match="range-coded string does not end"):
    model.decode(forged)


@pytest.mark.parametrize("name", fuzz.TEACHING)
def test_teaching_decoders_survive_every_kind_of_damage(name):
  target = fuzz.teaching_target(name, [natural_image(37, 53, 5), natural_image(24, 40, 6)])
  counts = _outcomes(target, 300, crafted_share=0.3)
  assert counts["rejected"] > 200 and set(counts) <= {"rejected", "intact", "forged"}, counts


def test_entropy_decoding_is_stopped_by_its_time_limit():
  start = time.time()
  with pytest.raises(DecodeTimeout, match="did not finish within"):
    codec._within(0.2, time.sleep, 2)
  assert time.time() - start < 1.5


def test_sizes_are_bounded_and_encodings_unique():
  bitstream.check_image_size(8192, 8192)
  bitstream.pack(bitstream.Header("bls2017", b"\0\0", 1 << 15, 1 << 11), [b"x"])
  for height, width in [(8193, 8193), (1 << 15, (1 << 11) + 1), ((1 << 15) + 1, 1)]:
    with pytest.raises(BitstreamError, match="outside the supported range"):
      bitstream.check_image_size(height, width)
  # An overlong varint: another encoding of the same file is refused.
  good = bitstream.pack(bitstream.Header("bls2017", b"\0\0", 5, 7), [b"abc"], key=b"k")
  body = bytearray(good)
  at = 6 + bitstream.CHECK_BYTES
  body[at] |= 0x80
  body.insert(at + 1, 0)
  with pytest.raises(BitstreamError, match="minimally encoded"):
    bitstream.unpack(bytes(body))


def _synthesis(name, channels=5):
  """The model's float32 synthesis with perturbed weights (GDN's initial ones are the identity)."""
  import importlib
  synthesis = importlib.import_module(name).synthesis_transform(4)
  synthesis.build((None, None, None, channels))
  rng = np.random.default_rng(1)
  synthesis.set_weights([w + rng.normal(0, .05, w.shape).astype(w.dtype)
                         for w in synthesis.get_weights()])
  return synthesis


def _as_float64(keras_model):
  """The same Keras network in float64: its config with every float32 dtype changed."""
  import tensorflow as tf
  import tensorflow_compression as tfc

  def float64(config):
    if isinstance(config, dict):
      return {k: "float64" if k == "dtype" and v == "float32" else float64(v)
              for k, v in config.items()}
    return [float64(v) for v in config] if isinstance(config, list) else config
  twin = tf.keras.Sequential.from_config(float64(keras_model.get_config()),
                                         custom_objects={"GDN": tfc.GDN})
  twin.build(keras_model.input_shape)
  twin.set_weights([w.astype("float64") for w in keras_model.get_weights()])
  assert {layer.dtype for layer in twin.layers} == {"float64"}
  return twin


@pytest.mark.parametrize("name", ["bls2017", "bmshj2018", "hcae"])
def test_float64_synthesis_is_the_keras_network_in_float64(name):
  synthesis = _synthesis(name)
  mine = model_lib.Float64Synthesis(synthesis)
  assert mine.input_channels == 5
  assert [w.dtype for w in mine.weights] == ["float64"] * len(synthesis.weights)
  for copy, source in zip(mine.weights, synthesis.get_weights()):
    np.testing.assert_array_equal(copy.numpy(), source.astype("float64"))
  latents = np.round(np.random.default_rng(0).normal(0, 3, (1, 5, 7, 5)))  # decoders' are integers
  expected = _as_float64(synthesis)(latents).numpy()
  got = mine(latents).numpy()
  assert got.dtype == np.float64 and got.shape == expected.shape
  np.testing.assert_array_equal(got, expected)
  # and the float32 network computes the same up to float32 rounding
  np.testing.assert_allclose(synthesis(latents).numpy(), got, rtol=1e-4, atol=1e-3)


def test_float64_synthesis_refuses_layers_it_does_not_compute():
  import tensorflow as tf
  import tensorflow_compression as tfc
  cases = {
      "Conv2D": [tf.keras.layers.Conv2D(3, 3, padding="same")],
      "only undilated 'same'": [tf.keras.layers.Conv2DTranspose(3, 3, 2, padding="valid")],
      "with a bias": [tf.keras.layers.Conv2DTranspose(3, 3, 2, padding="same", use_bias=False)],
      "not an inverse GDN": [tf.keras.layers.Conv2DTranspose(3, 3, 2, padding="same",
                                                             activation=tfc.GDN())],
      "alpha = epsilon = 1": [tf.keras.layers.Conv2DTranspose(
          3, 3, 2, padding="same", activation=tfc.GDN(inverse=True, alpha_parameter=2.))],
  }
  for message, layers in cases.items():
    network = tf.keras.Sequential(layers)
    network.build((None, None, None, 2))
    with pytest.raises(TypeError, match=message):
      model_lib.Float64Synthesis(network)


@pytest.mark.parametrize("name", ["bls2017", "bmshj2018", "hcae"])
def test_tiled_synthesis_equals_the_whole(name):
  synthesis = model_lib.Float64Synthesis(_synthesis(name))
  latents = np.round(np.random.default_rng(0).normal(0, 3, (1, 5, 7, 5)))
  whole = model_lib.to_uint8(synthesis(latents))[0].numpy()
  tiled = model_lib.tiled_synthesis(synthesis, latents, tile=2).numpy()
  np.testing.assert_array_equal(tiled, whole)
  # Without the halo the tiles' borders differ: the comparison above does see them.
  assert not np.array_equal(model_lib.tiled_synthesis(synthesis, latents, tile=2, halo=0), whole)


@pytest.mark.parametrize("name", ["bls2017", "bmshj2018", "hcae"])
def test_synthesis_of_part_of_the_output_is_that_part_of_the_whole(name):
  # Asked for some rows and columns, each layer computes only what they depend on (utils/model.py).
  synthesis = model_lib.Float64Synthesis(_synthesis(name))
  latents = np.round(np.random.default_rng(1).normal(0, 3, (1, 5, 7, 5)))
  whole = synthesis(latents).numpy()
  height, width = 5 * synthesis.factor(1), 7 * synthesis.factor(2)
  assert whole.shape[1:3] == (height, width)
  for rows, cols in (((0, height), (0, width)), ((0, 16), (0, 16)), ((17, 45), (33, 34)),
                     ((height - 16, height), (width - 20, width)), ((3, 4), (width - 1, width))):
    part = synthesis(latents, rows=rows, cols=cols).numpy()
    np.testing.assert_array_equal(part, whole[:, rows[0]:rows[1], cols[0]:cols[1]])


# --- inputs to compress ----------------------------------------------------------------------


def _png(path, width, height, depth=8, color_type=2, rows=None):
  """A PNG written by hand: Pillow writes no 16-bit colour, nor a header without pixels (which is
  enough for a size check)."""
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
  pixels = chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + pixels + chunk(b"IEND", b""))


def _png_header_only(path, width, height):
  _png(path, width, height)


def _png16(path, samples):
  height, width, channels = samples.shape
  rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(height))
  _png(path, width, height, 16, {1: 0, 3: 2}[channels], rows)


def test_image_kinds_become_rgb(tmp_path, caplog):
  rgb = natural_image(6, 10, 1)
  Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
  Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
  Image.fromarray(rgb).save(tmp_path / "rgb.tif")
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
  ramp = (np.arange(60, dtype=np.uint16).reshape(6, 10, 1) * 1000)
  _png16(tmp_path / "gray16.png", ramp)
  _png16(tmp_path / "rgb16.png", np.repeat(ramp, 3, axis=2))
  for name in ("gray.png", "palette.png", "rgb.tif", "cmyk.jpg", "gray16.png", "rgb16.png"):
    image = data.read_image(str(tmp_path / name))
    assert image.shape == (6, 10, 3) and image.dtype == np.uint8, name
  expected = (ramp[..., 0].astype(np.int64) * 255 + 32767) // 65535
  np.testing.assert_array_equal(data.read_image(str(tmp_path / "gray16.png"))[..., 0], expected)
  assert np.abs(data.read_image(str(tmp_path / "rgb16.png"))[..., 0] - expected).max() <= 1
  cmyk = data.read_image(str(tmp_path / "cmyk.jpg")).astype(int)
  assert np.abs(cmyk - rgb).mean() < 12  # the colours survive the CMYK round trip

  with caplog.at_level("WARNING", logger="utils.data"):
    Image.fromarray(np.dstack([rgb, np.full((6, 10), 128, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    assert data.read_image(str(tmp_path / "rgba.png")).shape == (6, 10, 3)
  assert "alpha channel is dropped" in caplog.text


def test_exif_orientation_is_applied(tmp_path):
  image = Image.fromarray(natural_image(6, 10, 2))
  exif = Image.Exif()
  exif[0x0112] = 6  # stored turned: shown rotated by 90 degrees
  image.save(tmp_path / "turned.jpg", exif=exif, quality=95)
  assert data.read_image(str(tmp_path / "turned.jpg")).shape == (10, 6, 3)


def test_unreadable_inputs_are_one_line_errors(tmp_path):
  (tmp_path / "text.png").write_text("not an image")
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "folder.png").mkdir()
  _png_header_only(tmp_path / "huge.png", 10000, 8000)
  _png_header_only(tmp_path / "bomb.png", 30000, 30000)  # past Pillow's own limit too
  png = tmp_path / "ok.png"
  Image.fromarray(natural_image(20, 30, 3)).save(png)
  (tmp_path / "cut.png").write_bytes(png.read_bytes()[:60])
  cases = {"text.png": "cannot read image", "empty.png": "cannot read image",
           "missing.png": "no such file", "folder.png": "is a directory",
           "huge.png": "10000x8000 pixels; images of at most 67108864 pixels",
           "bomb.png": "images of at most 67108864 pixels", "cut.png": "cannot read image"}
  for name, match in cases.items():
    with pytest.raises(UserError, match=match):
      data.read_image(str(tmp_path / name))
  # Damaged files never raise anything but UserError.
  rng = np.random.default_rng(0)
  Image.fromarray(natural_image(20, 30, 4)).save(tmp_path / "ok.jpg", quality=90)
  for source in (png.read_bytes(), (tmp_path / "ok.jpg").read_bytes()):
    for trial in range(60):
      bad = bytearray(source)
      for _ in range(1 + trial % 4):
        bad[rng.integers(len(bad))] = rng.integers(256)
      path = tmp_path / f"bad{trial}"
      path.write_bytes(bytes(bad[:len(bad) - trial % 7 * 11]))
      try:
        assert data.read_image(str(path)).shape[2] == 3
      except UserError:
        pass


def test_tiny_images_round_trip_and_outputs_are_guarded(trained, tmp_path, capsys):
  for size in [(1, 1), (3, 5)]:
    src = tmp_path / f"tiny{size[0]}.png"
    Image.fromarray(natural_image(*size, 7)).save(src)
    assert trained.main("compress", str(src), "--model_path", trained.model_path) == 0
    assert trained.main("decompress", str(src) + ".lic", "--model_path", trained.model_path) == 0
    assert np.asarray(Image.open(str(src) + ".lic.png")).shape == (*size, 3)
  capsys.readouterr()
  src = tmp_path / "tiny1.png"
  (tmp_path / "a_file").write_text("x")
  for output, match in [(tmp_path / "no_dir" / "x.lic", "no directory"), (tmp_path, "is a directory"),
                        (tmp_path / "a_file" / "x.lic", "no directory"),
                        (str(src) + ".lic", "exists; pass --overwrite")]:
    before = sorted(os.listdir(tmp_path))
    assert trained.main("compress", str(src), str(output), "--model_path", trained.model_path) == 2
    assert match in _one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even a temporary file


def test_teaching_codec_guards_inputs_and_outputs(tmp_path, capsys):
  src = tmp_path / "in.png"
  Image.fromarray(natural_image(3, 5, 8)).save(src)
  assert jb.main(["compress", str(src)]) == 0
  assert jb.main(["decompress", str(src) + ".lic"]) == 0
  assert np.asarray(Image.open(str(src) + ".lic.png")).shape == (3, 5, 3)
  capsys.readouterr()
  _png_header_only(tmp_path / "huge.png", 9000, 9000)
  for argv, match in [(["compress", str(tmp_path)], "is a directory"),
                      (["compress", str(tmp_path / "huge.png")], "images of at most"),
                      (["compress", str(src), str(tmp_path / "none" / "x.lic")], "no directory"),
                      (["compress", str(src)], "exists; pass --overwrite"),
                      (["decompress", str(src)], "not a compressed image")]:
    assert jb.main(argv) == 2, argv
    assert match in _one_line_error(capsys), argv


# --- training flags, NaN, interruption ------------------------------------------------------


def test_senseless_training_flags_fail_before_any_work(trained, tmp_path, capsys):
  model_path = tmp_path / "m"
  (tmp_path / "few").mkdir()
  Image.fromarray(natural_image(40, 40, 9)).save(tmp_path / "few" / "a.png")
  cases = [(["--lambda", "0"], "--lambda must be positive and finite"),
           (["--lambda", "-1"], "--lambda must be positive and finite"),
           (["--lambda", "nan"], "--lambda must be positive and finite"),
           (["--learning_rate", "inf"], "--learning_rate must be positive and finite"),
           (["--backup_steps", "0"], "--backup_steps must be positive"),
           (["--spike_factor", "1"], "--spike_factor must be 0 (off) or above 1"),
           (["--num_filters", "0"], "--num_filters must be positive"),
           (["--patch_size", "100000"], "no training image is at least 100000x100000"),
           (["--dataset", "folder", "--train_glob", str(tmp_path / "nothing*.png")], "no images match"),
           (["--dataset", "folder", "--train_glob", str(tmp_path / "few" / "*.png"), "--patch_size", "64"],
            "no training image is at least 64x64"),
           (["--eval_glob", str(tmp_path / "none*.png")], "no images match")]
  for flags, match in cases:
    rc = trained.main("train", *flags, "--model_path", str(model_path))
    assert rc == 2 and match in _one_line_error(capsys), flags
    assert not model_path.exists(), flags  # refused before the model directory was made


def test_nan_loss_names_lambda_and_step(tmp_path):
  import bls2017
  from utils import cli, training
  Image.fromarray(natural_image(32, 32, 3)).save(tmp_path / "val.png")
  parser, flags = cli.build_parser("bls2017", bls2017.add_model_flags)
  args = parser.parse_args(["train", "--num_filters", "4", "--patch_size", "16", "--batch_size", "1",
                            "--epochs", "1", "--steps_per_epoch", "3", "--verbose", "0",
                            "--eval_glob", str(tmp_path / "val.png"), "--model_path", str(tmp_path / "m")])
  args.lmbda = float("nan")  # past the flag check: the loss is NaN from the first step
  with pytest.raises(UserError, match=r"NaN at step 1 \(epoch 1, step 1\) with lambda nan"):
    training.train(bls2017.build_model, args, cli.model_config("bls2017", args, flags), export=False)
  assert not (tmp_path / "m" / "backup" / "chief" / "checkpoint").exists()  # nothing NaN was saved


def test_a_run_whose_steps_are_all_refused_stops_with_the_last_good_weights(tmp_path, monkeypatch):
  import bls2017
  from utils import cli, training
  Image.fromarray(natural_image(32, 32, 3)).save(tmp_path / "val.png")
  parser, flags = cli.build_parser("bls2017", bls2017.add_model_flags)
  args = parser.parse_args(["train", "--num_filters", "4", "--patch_size", "16", "--batch_size", "1",
                            "--epochs", "1", "--steps_per_epoch", "8", "--verbose", "0", "--rollbacks", "1",
                            "--eval_glob", str(tmp_path / "val.png"), "--model_path", str(tmp_path / "m")])
  monkeypatch.setattr(training, "REFUSED_IN_A_ROW", 3)
  built = []

  def build(a):
    model = bls2017.build_model(a)
    # As if a long run had settled at a loss far below this model's: every step is a spike.
    model.spike_guard.taken.assign(1000.0)
    model.spike_guard.average.assign(1e-3)
    built.append((model, [v.numpy() for v in model.trainable_variables]))
    return model

  with pytest.raises(UserError, match=r"refused its last 3 steps up to step 3 \(epoch 1, step 3\) with "
                     r"lambda 0.01 \(after 1 rollback to the last checkpoint, each on at 0.5 times the "
                     r"learning rate before it\): each loss was above --spike_factor 10 times the running "
                     r"mean 0.001"):
    training.train(build, args, cli.model_config("bls2017", args, flags), export=False)
  # No checkpoint was ever saved: the rollback started afresh, at half the rate, and was refused too.
  assert len(built) == 2
  assert built[0][0].optimizer._learning_rate.peak == 1e-3 and built[1][0].optimizer._learning_rate.peak == 5e-4
  for model, initial in built:
    assert int(model.optimizer.iterations.numpy()) == 3 and float(model.spike_guard.refused.numpy()) == 3
    assert initial and all(np.array_equal(v.numpy(), w) for v, w in zip(model.trainable_variables, initial))


@pytest.mark.parametrize("wreck", ["spike", "nan"])
def test_a_run_that_blows_up_rolls_back_to_its_checkpoint_and_goes_on_at_half_the_rate(
    tmp_path, monkeypatch, caplog, wreck):
  import bls2017
  import tensorflow as tf
  from utils import cli, training
  Image.fromarray(natural_image(32, 32, 3)).save(tmp_path / "val.png")
  parser, flags = cli.build_parser("bls2017", bls2017.add_model_flags)
  args = parser.parse_args(["train", "--num_filters", "4", "--patch_size", "16", "--batch_size", "1",
                            "--epochs", "1", "--steps_per_epoch", "8", "--backup_steps", "1",
                            # 16-pixel crops' losses differ by more than 10x; the wreck's are 1e4x.
                            "--spike_factor", "1000", "--deterministic",
                            "--verbose", "0", "--eval_glob", str(tmp_path / "val.png"),
                            "--model_path", str(tmp_path / "m")])
  monkeypatch.setattr(training, "REFUSED_IN_A_ROW", 3)
  built, wrecked = [], []

  def build(a):
    model = bls2017.build_model(a)
    model.spike_guard.warmup = 1  # the guard compares from the second step on
    built.append(model)
    return model

  backup_step_end = training._Backup.on_train_batch_end

  def wreck_once_after_step_2(self, batch, logs=None):
    backup_step_end(self, batch, logs)  # step 2's checkpoint is saved first, with the good weights
    if int(self.model.optimizer.iterations.numpy()) == 2 and not wrecked:
      # As if step 2's update had wrecked the weights: the synthesis' last bias 100 too high (pixels
      # 25 500 too bright, every later loss a spike), or NaN.
      bias = [v for v in self.model.trainable_variables if v.name.endswith("bias:0")
              and "DeepFactorized" not in v.name][-1]
      bias.assign(bias + 100.0 if wreck == "spike" else tf.fill(bias.shape, float("nan")))
      wrecked.append(bias.numpy())

  monkeypatch.setattr(training._Backup, "on_train_batch_end", wreck_once_after_step_2)
  datasets, train_dataset = [], training.train_dataset
  monkeypatch.setattr(training, "train_dataset", lambda *a: datasets.append(a) or train_dataset(*a))
  with caplog.at_level("INFO", logger="utils.training"):
    history = training.train(build, args, cli.model_config("bls2017", args, flags), export=False)
  assert len(datasets) == 1  # no --finish_epochs: the rollback goes on with the same crops
  reason = "refused its last 3 steps up to step 5" if wreck == "spike" else "loss became NaN at step 3"
  assert f"{reason} (epoch 1, step {5 if wreck == 'spike' else 3}); rolling back to the last checkpoint, " \
         "on at 0.5 of the learning rate (rollback 1 of at most 2)" in caplog.text
  assert "resuming from the checkpoint at step 2" in caplog.text
  assert len(built) == 2 and history.model is built[1]
  model = history.model
  assert int(model.optimizer.iterations.numpy()) == 8 and model.optimizer._learning_rate.peak == 5e-4
  assert all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.trainable_variables)
  reader = tf.train.load_checkpoint(str(tmp_path / "m" / "backup" / "chief"))
  assert reader.get_tensor("model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 8



def test_no_checkpoint_is_saved_while_steps_are_refused(tmp_path, monkeypatch):
  import bls2017
  from utils import cli, training
  Image.fromarray(natural_image(32, 32, 3)).save(tmp_path / "val.png")
  parser, flags = cli.build_parser("bls2017", bls2017.add_model_flags)
  args = parser.parse_args(["train", "--num_filters", "4", "--patch_size", "16", "--batch_size", "1",
                            "--epochs", "1", "--steps_per_epoch", "8", "--backup_steps", "1",
                            "--verbose", "0", "--rollbacks", "0", "--eval_glob", str(tmp_path / "val.png"),
                            "--model_path", str(tmp_path / "m")])
  monkeypatch.setattr(training, "REFUSED_IN_A_ROW", 3)
  step_end = training._StopOnNaN.on_train_batch_end

  def wreck_after_step_2(self, batch, logs=None):
    # As if step 2's update had wrecked the weights: every later loss is a spike.
    if batch == 1:
      self.model.spike_guard.taken.assign(1000.0)
      self.model.spike_guard.average.assign(1e-3)
    return step_end(self, batch, logs)

  monkeypatch.setattr(training._StopOnNaN, "on_train_batch_end", wreck_after_step_2)
  with pytest.raises(UserError, match=r"up to step 5 .* the last checkpoint from before these steps is "
                     "kept"):
    training.train(bls2017.build_model, args, cli.model_config("bls2017", args, flags), export=False)
  import tensorflow as tf
  reader = tf.train.load_checkpoint(str(tmp_path / "m" / "backup" / "chief"))
  # Saved after steps 1 and 2, not after the refused 3, 4 and 5.
  assert reader.get_tensor("model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 2


RESUME = ["--lambda", "0.01", "--num_filters", "8", "--patch_size", "32", "--batch_size", "2",
          "--steps_per_epoch", "60", "--epochs", "2", "--backup_steps", "5", "--learning_rate", "1e-3",
          "--verbose", "0", "--deterministic"]


def _saved_step(model_path):
  import tensorflow as tf
  directory = os.path.join(model_path, "backup", "chief")
  if not tf.io.gfile.exists(os.path.join(directory, "checkpoint")):
    return None
  # The manager writes a new checkpoint and deletes the old one while we read: the index can name a data
  # file that is already gone, so both the open and the read may fail; the next poll sees a whole one.
  try:
    reader = tf.train.load_checkpoint(directory)
    return int(reader.get_tensor("model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
  except (ValueError, tf.errors.OpError):
    return None


def _train_until(argv, model_path, signum, after_step):
  """Starts the training command, sends `signum` once a checkpoint past `after_step` is on disk."""
  process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  while process.poll() is None:
    step = _saved_step(model_path)
    if step is not None and step > after_step:
      process.send_signal(signum)
      break
    time.sleep(0.05)
  out, err = process.communicate(timeout=300)
  return process.returncode, out + err


def test_killed_training_resumes_with_its_step_count_and_optimizer(tmp_path):
  Image.fromarray(natural_image(32, 48, 3)).save(tmp_path / "val.png")
  model_path = str(tmp_path / "m")
  argv = [sys.executable, os.path.join(ROOT, "bls2017.py"), "train", *RESUME,
          "--eval_glob", str(tmp_path / "val.png"), "--model_path", model_path]

  rc, log = _train_until(argv, model_path, signal.SIGTERM, after_step=5)
  assert rc == 128 + signal.SIGTERM, log
  stopped = [line for line in log.splitlines() if line.startswith("stopped: SIGTERM at step")]
  assert len(stopped) == 1 and "rerun the same command to resume" in stopped[0], log
  at_term = _saved_step(model_path)
  assert f"at step {at_term} " in stopped[0] and 5 < at_term < 60  # saved on the way out, mid-epoch
  import tensorflow as tf
  reader = tf.train.load_checkpoint(os.path.join(model_path, "backup", "chief"))
  moments = [k for k in reader.get_variable_to_shape_map() if k.startswith("model/optimizer/_variables/")]
  assert moments and any(np.abs(reader.get_tensor(k)).sum() > 0 for k in moments)

  rc, log = _train_until(argv, model_path, signal.SIGKILL, after_step=at_term + 10)
  assert rc == -signal.SIGKILL, log
  assert f"resuming from the checkpoint at step {at_term}" in log
  at_kill = _saved_step(model_path)
  assert at_kill > at_term

  out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert f"resuming from the checkpoint at step {at_kill}" in out.stderr
  assert "(120 steps in all)" in out.stdout  # 2 epochs x 60 steps: none lost, none repeated
  model = codec.Codec(model_path)
  image = natural_image(20, 30, 4)
  assert model.decode(model.encode(image)[0]).shape == image.shape
