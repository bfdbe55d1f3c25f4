"""The benchmark tools' own logic (their timings are never tested): the training-step profile, the
convergence run, and the whole-versus-tiles rate."""
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import convergence  # noqa: E402
import pytest  # noqa: E402
import train_step  # noqa: E402

from conftest import natural_image  # noqa: E402


def test_profile_attributes_kernel_time_to_ops_and_passes(tmp_path, capsys):
  out = tmp_path / "step.json"
  train_step.main(["--model", "bls2017", "--num_filters", "8", "--patch_size", "32", "--batch_size", "2",
                   "--steps", "1", "--warmup", "1", "--profile", "--profile_steps", "1",
                   "--json", str(out)])
  kernels = json.loads(out.read_text())["kernels"]
  by_op = {(k["op"], k["kind"]): k for k in kernels}
  # A training step convolves forward and computes filter gradients backward; both took time.
  forward = [k for (op, kind), k in by_op.items() if kind == "forward" and "Conv2D" in op]
  filter_grads = [k for (op, kind), k in by_op.items() if kind == "backward" and "BackpropFilter" in op]
  assert forward and filter_grads
  assert all(k["ms_per_step"] > 0 and k["calls_per_step"] >= 1 for k in forward + filter_grads)
  # Executor bookkeeping is not counted as a kernel.
  assert not any(op.startswith(("ExecutorState", "EagerExecute")) for op, _ in by_op)
  assert "kernel time per step" in capsys.readouterr().out


def test_convergence_budget_checkpoints_and_jpeg_comparison(tmp_path, capsys):
  convergence.main(["--model", "bls2017", "--preset", "smoke", "--minutes", "0.02", "--eval_every", "0.01",
                    "--output_dir", str(tmp_path), "--label", "tiny", "--", "--num_filters", "8"])
  run = json.loads((tmp_path / "bls2017-tiny.json").read_text())
  # The step count is the budget over the probed step time, spread over two checkpoints.
  assert run["total_steps"] == max(int(0.02 * 60 / run["probe_step_s"]), 1)
  points = run["checkpoints"]
  assert len(points) == 2 and points[-1]["steps"] == run["total_steps"]
  assert 0 < points[0]["minutes"] < points[1]["minutes"]
  assert "--num_filters" in run["argv"] and run["argv"][-1] == "8"  # flags after -- reach train
  for point in points:
    assert len(point["images"]) == 3  # the built-in eval photos, each through a real file
    assert point["bpp"] > 0 and 0 < point["psnr"] < 100
    # The reported rate delta is the geometric mean of the per-image ratios to JPEG.
    ratios = [r["bpp"] / r["jpeg_bpp"] for r in point["images"] if not math.isnan(r["jpeg_bpp"])]
    if ratios:
      expected = 100 * (math.exp(sum(map(math.log, ratios)) / len(ratios)) - 1)
      assert abs(point["rate_vs_jpeg"] - expected) < 1e-6
  assert (tmp_path / "convergence.png").stat().st_size > 0
  assert "JPEG parity" in capsys.readouterr().out


def test_convergence_trains_the_last_finish_share_of_its_steps_on_the_finish_crops(tmp_path, monkeypatch):
  calls = []
  real = convergence.training.staged_batches

  def spy(args, small_steps):
    calls.append((small_steps, real(args, small_steps)))
    return calls[-1][1]

  monkeypatch.setattr(convergence.training, "staged_batches", spy)
  # The smoke preset's 64-pixel crops at batch 4, and 1 of 2 epochs on 128-pixel ones.
  convergence.main(["--model", "bls2017", "--preset", "smoke", "--minutes", "0.02", "--eval_every", "0.01",
                    "--output_dir", str(tmp_path), "--label", "finish", "--", "--num_filters", "8",
                    "--epochs", "2", "--finish_epochs", "1", "--finish_patch_size", "128"])
  run = json.loads((tmp_path / "bls2017-finish.json").read_text())
  total, finish = run["total_steps"], run["finish"]
  assert finish["steps"] == round(total / 2) and (finish["patch_size"], finish["batch_size"]) == (128, 1)
  # The budget is paid at the pace of both crops, weighed by their shares of the steps.
  assert run["probe_step_s"] == 0.5 * finish["first_crops_probe_step_s"] + 0.5 * finish["probe_step_s"]
  assert total == max(int(0.02 * 60 / run["probe_step_s"]), 1)
  # The probes: the first crops alone, then the finish's.
  assert [tuple(b.shape) for b in calls[0][1].take(2)] == [(4, 64, 64, 3)] * 2
  assert [tuple(b.shape) for b in calls[1][1].take(2)] == [(1, 128, 128, 3)] * 2
  fits = calls[2:]
  assert run["checkpoints"][-1]["steps"] == total and len(fits) == 2
  # Each chunk's fit starts where the last ended and is fed the crops of its steps, in order.
  chunk, small_steps = run["checkpoints"][0]["steps"], total - finish["steps"]
  fits = [(small_steps - left, dataset) for left, dataset in fits]
  assert [step for step, _ in fits] == [0, chunk]
  for step, dataset in fits:
    n = min(chunk, total - step)
    expected = [(4, 64, 64, 3) if i < small_steps else (1, 128, 128, 3) for i in range(step, step + n)]
    assert [tuple(batch.shape) for batch in dataset.take(n)] == expected


