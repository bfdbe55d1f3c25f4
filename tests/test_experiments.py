"""experiments/: the sweep (presets, sharding, resume, parallel jobs), Figure 6, the reconstruction
panels, and training under a mirrored strategy on two logical CPUs."""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, natural_image

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import figure6  # noqa: E402
import reconstructions  # noqa: E402
import sweep  # noqa: E402


def test_presets_and_job_flags():
  presets = sweep.load_presets()
  assert {"smoke", "cpu", "paper"} <= set(presets)
  assert presets["paper"]["lambdas"] == [0.0006, 0.001, 0.004, 0.015, 0.05, 0.19, 0.65, 2.29, 8.02]
  argv = sweep.train_argv(presets["paper"], "bmshj2018", 0.65, {"dataset": "folder", "train_glob": "x/*.jpg"})
  assert argv[:2] == ["--lambda", "0.65"]
  assert argv[argv.index("--epochs") + 1] == "200" and argv[argv.index("--dataset") + 1] == "folder"
  assert argv[-4:] == ["--num_filters", "192", "--latent_depth", "320"]  # the paper's high-rate widths
  low = sweep.train_argv(presets["paper"], "bmshj2018", 0.015, {})
  assert low[-4:] == ["--num_filters", "128", "--latent_depth", "192"]


def test_train_values_given_per_model_reach_each_models_jobs():
  cpu = sweep.load_presets()["cpu"]
  flags = {}
  keys = ("--patch_size", "--batch_size", "--learning_rate", "--epochs")
  for model in ("bls2017", "bmshj2018", "hcae"):
    argv = sweep.train_argv(cpu, model, 0.015, {})
    flags[model] = {k: argv[argv.index(k) + 1] for k in keys}
    assert not any("{" in a for a in argv), argv  # a dict never leaks into a flag
  assert flags["bls2017"] == dict(zip(keys, ("128", "8", "0.001", "12")))
  assert flags["bmshj2018"] == dict(zip(keys, ("128", "4", "0.002", "20")))
  assert flags["hcae"] == dict(zip(keys, ("128", "4", "0.001", "27")))
  # A command-line override replaces the per-model value for every model.
  argv = sweep.train_argv(cpu, "bmshj2018", 0.015, {"batch_size": 16})
  assert argv[argv.index("--batch_size") + 1] == "16"


def test_hyperprior_models_finish_on_larger_crops():
  # bmshj2018 and hcae end on 256-pixel crops: on 128-pixel ones their hyper-latents are all border
  # and mispredict whole photos' scales. bls2017 has no hyperprior.
  cpu = sweep.load_presets()["cpu"]
  assert not any(a.startswith("--finish") for a in sweep.train_argv(cpu, "bls2017", 0.015, {}))
  value = lambda argv, flag: int(argv[argv.index(flag) + 1])
  import bmshj2018
  import hcae
  from utils import cli
  for model, module, finish in (("bmshj2018", bmshj2018, 3), ("hcae", hcae, 6)):
    anchor = sweep.train_argv(cpu, model, 0.015, {})
    assert (value(anchor, "--finish_epochs"), value(anchor, "--finish_patch_size"),
            value(anchor, "--finish_batch_size")) == (finish, 256, 1)
    assert value(anchor, "--finish_epochs") < value(anchor, "--epochs")  # the anchor starts on small crops
    warm = sweep.warm_argv(sweep.train_argv(cpu, model, 0.05, {}), cpu, model, "m")
    parser, _ = cli.build_parser(model, module.add_model_flags)
    assert parser.parse_args(["train", *warm]).finish_patch_size == 256
    assert value(warm, "--epochs") <= value(warm, "--finish_epochs")  # every warm step on large crops


