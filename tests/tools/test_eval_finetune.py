"""tools/eval_cls.py (checkpoint, weights file, solver sweep) and tools/finetune.py (new labelling)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mdeq.engine.checkpoint import load_checkpoint

from .conftest import fast_overrides, run_tool


def test_eval_checkpoint_reproduces_training_eval_and_sweeps(trained_run, tmp_path):
    run_dir, _ = trained_run
    m = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "eval"
    data_root = load_checkpoint(run_dir / "checkpoints" / "last.pth")["config"]["data"]["root"]
    proc = run_tool("eval_cls.py", [str(run_dir / "checkpoints" / "last.pth"), "--data-root", data_root,
                                    "--sweep-iters", "1", "3", "--no-progress", "--output", str(out)], cwd=tmp_path)
    res = json.loads((out / "eval.json").read_text())
    assert res["images"] == 30
    assert res["top1"] == pytest.approx(m["val_top1"], abs=1e-9)  # same weights, solver and transforms
    assert res["deq_nstep_mean"] == pytest.approx(m["deq_nstep_mean"])
    assert "top-1" in proc.stdout
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["max_iter"] for r in rows] == [1, 3]
    assert rows[0]["deq_nstep_mean"] == 1.0 and rows[1]["top1"] == pytest.approx(res["top1"])
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("max_iter,top1,top5")
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 300

    # the same weights as a bare safetensors file, with the run's eval solver and resolution on the command line
    from safetensors.torch import save_file

    ck = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    save_file({k: v.contiguous() for k, v in ck["model"].items()}, str(tmp_path / "w.safetensors"))
    out2 = tmp_path / "eval2"
    run_tool("eval_cls.py", [str(tmp_path / "w.safetensors"), "--model", "mdeq_tiny", "--data-root", data_root,
                             "--solver", "anderson", "--max-iter", "3", "--tol", "1e-3", "--stop-mode", "rel",
                             "--input-size", str(ck["data_cfg"]["input_size"][-1]), "--no-progress",
                             "--output", str(out2)], cwd=tmp_path)
    assert json.loads((out2 / "eval.json").read_text())["top1"] == pytest.approx(res["top1"], abs=1e-9)


def test_eval_rejects_a_missing_file(tmp_path):
    proc = run_tool("eval_cls.py", [str(tmp_path / "nope.pth"), "--data-root", str(tmp_path)], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


@pytest.fixture(scope="module")
def parity_digits(tmp_path_factory):
    """The digits relabelled as even / odd (2 classes): 40 train and 10 val images per digit."""
    from mdeq.data.digits import prepare_digits

    full = prepare_digits(tmp_path_factory.mktemp("digits_full") / "d")
    root = tmp_path_factory.mktemp("parity")
    for split, n in (("train", 40), ("val", 10)):
        for digit in range(10):
            dst = root / split / ("even" if digit % 2 == 0 else "odd")
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted((full / split / str(digit)).iterdir())[:n]:
                shutil.copy(f, dst / f"{digit}_{f.name}")
    return root


@pytest.mark.slow
def test_finetune_on_a_new_labelling_beats_chance(trained_run, parity_digits, tmp_path):
    run_dir, _ = trained_run
    source = run_dir / "checkpoints" / "last.pth"
    out = tmp_path / "ft"
    proc = run_tool("finetune.py", [
        f"model.weights={source}", f"data.root={parity_digits}", "data.aug.scale=[0.85,1.0]", "data.aug.hflip=0.0", "data.batch_size=20", "data.workers=0",
        "model.freeze=[stem,cell]", "optim.layer_decay=0.75", "optim.lr=2e-3", "deq.max_iter=4", "deq.b_max_iter=4",
        "train.epochs=3", "train.precise_bn_batches=5", "train.progress=false", "sched.warmup_epochs=0",
        f"hydra.run.dir={out}"], cwd=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_classes"] == 2 and m["val_count"] == 100
    assert m["val_top1"] >= 70.0, m  # chance is 50%
    before = load_checkpoint(source)["model"]
    after = load_checkpoint(out / "checkpoints" / "last.pth")["model"]
    assert after["classifier.weight"].shape[0] == 2
    assert torch.equal(before["downsample.0.weight"], after["downsample.0.weight"])  # frozen stem
    assert torch.equal(before["downsample.1.running_var"], after["downsample.1.running_var"])  # frozen BN too
    cell = "fullstage.fuse_layers.0.1.net.conv.weight"
    assert torch.equal(before[cell], after[cell])  # frozen cell
    head = "final_layer.0.weight"
    assert not torch.equal(before[head], after[head])  # the head was trained
    assert "val top-1" in proc.stdout


def test_finetune_without_starting_weights_says_what_to_pass(tmp_path):
    proc = run_tool("finetune.py", [f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'o'}"], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0 and "model.weights=<file>" in proc.stderr