def test_convergence_stops_and_reports_a_diverged_run(tmp_path, capsys):
  # A learning rate of 1e30 without clipping blows the weights up on the first update.
  status = convergence.main(["--model", "bls2017", "--preset", "smoke", "--minutes", "0.02",
                             "--eval_every", "0.01", "--output_dir", str(tmp_path), "--label", "wild", "--",
                             "--num_filters", "8", "--lr_schedule", "constant", "--learning_rate", "1e30",
                             "--clipnorm", "0"])
  assert status == 1
  run = json.loads((tmp_path / "bls2017-wild.json").read_text())
  assert run["checkpoints"] == [] and run["diverged"]["steps"] > 0
  out = capsys.readouterr().out
  assert "diverged" in out and "JPEG parity" not in out


def test_the_budget_clock_counts_steps_not_the_fits_start_up(monkeypatch):
  clock = convergence.StepClock()
  clock.on_train_begin()
  # A first step that ends 30 s after the fit began (tracing), then three steps of 0.5 s.
  times = iter([30.0, 30.5, 31.0, 31.5])
  monkeypatch.setattr(convergence.time, "perf_counter", lambda: next(times))
  for batch in range(4):
    clock.on_train_batch_end(batch, {"loss": 1.0})
  assert clock.seconds(wall=31.5) == 2.0  # four steps at 0.5 s, not 31.5 s
  single = convergence.StepClock()
  single.on_train_begin()
  monkeypatch.setattr(convergence.time, "perf_counter", lambda: 7.0)
  single.on_train_batch_end(0, {"loss": 1.0})
  assert single.seconds(wall=7.25) == 7.25  # one step: nothing to measure the pace by


def test_tiles_codes_each_photo_whole_and_as_separate_tiles(trained, image_folder, tmp_path, capsys):
  import numpy as np
  from PIL import Image
  import tiles
  from utils import bitstream
  from utils.codec import Codec
  # One image exactly one 32-pixel tile, one of two by three tiles plus a strip left out.
  Image.fromarray(natural_image(32, 32, 7)).save(image_folder / "one_tile.png")
  Image.fromarray(natural_image(70, 96, 8)).save(image_folder / "six_tiles.png")
  out = tmp_path / "tiles.json"
  assert tiles.main([trained.model_path, "--tiles", "32,128", "--eval_glob", str(image_folder / "*_tile*.png"),
                     "--json", str(out)]) == 0
  result, = json.loads(out.read_text())["models"]
  rows = {r["image"]: r for r in result["images"]}
  assert set(rows) == {"one_tile.png", "six_tiles.png"} and result["codec"] == trained.name
  # Whole: the payload of the very file `compress` writes, over the image's pixels.
  lic = tmp_path / "one_tile.lic"
  assert trained.main("compress", str(image_folder / "one_tile.png"), str(lic),
                      "--model_path", trained.model_path) == 0
  _, strings = bitstream.unpack(lic.read_bytes())
  assert rows["one_tile.png"]["whole"] == 8 * sum(map(len, strings)) / (32 * 32)
  # A tile that is the whole image codes it whole; a tile larger than the image codes nothing.
  assert rows["one_tile.png"]["tiles"]["32"] == rows["one_tile.png"]["whole"]
  assert rows["one_tile.png"]["tiles"]["128"] is None
  # Six tiles, each coded on its own: their bits over their pixels, the last 6 rows left out.
  image = np.asarray(Image.open(image_folder / "six_tiles.png"))
  codec = Codec(trained.model_path, part="encoder")
  bits = sum(tiles.payload_bits(codec.encode(image[r:r + 32, c:c + 32])[0]) for r in (0, 32) for c in (0, 32, 64))
  assert rows["six_tiles.png"]["tiles"]["32"] == bits / (6 * 32 * 32)
  ratio = np.mean([rows[n]["whole"] / rows[n]["tiles"]["32"] for n in rows])
  assert result["whole_over_tiles"]["32"] == pytest.approx(ratio) and result["whole_over_tiles"]["128"] is None
  assert "whole / tiles" in capsys.readouterr().out