def test_cpu_preset_hcae_has_its_two_finest_levels_wider_and_bls2017s_outer_layers():
  import hcae
  from utils import cli
  cpu = sweep.load_presets()["cpu"]
  parser, _ = cli.build_parser("hcae", hcae.add_model_flags)
  for lmbda in cpu["lambdas"]:
    args = parser.parse_args(["train", *sweep.train_argv(cpu, "hcae", lmbda, {})])
    assert (args.levels, args.num_filters, args.latent_channels) == (6, 64, [64, 64, 32, 32, 32, 32])
    assert args.bls2017_transforms and args.epochs == 27
  model = hcae.build_model(args)
  # Both 1/16 levels (z1, z2) at 64 channels: their posteriors and priors are built at that width.
  assert [model.posterior_net[level].filters for level in range(5)] == [64, 64, 32, 32, 32]
  assert model.top_posterior.filters == 32
  assert model.stem.layers[1].strides == (4, 4) and model.synthesis.layers[-2].strides == (4, 4)


def test_shards_partition_the_jobs():
  every = sweep.jobs(("a", "b"), (1, 2, 3), (0, 1))
  shards = [sweep.jobs(("a", "b"), (1, 2, 3), (i, 4)) for i in range(4)]
  assert sorted(j for s in shards for j in s) == sorted(every) and len(every) == 6
  with pytest.raises(Exception):
    sweep.parse_shard("4/4")


def test_warm_order_starts_in_the_middle_and_goes_outwards():
  assert sweep.warm_order([0.05, 0.004, 0.19, 0.015]) == [0.015, 0.05, 0.004, 0.19]
  # Another anchor: outwards from it; one not among the lambdas (a --lambdas override): the middle.
  assert sweep.warm_order([0.001, 0.05, 0.004, 0.015], anchor=0.015) == [0.015, 0.05, 0.004, 0.001]
  assert sweep.warm_order([0.001, 0.05, 0.004, 0.015], anchor=0.19) == [0.004, 0.015, 0.001, 0.05]
  lambdas = [0.0006, 0.001, 0.004, 0.015, 0.05, 0.19, 0.65, 2.29, 8.02]
  order = sweep.warm_order(lambdas)
  assert order[0] == 0.05 and sorted(order) == lambdas
  # Every lambda after the first is next to one trained before it.
  for i, lmbda in enumerate(order[1:], 1):
    k = lambdas.index(lmbda)
    assert {lambdas[j] for j in (k - 1, k + 1) if 0 <= j < len(lambdas)} & set(order[:i])


def test_the_sweep_trains_the_presets_anchor_first(monkeypatch, tmp_path):
  seen = []
  monkeypatch.setattr(sweep, "run_jobs", lambda todo, *rest: seen.append(todo) or 0)
  assert sweep.main(["--model", "bls2017", "--preset", "cpu", "--models_dir", str(tmp_path)]) == 0
  assert seen == [[("bls2017", 0.015), ("bls2017", 0.05), ("bls2017", 0.004), ("bls2017", 0.001)]]
  assert sweep.main(["--model", "bls2017", "--preset", "cpu", "--models_dir", str(tmp_path), "--cold"]) == 0
  assert seen[-1] == [("bls2017", l) for l in (0.001, 0.004, 0.015, 0.05)]


def test_warm_jobs_train_a_fraction_of_the_epochs_from_their_neighbour():
  preset = sweep.load_presets()["cpu"]
  argv = sweep.train_argv(preset, "bls2017", 0.05, {})
  warm = sweep.warm_argv(argv, preset, "bls2017", "models/x/bls2017-lambda0.015")
  assert warm[warm.index("--epochs") + 1] == str(round(12 * preset["warm_start_fraction"]))
  assert warm[-2:] == ["--init_from", "models/x/bls2017-lambda0.015"]
  assert warm[warm.index("--learning_rate") + 1] == argv[argv.index("--learning_rate") + 1]


