"""Faults of a training run that must lose nothing: a bad validation image (the trained epoch is saved before
validating; ``data.verify`` lists every unreadable file up front), a stop signal (SIGTERM / SIGUSR1: finish the
step, save, exit with a resume command; the resumed run ends bitwise equal), the input size a run trains at."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdeq.engine.checkpoint import load_checkpoint

from .conftest import ROOT, fast_overrides, run_tool, tool_env
from .test_resume_ddp import RESUME_OPTS, _assert_same_state, _step_of


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _break(path: Path) -> None:
    path.write_bytes(b"this is not a PNG file")


# ---------------------------------------------------------------------------------------------- bad val image
@pytest.mark.slow
def test_bad_val_image_keeps_the_trained_epoch_and_resume_validates_it(digits_small, tmp_path):
    data = _copy(digits_small, tmp_path / "data")
    bad = sorted((data / "val" / "3").iterdir())[0]
    good = bad.read_bytes()
    _break(bad)
    opts = ["train.epochs=1", "train.ema.enabled=true", "train.ema.decay=0.9"]
    run_dir = tmp_path / "run"
    proc = run_tool("train_cls.py", fast_overrides(data, *opts) + [f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr  # the run-time error names the file
    ckpt = run_dir / "checkpoints" / "last.pth"
    assert _step_of(ckpt) == 6  # the whole trained epoch (60 images / 10), saved before validation
    assert not (run_dir / "metrics.json").exists()

    bad.write_bytes(good)
    run_tool("train_cls.py", fast_overrides(data, *opts) + [f"train.resume={ckpt}",
                                                            f"hydra.run.dir={tmp_path / 'resume_hydra'}"], cwd=tmp_path)
    ref_dir = tmp_path / "ref"
    run_tool("train_cls.py", fast_overrides(data, *opts) + [f"hydra.run.dir={ref_dir}"], cwd=tmp_path)
    _assert_same_state(load_checkpoint(ref_dir / "checkpoints" / "last.pth"), load_checkpoint(ckpt))
    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_res = json.loads((run_dir / "metrics.json").read_text())
    assert m_res["val_top1"] == m_ref["val_top1"] and m_res["val_loss"] == m_ref["val_loss"]


def test_data_verify_lists_every_unreadable_file_before_training(digits_small, tmp_path):
    data = _copy(digits_small, tmp_path / "data")
    broken = [sorted((data / "val" / "1").iterdir())[0], sorted((data / "train" / "7").iterdir())[2],
              sorted((data / "train" / "0").iterdir())[1]]
    for p in broken:
        _break(p)
    (data / "train" / "0" / "empty.png").write_bytes(b"")
    proc = run_tool("train_cls.py", fast_overrides(data, "data.verify=true") + [f"hydra.run.dir={tmp_path / 'r'}"],
                    cwd=tmp_path, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "data.verify: 4 of 91 files cannot be read" in err
    for p in broken + [data / "train" / "0" / "empty.png"]:
        assert str(p) in err
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing trained


def test_unit_verify_and_typical_size(digits_small, tmp_path):
    from mdeq.data.classification import ImageFolderDataset
    from mdeq.data.errors import UnreadableImageError
    from mdeq.data.inspect import typical_image_size, verify_datasets

    data = _copy(digits_small, tmp_path / "data")
    train = ImageFolderDataset(data / "train")
    assert verify_datasets({"train": train}) == 60
    assert typical_image_size(train) == 32  # the digits cache holds 32x32 PNGs
    _break(Path(train.samples[5][0]))
    with pytest.raises(UnreadableImageError, match=r"1 of 60 files cannot be read:\n  \[train\] .*"):
        verify_datasets({"train": train})


# ---------------------------------------------------------------------------------------------- input size
def test_training_logs_its_input_size_and_warns_far_from_the_data(digits_small, tmp_path):
    from mdeq.engine.classification_trainer import report_input_size
    from mdeq.data.classification import ImageFolderDataset
    from mdeq.data.inspect import typical_image_size
    import logging

    train = typical_image_size(ImageFolderDataset(digits_small / "train"))
    assert train == 32
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("mdeq.train")
    handler = Keep()
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        report_input_size({"input_size": (3, 16, 16)}, train, "mdeq_tiny")  # 2x: fine
        report_input_size({"input_size": (3, 224, 224)}, train, "mdeq_small")  # 7x: warned
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    warns = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert infos[0].startswith("input size 16x16") and "32 px" in infos[0]
    assert len(warns) == 1 and "training at 224x224" in warns[0] and "data.overrides.input_size=32 " in warns[0]


# ---------------------------------------------------------------------------------------------- stop signals
def _run_until(cmd, ckpt: Path, step: int, cwd: Path):
    proc = subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _step_of(ckpt) < step:
        assert proc.poll() is None, "the run ended before it could be stopped:\n" + proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    return proc


STOP_OPTS = [o for o in RESUME_OPTS if not o.startswith("train.checkpoint_interval")] + ["train.checkpoint_interval=2"]


@pytest.fixture(scope="module")
def stop_reference(digits_small, tmp_path_factory) -> Path:
    """The uninterrupted run the stopped-and-resumed runs must equal (one for both signals: the same settings)."""
    ref_dir = tmp_path_factory.mktemp("stop_reference") / "ref"
    run_tool("train_cls.py", fast_overrides(digits_small, *STOP_OPTS) + [f"hydra.run.dir={ref_dir}"],
             cwd=ref_dir.parent)
    return ref_dir


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_and_the_resumed_run_is_bitwise_equal(digits_small, stop_reference, tmp_path, sig):
    overrides = fast_overrides(digits_small, *STOP_OPTS)
    ref_dir, run_dir = stop_reference, tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.pth"
    proc = _run_until([sys.executable, str(ROOT / "tools" / "train_cls.py"), *overrides, f"hydra.run.dir={run_dir}"],
                      ckpt, 2, tmp_path)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    stopped_at = _step_of(ckpt)
    assert 2 <= stopped_at < 12 and not (run_dir / "metrics.json").exists()
    assert f"stopped by {signal.Signals(sig).name}" in err and f"step {stopped_at} is in {ckpt}" in err
    resume = err.split("resume with: ", 1)[1].splitlines()[0]
    assert resume.endswith(f"train.resume={ckpt}")

    run_tool("train_cls.py", overrides + [f"train.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resume_hydra'}"],
             cwd=tmp_path)
    _assert_same_state(load_checkpoint(ref_dir / "checkpoints" / "last.pth"), load_checkpoint(ckpt))
    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_res = json.loads((run_dir / "metrics.json").read_text())
    assert m_res["val_top1"] == m_ref["val_top1"] and m_res["steps"] == 12


def _children(pid: int) -> list:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the torchrun workers through /proc")
def test_torchrun_ranks_stop_at_the_same_step_when_one_is_told(digits_small, tmp_path):
    overrides = fast_overrides(digits_small, "train.checkpoint_interval=2", "train.ema.enabled=true",
                               "schedule.pretrain_steps=4", "schedule.jac.weight=0.0",
                               "train.epochs=4")  # 3 steps per epoch with 2 ranks
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.pth"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "tools" / "train_cls.py")]
    proc = _run_until(torchrun + overrides + [f"hydra.run.dir={run_dir}"], ckpt, 2, tmp_path)
    workers = {_rank_of(c): c for c in _children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 is told; rank 0 must stop after the same step
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stopped_at = _step_of(ckpt)
    assert 2 <= stopped_at < 12 and not (run_dir / "metrics.json").exists()
    assert err.count("stopped by SIGTERM") == 1 and f"step {stopped_at} is in {ckpt}" in err  # printed by rank 0

    # ranks > 0 reseed on a multi-rank resume (run_state), so the resumed run is reproducible, not bitwise
    # rank 0's uninterrupted run; what matters here is that it picks up where all ranks stopped
    res = subprocess.run(torchrun + overrides + [f"train.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resume_hydra'}"],
                         cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["steps"] == 12 and m["world_size"] == 2
    assert f"resumed at epoch {stopped_at // 3}, step {stopped_at}" in res.stdout + res.stderr


@pytest.mark.slow
def test_distill_stops_on_sigterm_and_resumes_bitwise(digits_small, distill_teacher, tmp_path):
    teacher = distill_teacher
    args = [str(teacher / "checkpoints" / "last.pth"), "--data-root", str(digits_small), "--teacher-steps", "4",
            "--epochs", "3", "--batch-size", "10", "--eval-iters", "1", "--workers", "0", "--no-progress"]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "distill.py"), *args, "--output", str(out)],
                            cwd=tmp_path, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the first epoch's log line: the run is inside epoch 1 now
        seen.append(line)
        if line.startswith("distill epoch 0:"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = out / "last.pth"
    assert "stopped by SIGTERM" in err and not (out / "distilled.pth").exists()
    resume = err.split("resume with: ", 1)[1].splitlines()[0]
    assert resume.endswith(f"--output {out} --resume {last}")
    state = load_checkpoint(last)
    assert state["kind"] == "distillation" and (state["position"]["epoch"], state["position"]["batch"]) >= (1, 0)

    run_tool("distill.py", args + ["--resume", str(last)], cwd=tmp_path)  # --output defaults to last.pth's folder
    ref = tmp_path / "ref"
    run_tool("distill.py", args + ["--output", str(ref)], cwd=tmp_path)
    a, b = load_checkpoint(ref / "distilled.pth")["model"], load_checkpoint(out / "distilled.pth")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_ref, m_res = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert m_res["history"] == m_ref["history"] and m_res["val_top1_student"] == m_ref["val_top1_student"]


def test_stop_signals_record_and_restore():
    from mdeq.engine.preemption import StopSignals, TrainingStopped

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert stop.agreed() and stop.received == signal.SIGHUP
        exc = stop.exit("saved x", "python tools/train_cls.py train.resume=x")
    assert signal.getsignal(signal.SIGTERM) is before
    assert isinstance(exc, TrainingStopped) and isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGHUP
    assert str(exc) == "stopped by SIGHUP: saved x\nresume with: python tools/train_cls.py train.resume=x"
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C is recorded ...
            assert stop.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # ... a second one interrupts at once


def test_data_verify_checks_segmentation_images_and_masks(tmp_path):
    from mdeq.data.errors import UnreadableImageError
    from mdeq.data.factory import build_segmentation_dataset
    from mdeq.data.inspect import verify_datasets

    ds = build_segmentation_dataset("synthetic", tmp_path / "street", "val")
    image, mask = ds.samples[3]
    _break(Path(mask))
    with pytest.raises(UnreadableImageError, match=rf"1 of {2 * len(ds)} files cannot be read:\n  \[val\] {mask}"):
        verify_datasets({"val": ds})


# ---------------------------------------------------------------------------------------------- full disk
def _fill_disk(monkeypatch):
    """torch.save as it fails on a full disk: some bytes written, then its zip writer's RuntimeError."""
    from mdeq.engine import checkpoint

    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + bytes(600))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", full)


def test_full_disk_keeps_the_previous_checkpoint_and_names_the_folder(tmp_path, monkeypatch):
    from mdeq.engine.checkpoint import CheckpointWriteError, load_checkpoint as load, save_atomic

    path = tmp_path / "checkpoints" / "last.pth"
    save_atomic({"model": {"w": torch.ones(2)}}, path)
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError, match=rf"cannot write {path} \(RuntimeError: .*unexpected pos.*; [0-9.]+ "
                                                   rf"MB free there\); the previous one is kept .* {path.parent}"):
        save_atomic({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]  # no temp file left
    assert torch.equal(load(path)["model"]["w"], torch.ones(2))


def test_full_disk_during_training_ends_with_a_message(digits_small, tmp_path, monkeypatch, capsys):
    from mdeq.cli import train_cls

    _fill_disk(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["train_cls.py", *fast_overrides(digits_small, "train.epochs=1"),
                                      f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as exc:
        train_cls.main()
    msg = str(exc.value.code)
    assert msg.startswith(f"error: cannot write {tmp_path / 'run' / 'checkpoints' / 'last.pth'} (RuntimeError")
    assert "there was none before" in msg and "resume from the last checkpoint" in msg
