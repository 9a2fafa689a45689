import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_solver_benchmark_writes_json_and_markdown(tmp_path, capsys):
    assert _load_tool().main(["solvers", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "solvers.json").read_text())
    rows = {(r["problem"], r["solver"]): r for r in result["rows"]}
    problems = [p["name"] for p in result["problems"]]
    assert problems == ["linear_rho0.9", "sym_conv_0.95", "mdeq_block"]
    for prob in problems:
        for solver in ("fixed_point", "anderson", "broyden"):
            row = rows[(prob, solver)]
            assert row["converged"] == 1.0 and row["nfe"] >= row["mean_nstep"] > 0
            assert row["overhead_ratio"] > 0 and row["wall_ms"] > 0
        # Anderson needs fewer evaluations than plain iteration on every problem of the suite
        assert rows[(prob, "anderson")]["nfe"] < rows[(prob, "fixed_point")]["nfe"]
    table = (tmp_path / "solvers.md").read_text()
    assert "| mdeq_block | anderson |" in table
    assert "wrote" in capsys.readouterr().out


def test_cell_benchmark_times_each_variant_against_the_eager_cell(tmp_path):
    tool = _load_tool()
    assert tool.main(["cell", "--model", "mdeq_tiny:16:2", "--variants", "channels_last", "bf16", "--repeats", "1",
                      "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cell_cpu.json").read_text())["rows"]
    assert [(r["mode"], r["variant"]) for r in rows] == [
        (m, v) for m in ("eval", "train") for v in ("eager", "channels_last", "bf16")]
    for r in rows:
        assert r["ms"] > 0 and r["speedup"] > 0
        # float32 layouts compute the same function; bf16 is within its precision
        assert r["max_rel_diff"] <= (1e-5 if r["variant"] != "bf16" else 5e-2)
    assert "| mdeq_tiny | 16 x 2 | train | channels_last |" in (tmp_path / "cell_cpu.md").read_text()


