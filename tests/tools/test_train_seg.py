"""train_seg / eval_seg end to end on a generated dataset in the official Cityscapes layout."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdeq.engine.checkpoint import load_checkpoint

from .conftest import ROOT, run_tool, tool_env
from .test_resume_ddp import _assert_same_state, _step_of

# a narrow mdeq_small (same structure, 8/16/32/64 channels) on 64x128 scenes, 32x64 crops: every part of the
# recipe runs (unrolled pre-training, then DEQ mode with the IFT backward) in seconds
TINY_MODEL = "++model.kwargs={num_channels:[8,16,32,64],expansion_factor:2,num_groups:4,dropout:0.0}"
SEG_FAST = [
    "~experiment", "data.name=cityscapes", "data.root={root}", "data.batch_size=4", "data.eval_batch_size=2", "data.workers=0",
    "data.crop_size=[32,64]", TINY_MODEL, "optim=adam", "optim.lr=2e-3", "optim.weight_decay=0.0",
    "deq.max_iter=3", "deq.b_max_iter=3", "schedule.pretrain_steps=4", "train.epochs=2", "train.precise_bn_batches=1",
    "train.log_interval=1", "train.progress=false", "train.log_images=2",
]


def seg_overrides(root, *extra):
    return [o.replace("{root}", str(root)) for o in SEG_FAST] + list(extra)


@pytest.fixture(scope="session")
def street(tmp_path_factory) -> Path:
    """16 train / 4 val generated 64x128 scenes with real Cityscapes label ids (void classes included)."""
    from mdeq.data.synthetic_seg import make_synthetic_cityscapes

    return make_synthetic_cityscapes(tmp_path_factory.mktemp("street"), splits={"train": 16, "val": 4},
                                     size=(64, 128), seed=3)


@pytest.fixture(scope="module")
def seg_run(street, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_run")
    proc = run_tool("train_seg.py", seg_overrides(street, f"hydra.run.dir={out}"), cwd=out)
    return out, proc


def test_train_seg_outputs_metrics_logs_and_checkpoint(seg_run):
    out, proc = seg_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 8 and m["epochs"] == 2 and m["phase"] == "deq" and m["val_count"] == 4
    assert 0.0 <= m["val_miou"] <= 100.0 and 0.0 <= m["val_aacc"] <= 100.0
    assert len(m["val_iou"]) == 19 and m["val_iou"]["road"] is not None
    assert m["deq_nstep_mean"] == 3.0 and m["backbone_init"] == "random init"
    assert f"val mIoU {m['val_miou']:.2f}%" in proc.stdout
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[0]["phase"] == "pretrain" and rows[1]["phase"] == "deq"
    assert float(rows[1]["val_miou"]) == pytest.approx(m["val_miou"], abs=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = set(ea.Tags()["scalars"]), set(ea.Tags()["images"])
    assert {"train/loss", "train/lr", "val/miou", "val/aacc", "val_iou/road", "val_iou/car", "deq/fwd/nstep",
            "deq/bwd/nstep"} <= scalars
    assert images == {"val/image_gt_pred/0", "val/image_gt_pred/1"}
    img = ea.Images("val/image_gt_pred/0")[-1]
    assert (img.width, img.height) == (3 * 128, 64)  # image | ground truth | prediction at full resolution
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["identity"]["task"] == "segmentation" and ck["identity"]["arch"] == "mdeq_small"
    assert ck["classes"][0] == "road" and len(ck["palette"]) == 19 and ck["ignore_index"] == 255


def test_eval_seg_reproduces_training_and_sliding_window_and_writes_server_pngs(seg_run, street, tmp_path):
    out, _ = seg_run
    m = json.loads((out / "metrics.json").read_text())
    ckpt = out / "checkpoints" / "last.pth"
    preds = tmp_path / "preds"
    res = json.loads((_eval(ckpt, tmp_path / "whole", "--save-predictions", str(preds)) / "eval.json").read_text())
    assert res["miou"] == pytest.approx(m["val_miou"], abs=1e-6) and res["images"] == 4
    assert res["deq_nstep_mean"] == 3.0
    # a window that covers the image is whole-image inference
    slide = json.loads((_eval(ckpt, tmp_path / "slide", "--mode", "slide", "--window", "64", "128") /
                        "eval.json").read_text())
    assert slide["miou"] == res["miou"] and slide["iou"] == res["iou"]
    # multi-scale + flip runs and reports the same table shape
    ms = json.loads((_eval(ckpt, tmp_path / "ms", "--scales", "0.5", "1.0", "--flip") / "eval.json").read_text())
    assert len(ms["iou"]) == 19 and ms["inference"]["flip"] is True
    # predictions: one labelIds PNG per val image, in the server's <city>/<name>.png layout
    images = sorted((street / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))
    written = sorted(preds.rglob("*.png"))
    assert [p.relative_to(preds).as_posix() for p in written] == [
        p.relative_to(street / "leftImg8bit" / "val").as_posix() for p in images]
    from mdeq.data.cityscapes_labels import label_id_to_train_id

    label = np.asarray(Image.open(written[0]))
    assert label.shape == (64, 128) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    assert (label_id_to_train_id()[label] != 255).all()


def _eval(source, out, *args):
    run_tool("eval_seg.py", [str(source), "--output", str(out), "--no-progress", *args], cwd=out.parent)
    return out


def test_official_cityscapes_checkpoint_evaluates_through_eval_seg(street, tmp_path):
    import mdeq
    from mdeq.models.convert import to_official_state_dict

    model = mdeq.create_segmentation_model("mdeq_small", num_classes=19)
    official = {"model." + k: v for k, v in to_official_state_dict(model.state_dict()).items()}
    torch.save(official, tmp_path / "MDEQ_Small_Seg.pkl")
    out = _eval(tmp_path / "MDEQ_Small_Seg.pkl", tmp_path / "official", "--dataset", "cityscapes", "--data-root",
                str(street), "--max-iter", "2", "--tol", "0")
    res = json.loads((out / "eval.json").read_text())
    assert res["arch"] == "mdeq_small" and res["images"] == 4 and res["solver"]["max_iter"] == 2
    assert 1.0 <= res["deq_nstep_mean"] <= 2.0  # the step of the lowest residual (random weights: not contractive)
    assert res["solver"]["solver"] == "anderson" and res["solver"]["stop_mode"] == "abs"  # the preset's solver
    assert res["miou"] is not None


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(street, tmp_path):
    # 4 epochs: the kill at step 5 leaves 11 steps and 3 validations to go, so it lands before the run ends
    overrides = seg_overrides(street, "train.checkpoint_interval=1", "train.ema.enabled=true",
                              "train.ema.decay=0.9", "model.kwargs.dropout=0.1", "schedule.jac.weight=0.5",
                              "schedule.jac.freq=0.5", "train.epochs=4")
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    run_tool("train_seg.py", overrides + [f"hydra.run.dir={ref_dir}"], cwd=tmp_path)
    ckpt = killed_dir / "checkpoints" / "last.pth"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train_seg.py"), *overrides,
                             f"hydra.run.dir={killed_dir}"], cwd=tmp_path, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while _step_of(ckpt) < 5:  # epoch 1 (4 steps/epoch), after the switch to DEQ mode at step 4
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed_dir / "metrics.json").exists()
    run_tool("train_seg.py", overrides + [f"train.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resume_hydra'}"],
             cwd=tmp_path)
    ref, resumed = load_checkpoint(ref_dir / "checkpoints" / "last.pth"), load_checkpoint(ckpt)
    _assert_same_state(ref, resumed)
    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_res = json.loads((killed_dir / "metrics.json").read_text())
    assert m_res["val_miou"] == m_ref["val_miou"] and m_res["steps"] == 16


@pytest.mark.slow
def test_torchrun_ddp_two_cpu_processes(street, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "train_seg.py"),
           *seg_overrides(street, "data.batch_size=2", "train.sync_bn=true", f"hydra.run.dir={tmp_path / 'ddp'}")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["val_count"] == 4  # each rank evaluated 2 images, the matrix is all-reduced
    assert m["steps"] == 8  # 16 images / (2 per rank x 2 ranks) = 4 steps per epoch
    assert "SyncBatchNorm needs GPUs" in proc.stderr + proc.stdout  # sync_bn falls back on CPU, and says so
    # the all-reduced confusion matrix of the 2 ranks is the single-process one
    single = json.loads((_eval(tmp_path / "ddp" / "checkpoints" / "last.pth", tmp_path / "single") /
                         "eval.json").read_text())
    assert single["miou"] == pytest.approx(m["val_miou"], abs=1e-6)
    # eval_seg under torchrun: each rank predicts its shard, rank 0 writes the all-reduced scores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "eval_seg.py"), str(tmp_path / "ddp" / "checkpoints" / "last.pth"), "--no-progress",
           "--output", str(tmp_path / "ddp_eval"), "--save-predictions", str(tmp_path / "ddp_preds")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    both = json.loads((tmp_path / "ddp_eval" / "eval.json").read_text())
    assert both["miou"] == single["miou"] and both["images"] == 4
    assert len(list((tmp_path / "ddp_preds").rglob("*.png"))) == 4
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "metrics.csv", "metrics.json", "tensorboard", "train_seg.log"]


@pytest.mark.slow
def test_a_few_hundred_steps_on_generated_shapes_learn_well_above_chance(tmp_path):
    from mdeq.data.synthetic_seg import make_synthetic_cityscapes

    root = make_synthetic_cityscapes(tmp_path / "data", splits={"train": 32, "val": 8}, size=(64, 128), seed=11)
    out = tmp_path / "run"
    run_tool("train_seg.py", seg_overrides(root, "train.epochs=25", "schedule.pretrain_steps=80", "train.log_images=0",
                                           "train.val_interval=25", f"hydra.run.dir={out}"), cwd=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 200
    # chance: the most frequent class everywhere; its IoU is its pixel share, every other present class gets 0
    from mdeq.data.cityscapes import CityscapesDataset

    val = CityscapesDataset(root, "val")
    counts = np.bincount(np.concatenate([val.load(i)[1].ravel() for i in range(len(val))]), minlength=256)[:19]
    chance_miou = 100.0 * counts.max() / counts.sum() / (counts > 0).sum()
    chance_aacc = 100.0 * counts.max() / counts.sum()
    assert chance_miou < 6.0 and chance_aacc < 45.0
    assert m["val_miou"] > 35.0 and m["val_aacc"] > 65.0, m  # measured: 52 / 81


def test_eval_seg_predicts_an_unlabelled_test_split(seg_run, street, tmp_path):
    import shutil

    out, _ = seg_run
    root = tmp_path / "cs"
    shutil.copytree(street / "leftImg8bit" / "val", root / "leftImg8bit" / "test")  # images only, like Cityscapes
    preds = tmp_path / "preds"
    proc = run_tool("eval_seg.py", [str(out / "checkpoints" / "last.pth"), "--data-root", str(root), "--split", "test",
                                    "--save-predictions", str(preds), "--output", str(tmp_path / "ev"),
                                    "--no-progress"], cwd=tmp_path)
    assert "test: no labels, no scores; 4 images predicted" in proc.stdout
    assert len(list(preds.rglob("*_leftImg8bit.png"))) == 4
    # a labelled split that lacks a label file says which file and how to go on
    (root / "leftImg8bit" / "val").mkdir(parents=True)
    shutil.copy(next((street / "leftImg8bit" / "val").rglob("*.png")), root / "leftImg8bit" / "val" / "x_leftImg8bit.png")
    proc = run_tool("eval_seg.py", [str(out / "checkpoints" / "last.pth"), "--data-root", str(root),
                                    "--output", str(tmp_path / "ev2")], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "x_gtFine_labelIds.png" in proc.stderr and "--no-labels" in proc.stderr


def test_eval_seg_streams_a_video_and_compares_with_from_scratch_solves(seg_run, tmp_path):
    from mdeq.data.synthetic_video import make_synthetic_video

    video = make_synthetic_video(tmp_path / "video", splits={"val": 2}, frames=4, size=(64, 128), shots=2, seed=5)
    ckpt = seg_run[0] / "checkpoints" / "last.pth"
    out = _eval(ckpt, tmp_path / "stream", "--dataset", "cityscapes_sequence", "--data-root", str(video), "--stream",
                "--budget", "1", "2")
    res = json.loads((out / "video.json").read_text())
    runs = {r["name"]: r for r in res["runs"]}
    assert list(runs) == ["stream @1", "scratch @1", "stream @2", "scratch @2", "scratch, reference"]
    assert [runs[n]["evals_per_frame"] for n in list(runs)[:4]] == [1.0, 1.0, 2.0, 2.0]
    assert all(r["frames"] == r["scored"] == 8 for r in runs.values())
    assert res["reference"] == {"max_iter": 28, "tol": 1e-3, "stop_mode": "abs"}  # mdeq_small's official setting
    assert runs["scratch, reference"]["settings"] == res["reference"]
    assert [c["frame"] for c in runs["stream @1"]["after_cut"]] == [0, 1]  # the cut at frame 2 of 4
    assert "| stream @2 |" in (out / "video.md").read_text()
    # a video set without --stream: every frame from scratch at the run's settings
    plain = json.loads((_eval(ckpt, tmp_path / "plain", "--dataset", "cityscapes_sequence", "--data-root", str(video))
                        / "video.json").read_text())
    assert [r["name"] for r in plain["runs"]] == ["scratch"] and 1.0 <= plain["runs"][0]["evals_per_frame"] <= 3.0
    bad = run_tool("eval_seg.py", [str(ckpt), "--stream", "--dataset", "cityscapes", "--data-root", str(video)],
                   cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "--stream needs a video --dataset" in bad.stderr
    bad = run_tool("eval_seg.py", [str(ckpt), "--stream", "--dataset", "cityscapes_sequence", "--data-root",
                                   str(video), "--flip"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "one whole-frame pass per frame" in bad.stderr and "--flip" in bad.stderr
    bad = run_tool("eval_seg.py", [str(ckpt), "--budget", "2", "--dataset", "cityscapes", "--data-root", str(video)],
                   cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "--budget and --streams belong to video evaluation" in bad.stderr
