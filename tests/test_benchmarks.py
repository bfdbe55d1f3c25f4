"""The benchmark tools' own logic (their timings are never tested): the training-step profile and
the convergence run."""
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import convergence  # noqa: E402
import train_step  # noqa: E402


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