def test_model_benchmark_reports_every_solver(tmp_path):
    tool = _load_tool()
    assert tool.main(["models", "--model", "mdeq_tiny:32", "--batch", "2", "--repeats", "1", "--max-iter", "4",
                      "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "models.json").read_text())["rows"]
    assert [r["solver"] for r in rows] == ["fixed_point", "anderson", "broyden", "unroll"]
    assert [r["nfe"] for r in rows][:3] == [4, 4, 4] and rows[3]["nfe"] == 10  # unroll: num_layers
    assert all(r["forward_ms"] > 0 for r in rows)
    assert "| mdeq_tiny | 32 | unroll |" in (tmp_path / "models.md").read_text()


def test_training_benchmark_deq_memory_is_flat_and_unroll_grows(tmp_path):
    tool = _load_tool()
    assert tool.main(["train", "--model", "mdeq_tiny", "--size", "32", "--batch", "2", "--iters", "2", "6",
                      "--repeats", "1", "--no-baseline", "--threads", "1", "--data-workers", "0", "--out",
                      str(tmp_path)]) == 0
    result = json.loads((tmp_path / "training_cpu.json").read_text())
    pipe = result["pipeline"]  # the data pipeline alone: generated photos through the training transform
    assert pipe["workers"] == 0 and pipe["batch"] == 2 and pipe["images"] == 96 and pipe["images_per_s"] > 0
    assert pipe["step_s"] == pytest.approx(2 / pipe["images_per_s"])
    assert "| data pipeline alone (0 loader workers" in (tmp_path / "training_cpu.md").read_text()
    rows = {(r["mode"], r["max_iter"]): r for r in result["rows"]}
    # the budgets asked for, the original's Broyden (mdeq_tiny: F_THRES 18) and the fast recipe (4 evaluations)
    assert set(rows) == {("deq", 2), ("deq", 6), ("unroll", 2), ("unroll", 6), ("official", 19), ("fast", 4)}
    assert rows[("official", 19)]["fwd_nfe"] <= 19 and rows[("official", 19)]["bwd_nfe"] <= 21
    assert rows[("fast", 4)]["fwd_nfe"] == 4 and rows[("fast", 4)]["bwd_nfe"] == 0  # the one-step backward
    # what autograd keeps for backward: independent of the solver budget in DEQ mode ...
    assert rows[("deq", 2)]["saved_mb"] == rows[("deq", 6)]["saved_mb"] > 0
    # ... and linear in depth when unrolled: 4 more cell applications cost 2x what 2 steps' worth adds over 0
    per_step = (rows[("unroll", 6)]["saved_mb"] - rows[("unroll", 2)]["saved_mb"]) / 4
    assert per_step > 0 and rows[("unroll", 6)]["saved_mb"] > rows[("deq", 6)]["saved_mb"]
    assert all(r["samples_per_s"] > 0 and r["peak_mb"] >= 0 for r in result["rows"])
    assert rows[("deq", 6)]["fwd_nfe"] == rows[("deq", 6)]["bwd_nfe"] == 6 and rows[("unroll", 6)]["fwd_nfe"] == 6
    assert "| mdeq_tiny | deq | 2 | 2 / 2 |" in (tmp_path / "training_cpu.md").read_text()


def test_segmentation_benchmark_reports_deq_and_unrolled_per_size(tmp_path, capsys):
    tool = _load_tool()
    assert tool.main(["seg", "--sizes", "64x128", "--repeats", "1", "--max-iter", "3", "--tol", "0",
                      "--unroll-steps", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "seg_cpu.json").read_text())
    rows = {(r["input"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {("64x128", "deq"), ("64x128", "unroll")}
    deq, unroll = rows[("64x128", "deq")], rows[("64x128", "unroll")]
    # tol 0: the preset's solver makes the full budget; unrolled: exactly the given depth
    assert deq["solver"] == "anderson" and deq["max_iter"] == deq["nfe"] == 3
    assert unroll["solver"] == "unroll" and unroll["max_iter"] == unroll["nfe"] == unroll["mean_nstep"] == 2
    for r in result["rows"]:
        assert r["model"] == "mdeq_small" and r["device"] == "cpu" and r["batch"] == 1
        assert r["forward_ms"] > 0 and r["peak_mb"] > 0 and r["rel_residual"] > 0
        assert r["output"] == [1, 19, 16, 32]  # logits at 1/4 resolution
    table = (tmp_path / "seg_cpu.md").read_text()
    assert "| mdeq_small | 64x128 | deq | anderson | 3 | " in table
    assert "| mdeq_small | 64x128 | unroll | unroll | 2 | " in table
    assert "Random weights" in table and "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_budget_benchmark_trains_evaluates_and_reuses_runs(tmp_path, digits_small, monkeypatch):
    """plain, Skip DEQ, the residual stack and C-DEQ on 60 digits (FAST-style settings): exact budgets, a row per
    method, the plot, and a second invocation that reuses the finished runs instead of training again."""
    import functools

    from mdeq.benchmarks.budget import evaluation

    # each latency a median of 1 timed forward (after the 2 warm-ups) instead of 5: here only that it is measured
    monkeypatch.setattr(evaluation, "latency_ms", functools.partial(evaluation.latency_ms, repeats=1))
    tool = _load_tool()
    train = ["data.batch_size=10", "data.eval_batch_size=15", "data.workers=0", "train.precise_bn_batches=2",
             "deq.max_iter=3", "deq.b_max_iter=3", "schedule.unroll_steps=2", "skip:deq.init_weight=0.5"]
    args = ["budget", "--methods", "plain", "skip", "stack", "cdeq", "--evals", "1", "2", "--epochs", "3",
            "--jobs", "2", "--threads", "1", "--data-root", str(digits_small), "--distill-epochs", "1",
            "--distill-args", "--batch-size 10 --teacher-steps 4 --workers 0", "--out", str(tmp_path),
            "--train-overrides", *train]
    assert tool.main(args + ["--memory-depths", "2"]) == 0
    result = json.loads((tmp_path / "budget.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["plain", "skip", "stack", "cdeq"]
    for name, m in methods.items():
        assert [b["nfe"] for b in m["budgets"]] == [1, 2] and all(b["exact"] for b in m["budgets"]), name
        assert all(0.0 <= b["top1"] <= 100.0 for b in m["budgets"]) and 0.0 <= m["converged"]["top1"] <= 100.0
        assert m["val_images"] == 30 and m["peak_mb"] > 0 and m["wall_s"] > 0 and m["train_seconds"] >= 0
        assert not m["reused"]
        assert all(b["ms_per_image_b1"] > 0 and b["ms_per_image_b64"] > 0 for b in m["budgets"]), name
    # the official setting (the original's Broyden, mdeq_tiny's thresholds) next to the budgets, where it applies
    official = methods["plain"]["official"]
    assert official["solver"] == "broyden" and official["max_iter"] == 19 and official["ms_per_image_b1"] > 0
    assert methods["stack"]["official"] is None and methods["cdeq"]["official"] is None
    assert methods["stack"]["base_solver"] == "unroll" and methods["stack"]["converged"]["deq_nstep_mean"] == 2
    assert methods["cdeq"]["base_solver"] == "consistency"
    assert methods["plain"]["converged"]["max_iter"] == 50 and methods["plain"]["base_solver"] == "anderson"
    # the scoped override reached Skip DEQ only; with --data-root the recipes are renamed and pre-train 2 epochs
    assert "deq.init_weight=0.5" in methods["skip"]["command"] and "init_weight" not in methods["plain"]["command"]
    assert "recipe=budget-digits_plain" in methods["plain"]["command"]
    assert "schedule.pretrain_steps=12" in methods["plain"]["command"]
    assert "pretrain_steps" not in methods["stack"]["command"]
    mem = {(r["mode"], r["max_iter"]) for r in result["memory"]["rows"]}
    assert mem == {("deq", 2), ("unroll", 2)}
    assert set(result["targets"]) == {"cheap_inference", "memory", "fast_inference"}  # no jr: not evaluated
    fast = result["targets"]["fast_inference"]
    if fast["point"] is not None:
        assert fast["speedup"] == round(official["ms_per_image_b1"] / fast["point"]["ms"], 1)
    table = (tmp_path / "budget.md").read_text()
    assert "| method | recipe | top-1 @1 | top-1 @2 | converged (mean steps) | train s | process s | " in table
    for label in ("plain DEQ", "Skip DEQ", "residual stack", "C-DEQ (from plain)"):
        assert f"| {label} | " in table
    assert "Targets" in table and "JR with half the f-evaluations: not evaluated" in table
    assert "| method | @1 ms b1 / b64 | @2 ms b1 / b64 | official: top-1, steps, ms b1 / b64 |" in table
    assert (tmp_path / "budget.png").stat().st_size > 0

    runs = tmp_path / "budget_runs"
    stamps = {n: (runs / n / "metrics.json").stat().st_mtime_ns for n in methods}
    assert tool.main(args + ["--memory-depths"]) == 0  # no --retrain: nothing is trained again
    again = json.loads((tmp_path / "budget.json").read_text())
    assert all(m["reused"] for m in again["methods"].values())
    assert {n: (runs / n / "metrics.json").stat().st_mtime_ns for n in methods} == stamps
    for name, m in again["methods"].items():  # the recorded training numbers come back with the same evaluation
        assert m["peak_mb"] == methods[name]["peak_mb"]
        before = methods[name]["budgets"]
        assert [(b["top1"], b["nfe"]) for b in m["budgets"]] == [(b["top1"], b["nfe"]) for b in before]
    assert again["memory"] is None and "not measured" in (tmp_path / "budget.md").read_text()
    assert "(reused)" in (tmp_path / "budget.md").read_text()
    # an edited recipe is not reused: the run's saved config no longer matches what the command composes
    import shlex
    import sys

    from mdeq.benchmarks.budget.runs import recipe_changed

    cmd = [sys.executable] + shlex.split(methods["plain"]["command"])
    assert not recipe_changed(cmd, runs / "plain")
    saved = runs / "plain" / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text().replace("max_iter: 3", "max_iter: 4"))
    assert recipe_changed(cmd, runs / "plain")


@pytest.mark.slow
def test_own_data_benchmark_trains_each_variant_by_the_own_data_command_and_reuses_runs(tmp_path, digits_small,
                                                                                       monkeypatch):
    """The own-data comparison on 60 digits written into the data cache by a data set's writer: the defaults, the
    fast recipe at its budgets and an explicit network, a table per data set, and a second invocation that trains
    nothing; a hand-tuned recipe's overrides reach its command."""
    import functools
    import shutil

    import pytest

    from mdeq.benchmarks import own_data
    from mdeq.benchmarks.budget import evaluation
    from mdeq.benchmarks.own_data.datasets import DATASETS, OwnDataSet, package_file

    # the fast recipe's latencies: a median of 1 timed forward (after the 2 warm-ups) instead of 5
    monkeypatch.setattr(evaluation, "latency_ms", functools.partial(evaluation.latency_ms, repeats=1))

    def write(folder):
        shutil.copytree(digits_small, folder, dirs_exist_ok=True)
        return "60 digits"

    monkeypatch.setenv("MDEQ_DATA", str(tmp_path / "cache"))
    monkeypatch.setitem(DATASETS, "tiny", OwnDataSet("tiny", "60 digits", write))
    monkeypatch.setitem(own_data.TUNED, "tiny", ("optim.lr=2e-3",))
    tool = _load_tool()
    args = ["owndata", "--data", "tiny", "--variants", "defaults", "fast", "small_cnn", "--epochs", "1",
            "--out", str(tmp_path / "out")]
    assert tool.main(args) == 0
    assert (tmp_path / "cache" / "owndata-tiny" / ".complete").is_file()
    result = json.loads((tmp_path / "out" / "owndata.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["defaults", "fast", "small_cnn"]
    for r in rows.values():
        assert r["epochs"] == 1 and 0.0 <= r["val_top1"] <= 100.0 and r["train_seconds"] > 0
        assert "'~experiment' data=imagefolder data.root=" in r["command"]
    tuned = own_data.train_command(Path("/d"), own_data.VARIANTS["tuned"], "tiny", 3, Path("/r"))
    assert "optim.lr=2e-3" in tuned and "train.epochs=3" in tuned and "optim.lr" not in rows["defaults"]["command"]
    assert rows["small_cnn"]["model"] == "test_byobnet" and rows["defaults"]["parameters"] == 158890
    assert [(b["evals"], b["nfe"]) for b in rows["fast"]["budget_top1"]] == [(1, 1), (2, 2), (4, 4)]
    assert "deq=fast" in rows["fast"]["command"]
    assert any("input size 16x16" in reason for reason in rows["defaults"]["data_choices"])
    table = (tmp_path / "out" / "owndata.md").read_text()
    assert "| model / recipe | parameters | top-1 @ 1 ep | train s @ 1 ep |" in table
    assert "| mdeq_tiny, fast recipe (deq=fast) | 0.17M |" in table and "@2: " in table  # + the Skip predictor
    stamp = (tmp_path / "out" / "owndata_runs" / "tiny" / "defaults_e1" / "metrics.json").stat().st_mtime_ns
    assert tool.main(args) == 0  # finished runs are reused
    assert (tmp_path / "out" / "owndata_runs" / "tiny" / "defaults_e1" / "metrics.json").stat().st_mtime_ns == stamp
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps not-installed-package"):
        package_file("not-installed-package", "mdeq_no_such_module", "data/x.csv")


def test_stream_benchmark_trains_measures_and_reuses_runs(tmp_path, monkeypatch):
    """The streaming comparison with one tiny recipe on a tiny generated video: streamed and from-scratch runs at the
    budget, both references, the after-cut table and the recovery count; a second invocation trains nothing."""
    from mdeq.benchmarks import streaming
    from mdeq.data import synthetic_video

    # run() writes the (small) default video set into this cache before training, and the training subprocess
    # finds it complete there: the patched sizes reach it through the cache, not through the patch
    monkeypatch.setenv("MDEQ_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic_video, "SYNTHETIC_VIDEO_SPLITS", {"train": 1, "val": 2})
    monkeypatch.setattr(synthetic_video, "SYNTHETIC_VIDEO_FRAMES", 4)
    monkeypatch.setattr(synthetic_video, "SYNTHETIC_VIDEO_SHOTS", 2)
    monkeypatch.setattr(synthetic_video, "SYNTHETIC_VIDEO_SIZE", (32, 64))
    monkeypatch.setattr(streaming, "COMMON", (
        "data=synthetic_video", "train.epochs=1", "schedule.pretrain_steps=1", "data.workers=0", "data.batch_size=2",
        "data.crop_size=[32,64]", "train.precise_bn_batches=1", "train.log_images=0",
        "++model.kwargs={num_channels:[8,16,32,64],expansion_factor:2,num_groups:4,dropout:0.0}"))
    tool = _load_tool()
    args = ["stream", "--recipes", "plain", "--budgets", "1", "--out", str(tmp_path / "out")]
    assert tool.main(args) == 0
    result = json.loads((tmp_path / "out" / "stream.json").read_text())
    runs = result["recipes"]["plain"]["runs"]
    assert [r["name"] for r in runs] == ["stream @1", "scratch @1", "scratch, official (<= 28, abs. tol 0.001)",
                                         "scratch, converged (<= 28, rel. tol 0.001)"]
    assert result["references"]["official"] == {"max_iter": 28, "tol": 1e-3, "stop_mode": "abs"}  # mdeq_small's
    assert result["frames"] == 8 and all(r["scored"] == 8 for r in runs)
    assert runs[0]["evals_per_frame"] == 1.0 and runs[2]["settings"]["stop_mode"] == "abs"
    assert runs[0]["recovery"] == streaming.recovery_frames(runs[0]["after_cut"], runs[2]["after_cut"])  # official
    assert runs[1]["recovery"] is None and result["size"] == [32, 64] and result["cuts"] == [2]
    table = (tmp_path / "out" / "stream.md").read_text()
    assert "| stream @1 |" in table and "t=0 | t=1" in table
    checkpoint = tmp_path / "out" / "stream_runs" / "plain" / "checkpoints" / "last.pth"
    stamp = checkpoint.stat().st_mtime_ns
    assert tool.main(args) == 0  # the finished run is reused
    assert checkpoint.stat().st_mtime_ns == stamp


def test_recovery_frames():
    from mdeq.benchmarks.streaming import recovery_frames

    ref = [dict(frame=t, miou=80.0) for t in range(4)]
    assert recovery_frames([dict(frame=t, miou=m) for t, m in enumerate([70, 79.5, 80, 80])], ref) == 1
    assert recovery_frames([dict(frame=t, miou=m) for t, m in enumerate([80, 70, 80, 80])], ref) == 2
    assert recovery_frames([dict(frame=t, miou=m) for t, m in enumerate([80, 80, 80, 70])], ref) is None
