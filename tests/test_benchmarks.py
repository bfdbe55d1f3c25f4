"""The benchmark tools' own logic (their timings are never tested): the training-step profile."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
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