def test_epochs_scale_shortens_every_job_and_its_finish(monkeypatch, tmp_path, capsys):
  cpu = sweep.load_presets()["cpu"]
  longer = sweep.scale_epochs(cpu, 4 / 3)  # about the preset before 2026-12-07's last change
  assert sweep.scale_epochs(cpu, 1.0) is cpu and cpu["train"]["epochs"]["hcae"] == 27  # not changed
  assert longer["train"]["epochs"] == {"bls2017": 16, "bmshj2018": 27, "hcae": 36}
  assert longer["train"]["finish_epochs"] == {"bmshj2018": 4, "hcae": 8}
  assert {k: v for k, v in longer["train"].items() if "epochs" not in k} == \
      {k: v for k, v in cpu["train"].items() if "epochs" not in k}
  todo = sweep.jobs(sweep.MODELS, cpu["lambdas"], (0, 1), warm=True, anchor=0.015)
  waits = sweep.plan(todo, longer, warm=True)
  epochs = dict(zip(todo, sweep.job_epochs(todo, waits, longer, {})))
  assert [epochs[(m, 0.05)] for m in sweep.MODELS] == [2, 4, 5]  # warm jobs: 0.15 of 16, 27, 36
  assert sweep.scale_epochs(sweep.load_presets()["smoke"], 0.1)["train"]["epochs"] == 1
  with pytest.raises(ValueError, match="gives its epochs"):
    sweep.scale_epochs(dict(cpu, train={"dataset": "builtin"}), 0.5)
  # The command line: the scaled preset reaches the jobs, in directories of their own.
  seen = []
  monkeypatch.setattr(sweep, "run_jobs", lambda todo, waits, slots, preset, lambdas, models_dir, *rest:
                      seen.append((preset, models_dir)) or 0)
  monkeypatch.chdir(tmp_path)
  assert sweep.main(["--model", "hcae", "--preset", "cpu", "--epochs_scale", "0.75"]) == 0
  assert seen[-1][0]["train"]["epochs"]["hcae"] == 20
  assert seen[-1][1] == os.path.join("models", "sweep-cpu-x0.75")
  for bad in ("0", "-1"):
    with pytest.raises(SystemExit):
      sweep.main(["--preset", "cpu", "--epochs_scale", bad])
    assert "--epochs_scale must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["bmshj2018", "hcae"])
