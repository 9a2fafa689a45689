"""Kill -9 and resume gives the uninterrupted run's weights bitwise; torchrun DDP on 2 CPU processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdeq.engine.checkpoint import load_checkpoint

from .conftest import ROOT, fast_overrides, run_tool, tool_env

RESUME_OPTS = ["train.checkpoint_interval=1", "train.ema.enabled=true", "train.ema.decay=0.9",
               "schedule.pretrain_steps=4", "schedule.jac.freq=0.5", "schedule.jac.pretrain_weight=0.1",
               "+model.kwargs.dropout=0.1"]


def _step_of(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["progress"]["step"])
    except Exception:  # not there yet (it is replaced atomically, so never torn)
        return -1


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), f"optimizer state {k} differs"
    assert a["scheduler"] == b["scheduler"] and a["progress"]["step"] == b["progress"]["step"]
    assert a["rng"]["torch"].equal(b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]
    assert a["rng"]["numpy"]["keys"].equal(b["rng"]["numpy"]["keys"])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(digits_small, tmp_path):
    overrides = fast_overrides(digits_small, *RESUME_OPTS)
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    run_tool("train_cls.py", overrides + [f"hydra.run.dir={ref_dir}"], cwd=tmp_path)

    ckpt = killed_dir / "checkpoints" / "last.pth"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train_cls.py"), *overrides,
                             f"hydra.run.dir={killed_dir}"], cwd=tmp_path, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while _step_of(ckpt) < 3:  # inside epoch 0 (6 steps/epoch), after the switch to DEQ mode at step 4
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _step_of(ckpt)
    assert 3 <= killed_at < 12 and not (killed_dir / "metrics.json").exists()

    run_tool("train_cls.py", overrides + [f"train.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resume_hydra'}"],
             cwd=tmp_path)
    ref = load_checkpoint(ref_dir / "checkpoints" / "last.pth")
    resumed = load_checkpoint(ckpt)  # the resumed run continues in the killed run's folder
    _assert_same_state(ref, resumed)
    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_res = json.loads((killed_dir / "metrics.json").read_text())
    assert m_res["val_top1"] == m_ref["val_top1"] and m_res["steps"] == 12
    rows = (killed_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, none duplicated by the restart


@pytest.mark.slow
def test_torchrun_ddp_two_cpu_processes(digits_small, tmp_path):
    overrides = fast_overrides(digits_small)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "train_cls.py"), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs = list((tmp_path / "outputs" / "train_cls").iterdir())
    assert len(runs) == 1, runs  # one output folder for both ranks
    run = runs[0]
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["val_count"] == 30  # each rank evaluated its exact shard; the sums were all-reduced
    assert m["steps"] == 6  # 60 images / (10 per rank x 2 ranks) = 3 steps per epoch
    assert len(list((run / "tensorboard").glob("events.*"))) == 1  # rank 0 only
    assert proc.stdout.count("val top-1") == 1  # the report is printed once
    ck = load_checkpoint(run / "checkpoints" / "last.pth")
    assert not any(k.startswith("module.") for k in ck["model"])
