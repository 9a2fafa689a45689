"""Files written by the code before the settings redesign (commit a8c66c0, tests/fixtures/a8c66c0/) still load,
evaluate to the numbers that code computed, resume, and publish: training checkpoints (plain, Skip DEQ, C-DEQ,
segmentation) and published folders (model.safetensors + config.json)."""
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch

import mdeq  # noqa: F401
from mdeq.data.classification import build_transform, resolve_data_cfg
from mdeq.data.factory import build_classification_split, build_segmentation_dataset
from mdeq.data.loaders import build_eval_loader
from mdeq.data.segmentation import build_seg_eval_transform, collate_same_size
from mdeq.engine.checkpoint import load_checkpoint
from mdeq.engine.distributed import DistEnv
from mdeq.engine.evaluate import evaluate_classifier
from mdeq.engine.rebuild import model_from_checkpoint
from mdeq.engine.seg_inference import build_inference, evaluate_segmentation

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "a8c66c0"
EXPECTED = json.loads((OLD / "expected.json").read_text())
CLASSIFIERS = ("plain", "skip", "cdeq")


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as when the numbers were computed
    yield
    torch.set_num_threads(before)


def _digits_eval(model, classes=None, data_cfg=None):
    model.eval()
    cfg = resolve_data_cfg(model, data_cfg)
    dataset = build_classification_split({"name": "digits"}, "val", transform=build_transform(cfg, False),
                                         classes=classes)
    res = evaluate_classifier(model, build_eval_loader(dataset, 64, workers=0), DistEnv(), progress=False)
    with torch.no_grad():
        logits = model(torch.stack([dataset[i][0] for i in range(4)]))
    return res, logits


def _same_numbers(res, logits, expected):
    assert res.count == expected["count"]
    assert res.top1 == pytest.approx(expected["top1"], abs=1e-9)
    assert res.loss == pytest.approx(expected["loss"], rel=1e-5)
    assert res.deq_nstep_mean == pytest.approx(expected["deq_nstep_mean"], abs=1e-9)
    assert res.deq_rel_residual_mean == pytest.approx(expected["deq_rel_residual_mean"], rel=1e-4)
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_old_training_checkpoints_rebuild_and_evaluate_to_the_same_numbers(name):
    expected = EXPECTED[f"{name}.pth"]
    ckpt = load_checkpoint(OLD / f"{name}.pth")  # format 1, upgraded in memory
    assert ckpt["version"] == 2 and "f_thres" not in ckpt["config"]["deq"] and "jac" not in ckpt["config"]
    assert ckpt["config"]["deq"]["max_iter"] == expected["solver"]["max_iter"]  # 8 (C-DEQ: 1 student step)
    assert ckpt["config"]["schedule"]["pretrain_steps"] == 12
    loaded = model_from_checkpoint(OLD / f"{name}.pth")
    model = loaded.model
    assert model.cfg.skip_init == (name == "skip") and model.cfg.student == (name == "cdeq")
    for key in ("solver", "max_iter", "tol", "stop_mode", "b_solver", "b_max_iter", "init"):
        assert model.deq.options[key] == expected["solver"][key], key  # the settings it was evaluated with
    _same_numbers(*_digits_eval(model, loaded.classes, loaded.data_cfg), expected)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_old_published_folders_load_and_evaluate_to_the_same_numbers(name):
    folder = OLD / "published" / f"mdeq_tiny.fixture_{name}"
    with warnings.catch_warnings(record=True) as caught:  # skip / cdeq: config.json has the old deq spelling
        warnings.simplefilter("always")
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    old_spelling = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert bool(old_spelling) == (name == "skip") and model.cfg.student == (name == "cdeq")
    if old_spelling:
        assert "skip_init=True" in str(old_spelling[0].message)
    _same_numbers(*_digits_eval(model), EXPECTED[f"published/{folder.name}"])


def test_old_segmentation_checkpoint_evaluates_to_the_same_numbers():
    expected = EXPECTED["seg.pth"]
    loaded = model_from_checkpoint(OLD / "seg.pth")
    model = loaded.model.eval()
    assert loaded.task == "segmentation" and model.deq.options["max_iter"] == 4
    dataset = build_segmentation_dataset("synthetic", None, "val", transform=build_seg_eval_transform())
    loader = build_eval_loader(dataset, 4, workers=0, collate_fn=collate_same_size)
    res = evaluate_segmentation(model, loader, DistEnv(), dataset.num_classes, ignore_index=dataset.ignore_index,
                                inference=build_inference(model, loaded.config.get("inference")), progress=False)
    assert res.count == expected["count"] and res.deq_nstep_mean == expected["deq_nstep_mean"]
    assert res.metrics.miou == pytest.approx(expected["miou"], abs=1e-6)
    assert res.metrics.aacc == pytest.approx(expected["aacc"], abs=1e-6)
    with torch.no_grad():
        logits = model(dataset[0][0][None]).double()
    assert logits.sum().item() == pytest.approx(expected["logits_sum"], rel=1e-5)
    assert logits.abs().sum().item() == pytest.approx(expected["logits_abs_sum"], rel=1e-5)


def test_an_old_checkpoint_resumes_and_old_names_in_it_are_upgraded(tmp_path):
    from hydra import compose, initialize_config_module

    from mdeq.engine.app import CONFIG_MODULE, plain_config, register_configs
    from mdeq.engine.classification_trainer import ClassificationTrainer
    from mdeq.engine.legacy import upgrade_config

    old = torch.load(OLD / "skip.pth", map_location="cpu", weights_only=True)
    assert "f_thres" in old["config"]["deq"] and old["identity"]["model_kwargs"]["deq"] == {"init": "skip"}
    new = upgrade_config(old["config"])
    assert new["deq"]["max_iter"] == old["config"]["deq"]["f_thres"]
    assert new["deq"]["b_max_iter"] == old["config"]["deq"]["b_thres"]
    assert new["schedule"]["jac"] == old["config"]["jac"] and new["model"]["kwargs"]["skip_init"] is True
    assert upgrade_config(new) == new  # already new: unchanged
    ckpt = load_checkpoint(OLD / "skip.pth")
    assert ckpt["identity"]["model_kwargs"] == {"dropout": 0.0, "num_channels": [8, 8], "head_channels": [4, 8],
                                                "final_chansize": 32, "num_groups": 4, "skip_init": True}

    # the run it came from, continued for 2 more steps with today's config names
    register_configs()
    overrides = ["++model.kwargs={num_channels:[8,8],head_channels:[4,8],final_chansize:32,num_groups:4,dropout:0.0,"
                 "skip_init:true}", "train.max_steps=26", "schedule.pretrain_steps=12", "train.precise_bn_batches=2",
                 "train.progress=false", "data.workers=0", f"train.resume={OLD / 'skip.pth'}", f"output_dir={tmp_path}"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = plain_config(compose("train_cls", overrides=["experiment=digits_skip", *overrides]))
    metrics = ClassificationTrainer(cfg, DistEnv(), tmp_path).fit()
    assert metrics["steps"] == 26 and metrics["phase"] == "deq"
    resumed = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert resumed["version"] == 2 and resumed["progress"]["step"] == 26