def test_tiles_decode_counts_whole_files_and_the_assembled_psnr(trained, image_folder, tmp_path,
                                                               monkeypatch):
  import numpy as np
  from PIL import Image
  import tiles
  from utils import metrics
  from utils import bitstream
  from utils.codec import Codec
  Image.fromarray(natural_image(70, 96, 8)).save(image_folder / "nine_tiles.png")
  out = tmp_path / "tiles.json"
  crops, encode = [], Codec.encode
  monkeypatch.setattr(Codec, "encode", lambda self, image: crops.append(image.shape) or encode(self, image))
  assert tiles.main([trained.model_path, "--tiles", "32,128", "--decode", "--eval_glob",
                     str(image_folder / "nine_tiles.png"), "--json", str(out)]) == 0
  monkeypatch.undo()
  # Each file is made once: the whole photo (also the 128-pixel "tile"), six whole 32-pixel tiles,
  # and the three cut short at the bottom that only the decoded cover needs.
  assert sorted(crops) == sorted([(70, 96, 3)] + [(32, 32, 3)] * 6 + [(6, 32, 3)] * 3)
  coded = json.loads(out.read_text())["models"][0]["images"][0]["coded"]
  # Whole: the file `compress` writes, framing included, and the PSNR of what `decompress` makes of it.
  lic, png = tmp_path / "nine.lic", tmp_path / "nine.png"
  assert trained.main("compress", str(image_folder / "nine_tiles.png"), str(lic), "--model_path", trained.model_path) == 0
  assert trained.main("decompress", str(lic), str(png), "--model_path", trained.model_path) == 0
  image = np.asarray(Image.open(image_folder / "nine_tiles.png"))
  assert coded["whole"] == [metrics.bpp(lic.stat().st_size, 70, 96),
                            pytest.approx(metrics.psnr(image, np.asarray(Image.open(png))))]
  # 32-pixel tiles cover every pixel: three rows (the last 6 high) by three columns, nine files.
  codec = Codec(trained.model_path)
  decoded, size, framing = np.zeros_like(image), 0, 0
  for r in (0, 32, 64):
    for c in (0, 32, 64):
      file = codec.encode(image[r:r + 32, c:c + 32])[0]
      size += len(file)
      framing += bitstream.framing_bytes(file)
      decoded[r:r + 32, c:c + 32] = codec.decode(file)
  assert coded["32"] == [metrics.bpp(size, 70, 96), pytest.approx(metrics.psnr(image, decoded))]
  # Nine headers and checks where the whole file has one. (Not the totals: a tiny model's payload
  # can be smaller in tiles, as the hcae fixture's was once in CI.)
  assert framing > bitstream.framing_bytes(lic.read_bytes())
  # A tile larger than the image is the whole image.
  assert coded["128"] == coded["whole"]


def test_tiles_bd_rate_against_the_jpeg_rows(tmp_path):
  import tiles
  from utils import rd
  points = tmp_path / "rd_points.csv"
  jpeg = [(0.25, 27.0), (0.5, 30.0), (1.0, 33.0)]
  rows = [dict(codec="jpeg", setting=q, image="a.png", bpp=b, psnr=p) for q, (b, p) in enumerate(jpeg)]
  rows += [dict(codec="bls2017", setting=q, image="a.png", bpp=b / 2, psnr=p) for q, (b, p) in enumerate(jpeg)]
  rd.write_points(str(points), rows)
  # One photo per model directory: its whole file at twice JPEG's rate for the same PSNR, its tiles at half.
  results = [dict(codec="bmshj2018", model_dir=f"lambda{i}",
                  images=[dict(image="a.png", coded={"whole": [2 * b, p], "128": [b / 2, p]})])
             for i, (b, p) in enumerate(jpeg)]
  # Only the jpeg rows are the anchor (bls2017's are not): twice its rate is +100 %, half -50 %.
  assert tiles.bd_rates(results, str(points)) == {
      "bmshj2018": {"whole": pytest.approx(100.0), "128": pytest.approx(-50.0)}}
  # One model directory is one point: no curve, no BD-rate, and no error either.
  assert tiles.bd_rates(results[:1], str(points)) == {"bmshj2018": {"whole": None, "128": None}}


def test_tiles_refuses_bad_sizes_and_missing_models(tmp_path, capsys):
  import tiles
  with pytest.raises(SystemExit) as stop:
    tiles.main([str(tmp_path), "--tiles", "64,0"])
  assert stop.value.code == 2 and "--tiles" in capsys.readouterr().err
  with pytest.raises(SystemExit) as stop:
    tiles.main([str(tmp_path), "--jpeg_points", str(tmp_path / "rd_points.csv")])
  assert stop.value.code == 2 and "--jpeg_points needs --decode" in capsys.readouterr().err
  with pytest.raises(SystemExit) as stop:
    tiles.main([str(tmp_path), "--decode", "--jpeg_points", str(tmp_path / "rd_points.csv")])
  assert stop.value.code == 2 and "no file" in capsys.readouterr().err
  assert tiles.main([str(tmp_path / "nothing")]) == 2
  assert "no trained model" in capsys.readouterr().err
