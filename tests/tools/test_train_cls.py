"""tools/train_cls.py end to end on real digits: outputs, logs read back, recipe phases, errors, features."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mdeq.engine.checkpoint import CheckpointError, load_checkpoint

from .conftest import ROOT, fast_overrides, run_tool


def compose_config(overrides, config_name="train_cls"):
    from hydra import compose, initialize_config_dir

    from mdeq.engine.app import plain_config, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "mdeq" / "configs"), version_base="1.3"):
        return plain_config(compose(config_name, overrides=overrides))


def train_in_process(overrides, out: Path, config_name="train_cls"):
    from mdeq.engine.distributed import DistEnv
    from mdeq.engine.classification_trainer import ClassificationTrainer

    cfg = compose_config(list(overrides) + [f"output_dir={out}"], config_name)
    return ClassificationTrainer(cfg, DistEnv(), out).fit()


def scalars(logdir: Path) -> dict:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_outputs_metrics_and_report(trained_run):
    run_dir, proc = trained_run
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val_top1", "val_top5", "deq_nstep_mean", "deq_rel_residual_mean", "train_seconds"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert 0.0 <= m["val_top1"] <= m["val_top5"] <= 100.0
    assert m["val_count"] == 30 and m["steps"] == 12 and m["epochs"] == 2 and m["phase"] == "deq"
    assert m["deq_nstep_mean"] == 3.0  # max_iter: tol 1e-3 is out of reach in 3 steps, so every image uses all
    assert 0.0 < m["deq_rel_residual_mean"] < 1.0
    assert m["train_seconds"] > 0
    assert f"val top-1 {m['val_top1']:.2f}%" in proc.stdout and "metrics.json" in proc.stdout
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert ck["identity"] == {"arch": "mdeq_tiny", "num_classes": 10, "model_kwargs": {"dropout": 0.0},
                              "task": "classification"}  # the own-data default
    assert ck["data_setup"] == {"batch_size": 10, "world_size": 1, "grad_accum_steps": 1, "train_images": 60}
    assert ck["progress"]["step"] == 12 and ck["phase"] == "deq"
    assert (run_dir / "checkpoints" / "best.pth").is_file()
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temp files
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and [r["phase"] for r in rows] == ["pretrain", "deq"]
    assert float(rows[-1]["val_top1"]) == pytest.approx(m["val_top1"], abs=1e-4)


def test_tensorboard_scalars_read_back(trained_run):
    run_dir, _ = trained_run
    s = scalars(run_dir / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "train/phase", "val/top1", "val/top5",
                "deq/fwd/nstep", "deq/fwd/rel_residual", "deq/bwd/nstep", "deq/jac_loss"):
        assert tag in s, tag
    phase = dict(s["train/phase"])
    assert [phase[t] for t in range(1, 13)] == [0.0] * 6 + [1.0] * 6  # 6 unrolled steps, then DEQ mode
    nstep = dict(s["deq/fwd/nstep"])
    assert all(nstep[t] == 2.0 for t in range(1, 7))  # unroll_steps
    assert all(1.0 <= nstep[t] <= 3.0 for t in range(7, 13))  # max_iter
    assert min(step for step, _ in s["deq/jac_loss"]) == 7  # the penalty starts with DEQ mode (pretrain weight 0)
    assert all(1.0 <= v <= 3.0 for _, v in s["deq/bwd/nstep"])
    lr = [v for _, v in s["train/lr"]]
    assert lr[0] > lr[-1]  # cosine decay per update
    m = json.loads((run_dir / "metrics.json").read_text())
    assert s["val/top1"][-1][1] == pytest.approx(m["val_top1"], rel=1e-6)
    hp = EventAccumulator(str(run_dir / "tensorboard" / "hparams"))
    hp.Reload()
    assert "hparam/val_top1" in hp.Tags()["scalars"]


def test_resume_from_another_architecture_fails_clearly(trained_run, digits_small, tmp_path):
    run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "last.pth"
    with pytest.raises(CheckpointError, match=r"written by a mdeq_tiny run with 10 classes.*builds mdeq_cifar_large"):
        train_in_process(fast_overrides(digits_small, "model=mdeq_cifar_large", f"train.resume={ckpt}"), tmp_path)


def test_wrong_data_root_shows_the_layout(tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    proc = run_tool("train_cls.py", ["~experiment", "data=imagefolder", f"data.root={tmp_path / 'data'}",
                                     f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "expected an ImageFolder root in the ImageNet layout" in proc.stderr
    assert "train/<class_name>/<image>" in proc.stderr


def test_the_digits_recipe_is_not_applied_to_other_data_silently(tmp_path):
    proc = run_tool("train_cls.py", ["data=imagefolder", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'r'}"],
                    cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "experiment=digits_tiny is a recipe for the bundled digits" in proc.stderr and "~experiment" in proc.stderr


def test_training_features_run_together(digits_small, tmp_path):
    """bf16 autocast, channels_last, EMA, mixup/cutmix + smoothing, grad accumulation, clipping, SGD."""
    m = train_in_process(fast_overrides(
        digits_small, "train.amp=true", "train.amp_dtype=bfloat16", "train.channels_last=true",
        "train.ema.enabled=true", "train.ema.decay=0.5", "train.mixup.mixup_alpha=0.2",
        "train.mixup.cutmix_alpha=1.0", "train.smoothing=0.1", "train.grad_accum_steps=2", "train.clip_grad=1.0",
        "optim=sgd", "optim.lr=0.01", "train.epochs=1", "schedule.pretrain_steps=1"), tmp_path)
    assert m["steps"] == 3 and math.isfinite(m["val_loss"]) and "val_ema_top1" in m
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    w = "classifier.weight"
    assert not torch.equal(ck["model"][w], ck["model_ema"][w])
    groups = ck["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 5e-5]  # no decay on norms and biases


def test_bad_options_are_rejected(digits_small, tmp_path):
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        train_in_process(fast_overrides(digits_small, "train.amp=true", "train.amp_dtype=int8"), tmp_path)
    with pytest.raises(ValueError, match="unknown augmentation options"):
        train_in_process(fast_overrides(digits_small, "+data.aug.sharpen=1"), tmp_path)
    with pytest.raises(ValueError, match="model.freeze accepts"):
        train_in_process(fast_overrides(digits_small, "model.freeze=[head]"), tmp_path)


def test_fp16_autocast_uses_a_grad_scaler(digits_small, tmp_path):
    m = train_in_process(fast_overrides(digits_small, "train.amp=true", "train.amp_dtype=float16",
                                        "train.max_steps=2"), tmp_path)
    assert m["steps"] == 2 and math.isfinite(m["val_loss"])
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0


def test_val_interval_keeps_csv_columns_and_final_metrics_describe_the_final_weights(digits_small, tmp_path):
    m = train_in_process(fast_overrides(digits_small, "train.epochs=4", "train.val_interval=2",
                                        "train.max_steps=18"), tmp_path)
    assert m["steps"] == 18 and m["epochs"] == 3
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert [bool(r["val_top1"]) for r in rows] == [False, True, False]
    val_steps = [step for step, _ in scalars(tmp_path / "tensorboard")["val/top1"]]
    assert val_steps == [12, 18]  # epoch 2 was not validated, so the final weights were evaluated at the end