def test_warm_hyperprior_jobs_fine_tune_at_a_lower_rate(model):
  preset = sweep.load_presets()["cpu"]
  argv = sweep.train_argv(preset, model, 0.05, {"learning_rate": 2e-3})
  warm = sweep.warm_argv(argv, preset, model, f"models/x/{model}-lambda0.015")
  scale = preset["warm_start_learning_rate_scale"][model]
  assert scale < 1
  assert float(warm[warm.index("--learning_rate") + 1]) == pytest.approx(2e-3 * scale)
  assert argv[argv.index("--learning_rate") + 1] == "0.002"  # the cold job's flags are left alone
  with pytest.raises(ValueError, match="learning_rate"):
    sweep.warm_argv([a for a in argv if a not in ("--learning_rate", "0.002")], preset, model, "m")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A smoke sweep of bls2017 at two lambdas, run twice (the second run must skip both)."""
  work = tmp_path_factory.mktemp("sweep")
  for i in range(2):
    Image.fromarray(natural_image(48 + 16 * i, 64, 20 + i)).save(work / f"eval{i}.png")
  models = work / "models"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), "--model", "bls2017",
         "--preset", "smoke", "--models_dir", str(models), "--verbose", "0"]
  first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  return work, models, first, second


def test_sweep_trains_every_pair_then_skips_them(swept):
  _, models, first, second = swept
  assert first.returncode == 0, first.stderr[-2000:]
  assert sorted(os.listdir(models)) == ["bls2017-lambda0.004", "bls2017-lambda0.05"]
  for d in os.listdir(models):
    assert os.path.exists(models / d / "saved_model" / "saved_model.pb")
  assert second.returncode == 0 and second.stdout.count("finished before, skipped") == 2
  # Warm start: the middle lambda from scratch, its neighbour from it.
  assert "lambda 0.004: training from scratch" in first.stdout
  assert f"lambda 0.05: training from {models / 'bls2017-lambda0.004'}" in first.stdout


def test_a_warm_job_waits_for_the_neighbour_it_starts_from():
  cpu = sweep.load_presets()["cpu"]
  assert cpu["lambdas"] == [0.001, 0.004, 0.015, 0.05] and cpu["warm_start_anchor"] == 0.015
  todo = sweep.jobs(("bls2017", "hcae"), cpu["lambdas"], (0, 1), warm=True, anchor=cpu["warm_start_anchor"])
  waits = sweep.plan(todo, cpu, warm=True)
  named = {job: todo[w] if w is not None else None for job, w in zip(todo, waits)}
  assert named[("bls2017", 0.015)] is None and named[("hcae", 0.015)] is None
  assert named[("bls2017", 0.05)] == named[("bls2017", 0.004)] == ("bls2017", 0.015)
  assert named[("hcae", 0.001)] == ("hcae", 0.004)
  chains = dict(zip(todo, sweep.chain_lengths(waits)))
  assert chains[("hcae", 0.015)] == 2 and chains[("hcae", 0.004)] == 1
  assert chains[("hcae", 0.05)] == chains[("hcae", 0.001)] == 0
  # With both anchors done, hcae's 0.004 (0.001 waits for it) starts before the earlier-listed 0.05
  # and bls2017's last job; a cold job would start before any of them.
  ready = [todo.index(j) for j in (("bls2017", 0.001), ("hcae", 0.05), ("hcae", 0.004))]
  assert todo[sweep.next_job(ready, waits, sweep.chain_lengths(waits))] == ("hcae", 0.004)
  cold = [w for w in range(len(todo)) if waits[w] is None]
  assert sweep.next_job(ready + cold[1:], waits, sweep.chain_lengths(waits)) == cold[1]
  # Among jobs alike so far, the one with the most epochs: hcae's 27-epoch anchor before bls2017's 12.
  epochs = dict(zip(todo, sweep.job_epochs(todo, waits, cpu, {})))
  assert epochs[("bls2017", 0.015)] == 12 and epochs[("hcae", 0.015)] == 27
  assert epochs[("hcae", 0.05)] == round(27 * cpu["warm_start_fraction"]) < 27
  assert todo[sweep.next_job(cold, waits, sweep.chain_lengths(waits), sweep.job_epochs(todo, waits, cpu, {}))] \
      == ("hcae", 0.015)
  assert todo[sweep.next_job(cold, waits, sweep.chain_lengths(waits))] == ("bls2017", 0.015)
  assert sweep.job_epochs(todo, waits, cpu, {"epochs": 3})[todo.index(("bls2017", 0.015))] == 3
  assert sweep.plan(todo, cpu, warm=False) == [None] * len(todo)
  # The paper preset widens bmshj2018 from lambda 0.19: the wide jobs wait for a wide one, or none.
  paper = sweep.load_presets()["paper"]
  todo = sweep.jobs(("bmshj2018",), paper["lambdas"], (0, 1), warm=True)
  for job, w in zip(todo, sweep.plan(todo, paper, warm=True)):
    if w is not None:
      assert (todo[w][1] >= 0.19) == (job[1] >= 0.19) and todo.index(job) > w
  assert sum(w is None for w in sweep.plan(todo, paper, warm=True)) == 2


# These run jobs side by side, one per core (`taskset -c 1 pytest` would run them one at a time).
needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                     reason="runs two jobs side by side: needs 2 CPU cores")


@needs_two_cores
def test_parallel_jobs_get_their_own_cores(capfd):
  cores = sorted(os.sched_getaffinity(0))
  sets = sweep.core_sets(len(cores))
  assert sorted(c for s in sets for c in s) == cores and all(len(s) == 1 for s in sets)
  assert sweep.core_sets(1) == [None]
  assert len(sweep.core_sets(len(cores) + 3)) == len(cores)  # not more jobs than cores
  assert f"running {len(cores)} at once" in capfd.readouterr().out
  # A job started on a core is pinned there and its output lines come prefixed; this process is not pinned.
  mine = os.sched_getaffinity(0)
  process, reader = sweep.start_job(
      [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))\n"
       "print(os.environ['TF_FORCE_GPU_ALLOW_GROWTH'])"], {cores[-1]}, "[job]")
  assert os.sched_getaffinity(0) == mine
  assert process.wait(timeout=60) == 0
  reader.join(timeout=60)
  assert capfd.readouterr().out.splitlines() == [f"[job] [{cores[-1]}]", "[job] true"]


@needs_two_cores
def test_a_parallel_sweep_runs_warm_jobs_side_by_side(tmp_path, capfd):
  models = tmp_path / "models"
  status = sweep.main(["--model", "bls2017", "--preset", "smoke", "--lambdas", "0.004,0.015,0.05",
                       "--jobs", "2", "--models_dir", str(models), "--verbose", "0"])
  out = capfd.readouterr().out
  assert status == 0, out[-3000:]
  anchor = models / "bls2017-lambda0.015"
  for lmbda in ("0.004", "0.05"):
    with open(models / f"bls2017-lambda{lmbda}" / sweep.DONE) as f:
      argv = json.load(f)["argv"]
    assert argv[-2:] == ["--init_from", str(anchor)]
    assert (models / f"bls2017-lambda{lmbda}" / "saved_model" / "saved_model.pb").exists()
  lines = out.splitlines()
  starts = [i for i, line in enumerate(lines) if "training from " + str(anchor) in line]
  ends = [i for i, line in enumerate(lines) if re.search(r"lambda 0\.0(04|5): done in", line)]
  assert len(starts) == 2 and len(ends) == 2 and max(starts) < min(ends)  # side by side
  assert any(line.startswith("[bls2017 0.05] trained bls2017") for line in lines)


@needs_two_cores
def test_a_failed_job_stops_the_jobs_that_wait_for_it(tmp_path, capfd):
  models = tmp_path / "models"
  status = sweep.main(["--model", "bls2017", "--preset", "smoke", "--jobs", "2", "--dataset", "folder",
                       "--train_glob", str(tmp_path / "none" / "*.png"), "--models_dir", str(models),
                       "--verbose", "0"])
  captured = capfd.readouterr()
  assert status == 2
  assert "error: bls2017 lambda 0.004 failed (exit 2)" in captured.err
  assert "lambda 0.05: training" not in captured.out and "finished in" not in captured.out
  assert "[bls2017 0.004] error: no images match" in captured.out


def test_figure6_from_the_sweep(swept, capsys):
  work, models, _, _ = swept
  out = work / "results"
  reference = work / "ref.txt"
  reference.write_text("# bpp, psnr\n0.2, 28.0\n0.5, 32.0\n")
  rc = figure6.main(["--models_dir", str(models), "--eval_glob", str(work / "eval*.png"),
                     "--classical", "jpeg,webp", "--output_dir", str(out), "--reference", str(reference)])
  assert rc == 0
  from utils import rd
  rows = rd.read_points(str(out / "rd_points.csv"))
  codecs = {r["codec"] for r in rows}
  assert codecs == {"bls2017", "jpeg", "webp"}
  assert len([r for r in rows if r["codec"] == "bls2017"]) == 4  # 2 lambdas x 2 images
  for name in ("figure6_psnr", "figure6_msssim"):
    with Image.open(out / f"{name}.png") as im:
      assert im.size[0] > 300 and im.size[1] > 200
    assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
  table = (out / "bd_rate.md").read_text()
  assert "| bls2017 |" in table and "| webp |" in table and "%" in table


def test_reconstruction_panel(swept):
  work, models, _, _ = swept
  out = work / "panels"
  assert reconstructions.main(["--models_dir", str(models), "--image", str(work / "eval1.png"),
                               "--crop", "32", "--output_dir", str(out)]) == 0
  with Image.open(out / "reconstructions_eval1.png") as im:
    assert im.size[0] > 200


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
  Image.fromarray(natural_image(64, 64)).save(tmp_path / "val.png")
  script = f"""
import sys
sys.path.insert(0, {ROOT!r})
import utils, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import bls2017, math
from utils import cli, training
parser, flags = cli.build_parser("bls2017", bls2017.add_model_flags)
args = parser.parse_args(["train", "--num_filters", "8", "--patch_size", "32", "--batch_size", "4",
                          "--epochs", "1", "--steps_per_epoch", "3", "--verbose", "0",
                          "--distribute", "mirrored", "--eval_glob", {str(tmp_path / "val.png")!r},
                          "--model_path", {str(tmp_path / "m")!r}])
history = training.train(bls2017.build_model, args, cli.model_config("bls2017", args, flags), export=False)
print("replicas", history.model.distribute_strategy.num_replicas_in_sync)
assert all(math.isfinite(v) for v in history.history["loss"] + history.history["val_loss"])
assert history.history["skipped"] == [0.0]  # the spike guard's all-reduce agrees on every replica
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "replicas 2" in out.stdout
