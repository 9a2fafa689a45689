"""Any timm classifier trains, resumes, evaluates and fine-tunes through the same tools; the MDEQ parts apply to
models holding an MDEQ (a user's model with one inside too) and are refused on the command line for the others.
Also the Hydra papercuts on that path (model.kwargs without +, deq=fast in one line, data.workers) and the warnings
of a run that goes wrong."""
import json
import math

import pytest
import timm
import torch
from torch import nn

from mdeq.engine.checkpoint import load_checkpoint

from .conftest import fast_overrides, run_tool
from .test_train_cls import compose_config, scalars, train_in_process


def explicit_overrides(root, *extra):
    """A short run of an explicit network: no DEQ setting anywhere on the command line."""
    return ["~experiment", "data=imagefolder", f"data.root={root}", "data.batch_size=10", "data.eval_batch_size=15",
            "data.workers=0", "data.overrides.input_size=16", "train.epochs=2", "train.log_interval=1",
            "train.progress=false", *extra]


@pytest.fixture(scope="module")
def resnet_run(digits_small, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resnet") / "run"
    proc = run_tool("train_cls.py", explicit_overrides(digits_small, "model.name=resnet18", f"hydra.run.dir={run_dir}"),
                    cwd=run_dir.parent)
    return run_dir, proc


def test_an_explicit_network_trains_with_the_mdeq_parts_skipped(resnet_run):
    run_dir, proc = resnet_run
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["model"] == "resnet18" and m["has_mdeq"] is False and m["phase"] == "explicit"
    assert m["eval_solver"] is None and m["deq_nstep_mean"] is None and m["deq_rel_residual_mean"] is None
    assert m["steps"] == 12 and 0.0 <= m["val_top1"] <= 100.0 and math.isfinite(m["val_loss"])
    log = (run_dir / "train_cls.log").read_text()
    assert log.count("holds no MDEQ") == 1 and "explicit network, no MDEQ" in log
    assert "an explicit network (no MDEQ, nothing solved)" in proc.stdout
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert ck["identity"]["arch"] == "resnet18" and ck["phase"] == "explicit"
    tags = scalars(run_dir / "tensorboard")
    assert "train/loss" in tags and "val/top1" in tags and not any(t.startswith("deq/") for t in tags)


def test_an_explicit_checkpoint_evaluates_and_says_it_has_no_solver(resnet_run, tmp_path):
    run_dir, _ = resnet_run
    m = json.loads((run_dir / "metrics.json").read_text())
    ckpt = str(run_dir / "checkpoints" / "last.pth")
    out = tmp_path / "eval"
    run_tool("eval_cls.py", [ckpt, "--no-progress", "--output", str(out), "--workers", "0"], cwd=tmp_path)
    res = json.loads((out / "eval.json").read_text())
    assert res["top1"] == pytest.approx(m["val_top1"], abs=1e-9) and res["has_mdeq"] is False
    assert res["solver"] is None and res["deq_nstep_mean"] is None
    proc = run_tool("eval_cls.py", [ckpt, "--sweep-iters", "1", "2", "--output", str(tmp_path / "e2")], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0 and "has no solver to set or sweep" in proc.stderr and "--sweep-iters" in proc.stderr
    proc = run_tool("eval_cls.py", [ckpt, "--max-iter", "4", "--output", str(tmp_path / "e3")], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0 and "--max-iter" in proc.stderr and "holds no MDEQ" in proc.stderr


def test_an_explicit_checkpoint_resumes_and_fine_tunes(resnet_run, digits_small, tmp_path):
    run_dir, _ = resnet_run
    ckpt = run_dir / "checkpoints" / "last.pth"
    m = train_in_process(explicit_overrides(digits_small, "model.name=resnet18", "train.epochs=3",
                                            f"train.resume={ckpt}"), tmp_path / "resumed")
    assert m["steps"] == 18 and m["epochs"] == 3 and m["phase"] == "explicit"
    # fine-tuning: the run's weights, a new 2-class head (resnet's classifier is fc), the stem frozen
    parity = tmp_path / "parity"
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (digits_small / split).iterdir()):
            dst = parity / split / ("even" if int(cls) % 2 == 0 else "odd")
            dst.mkdir(parents=True, exist_ok=True)
            for f in (digits_small / split / cls).iterdir():
                (dst / f"{cls}_{f.name}").write_bytes(f.read_bytes())
    out = tmp_path / "ft"
    run_tool("finetune.py", explicit_overrides(parity, "model.name=resnet18", f"model.weights={ckpt}",
                                               "model.freeze=[stem]", "train.epochs=1", f"hydra.run.dir={out}")[1:],
             cwd=tmp_path)  # finetune has no experiment group
    fm = json.loads((out / "metrics.json").read_text())
    assert fm["num_classes"] == 2 and fm["has_mdeq"] is False
    start, tuned = load_checkpoint(ckpt)["model"], load_checkpoint(out / "checkpoints" / "last.pth")["model"]
    assert torch.equal(start["conv1.weight"], tuned["conv1.weight"])  # frozen stem
    assert not torch.equal(start["layer1.0.conv1.weight"], tuned["layer1.0.conv1.weight"])
    assert tuned["fc.weight"].shape == (2, 512)
    with pytest.raises(ValueError, match=r"model.freeze=\[cell\].*explicit network"):
        train_in_process(explicit_overrides(parity, "model.name=resnet18", "model.freeze=[cell]"), tmp_path / "x")


def test_mdeq_settings_on_the_command_line_are_refused_for_an_explicit_network(digits_small, tmp_path):
    proc = run_tool("train_cls.py", explicit_overrides(digits_small, "model.name=resnet18", "deq.max_iter=4",
                                                       "schedule.jac.weight=1.0", f"hydra.run.dir={tmp_path / 'r'}"),
                    cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "model resnet18 holds no MDEQ" in proc.stderr
    assert "deq.max_iter=4, schedule.jac.weight=1.0 configure nothing" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before training
    with pytest.raises(ValueError, match="model resnet18 holds no MDEQ.*deq=fast configures nothing"):
        from mdeq.engine.classification_trainer import ClassificationTrainer
        from mdeq.engine.distributed import DistEnv

        over = explicit_overrides(digits_small, "model.name=resnet18", "deq=fast")
        ClassificationTrainer(compose_config(over + [f"output_dir={tmp_path}"]), DistEnv(), tmp_path,
                              overrides=["deq=fast"])


class WrappedMDEQ(nn.Module):
    """A user's model holding an MDEQ: mdeq_tiny's features and a head of its own."""

    def __init__(self, num_classes: int = 10, **kwargs):
        super().__init__()
        self.body = timm.create_model("mdeq_tiny", num_classes=0, **kwargs)
        self.head = nn.Linear(self.body.num_features, num_classes)
        self.pretrained_cfg = dict(self.body.pretrained_cfg)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_users_model_with_an_mdeq_inside_gets_the_mdeq_schedule(digits_small, tmp_path):
    from timm.models import register_model

    if "users_wrapped_mdeq" not in timm.list_models("users_wrapped_mdeq"):
        @register_model
        def users_wrapped_mdeq(pretrained=False, **kwargs):
            kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
            kwargs.pop("drop_rate", None)
            return WrappedMDEQ(**kwargs)

    m = train_in_process(fast_overrides(digits_small, "model.name=users_wrapped_mdeq"), tmp_path)
    assert m["has_mdeq"] is True and m["phase"] == "deq" and m["deq_nstep_mean"] == 3.0
    assert m["eval_solver"]["max_iter"] == 3
    s = scalars(tmp_path / "tensorboard")
    assert [v for _, v in s["train/phase"]] == [0.0] * 6 + [1.0] * 6  # unrolled, then DEQ mode
    assert all(v == 2.0 for _, v in s["deq/fwd/nstep"][:6])  # schedule.unroll_steps
    assert min(step for step, _ in s["deq/jac_loss"]) == 7  # the penalty with DEQ mode


def test_model_kwargs_take_no_plus_and_unknown_keys_are_named(digits_small, tmp_path):
    from mdeq.engine.model_config import check_kwargs_overrides

    cfg = compose_config(["model.kwargs.skip_init=true", "model.kwargs.dropout=0.0", "output_dir=x"])
    assert cfg["model"]["kwargs"]["skip_init"] is True and cfg["model"]["kwargs"]["dropout"] == 0.0
    [problem] = check_kwargs_overrides(["model.kwargs.skip_inti=true", "+model.kwargs.drop_path_rate=0.1"])
    assert "skip_inti (did you mean skip_init?)" in problem and "+model.kwargs.skip_inti=" in problem
    proc = run_tool("train_cls.py", ["model.kwargs.skip_inti=true"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "did you mean skip_init?" in proc.stderr and "not in struct" not in proc.stderr
    with pytest.raises(ValueError, match="model.kwargs drop_path_rate: not an MDEQConfig field"):
        train_in_process(fast_overrides(digits_small, "+model.kwargs.drop_path_rate=0.1"), tmp_path / "a")
    from mdeq.engine.classification_trainer import ClassificationTrainer
    from mdeq.engine.distributed import DistEnv

    given = ["model.name=resnet18", "model.kwargs.num_layers=4"]  # an MDEQ field given for an explicit network
    cfg = compose_config(explicit_overrides(digits_small, *given, f"output_dir={tmp_path / 'b'}"))
    with pytest.raises(ValueError, match=r"does not take model.kwargs \['num_layers'\]"):
        ClassificationTrainer(cfg, DistEnv(), tmp_path / "b", overrides=given)
    # the MDEQ default of the config (model.kwargs.dropout=0.0) is not passed to it
    assert ClassificationTrainer(cfg, DistEnv(), tmp_path / "b", overrides=given[:1]).model_kwargs == {}
    # the old spelling with + still works on the command line
    from mdeq.engine.model_config import without_needless_plus

    assert without_needless_plus(["+model.kwargs.dropout=0.1", "+model.kwargs.drop_path_rate=0.1", "++x=1"]) == [
        "model.kwargs.dropout=0.1", "+model.kwargs.drop_path_rate=0.1", "++x=1"]


def test_deq_fast_builds_the_predictor_it_needs(digits_small, tmp_path):
    m = train_in_process(fast_overrides(digits_small, "deq=fast", "train.max_steps=8"), tmp_path)
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert ck["identity"]["model_kwargs"] == {"skip_init": True, "dropout": 0.0}  # + the own-data default
    assert any(k.startswith("fullstage.initializer.") for k in ck["model"])
    assert m["eval_solver"]["init"] == "skip" and m["eval_solver"]["backward"] == "one_step"
    with pytest.raises(ValueError, match="init='skip' needs predictor.*skip_init=True"):
        train_in_process(fast_overrides(digits_small, "deq=fast", "model.kwargs.skip_init=false"), tmp_path / "no")


def test_data_workers_default_to_the_machine(monkeypatch):
    from mdeq.data.loaders import MAX_AUTO_WORKERS, available_cores, resolve_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers(None) == max(1, min(MAX_AUTO_WORKERS, available_cores()))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(available_cores() * 2))
    assert resolve_workers(None) == 1  # more local processes than cores: one each
    assert resolve_workers(0) == 0 and resolve_workers(3) == 3
    with pytest.raises(ValueError, match="data.workers must be an integer >= 0"):
        resolve_workers(-1)
    assert compose_config(["~experiment", "data=imagefolder", "data.root=x", "output_dir=x"])["data"]["workers"] is None


def test_a_run_that_goes_wrong_says_so(digits_small, resnet_run, tmp_path):
    m = train_in_process(fast_overrides(digits_small, "optim.lr=1e4", "train.epochs=3"), tmp_path)
    assert any(w.startswith("the training loss grows") and "optim.lr=10000.0" in w for w in m["warnings"])
    assert any("chance level" in w for w in m["warnings"])
    assert json.loads((tmp_path / "metrics.json").read_text())["warnings"] == m["warnings"]
    run_dir, _ = resnet_run  # a run that learns: no warning (a loader-bound one may be told so: data.workers=0 here)
    warned = json.loads((run_dir / "metrics.json").read_text())["warnings"]
    assert [w for w in warned if not w.startswith("the model waited for data")] == []


def test_a_run_waiting_for_its_data_says_so(digits_small, tmp_path, monkeypatch):
    """A loader slower than the model: the log and metrics.json say so once, naming data.workers; TensorBoard gets
    the share of time spent waiting."""
    import time

    from mdeq.data.classification import ImageFolderDataset

    from .test_train_cls import scalars

    real = ImageFolderDataset.__getitem__

    def slow(self, index):
        time.sleep(0.02)  # 10 images a batch: 0.2 s of loading against a step of a few ms
        return real(self, index)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", slow)
    m = train_in_process(explicit_overrides(digits_small, "model.name=test_byobnet", "train.epochs=2"), tmp_path)
    waited = [w for w in m["warnings"] if w.startswith("the model waited for data")]
    assert len(waited) == 1 and "data.workers (now 0)" in waited[0] and "epoch 0" in waited[0]
    fractions = [v for _, v in scalars(tmp_path / "tensorboard")["train/data_wait_fraction"]]
    assert fractions and max(fractions) > 0.5 and all(0.0 <= f < 1.0 for f in fractions)  # (1st batch: not counted)


def test_a_local_dir_model_trains_from_its_weights_with_a_new_head(digits_small, tmp_path):
    from timm.models import save_for_hf

    folder = tmp_path / "byob"
    save_for_hf(timm.create_model("test_byobnet", num_classes=7), str(folder), safe_serialization=True)
    local = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=10)
    start = local.state_dict()
    m = train_in_process(explicit_overrides(digits_small, f"model.name=local-dir:{folder}", "model.pretrained=true",
                                            "train.max_steps=1", "train.epochs=1", "optim.lr=1e-9"), tmp_path / "run")
    assert m["has_mdeq"] is False and m["num_classes"] == 10
    assert m["parameters"] == sum(q.numel() for q in local.parameters())
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")
    assert ck["identity"]["arch"] == f"local-dir:{folder}" and ck["model"]["head.fc.weight"].shape == (10, 256)
    w = "stem.conv.weight"
    assert torch.allclose(ck["model"][w], start[w], atol=1e-6)  # the folder's weights (lr ~0: one step moves nothing)


def test_the_mdeq_only_tools_say_so_for_an_explicit_checkpoint(resnet_run, tmp_path):
    run_dir, _ = resnet_run
    ckpt = str(run_dir / "checkpoints" / "last.pth")
    for tool, args, message in (
            ("export.py", [ckpt, "--budget", "2", "--output", str(tmp_path / "m.onnx")], "holds no MDEQ"),
            ("publish_weights.py", [ckpt, "--name", "resnet18.mine", "--url", "https://example.org/w.safetensors"],
             "not an MDEQ preset"),
            ("distill.py", [ckpt, "--output", str(tmp_path / "d")], "an explicit network")):
        proc = run_tool(tool, args, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (tool, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, tool


def test_a_run_from_a_checkpoint_trains_at_the_size_the_checkpoint_was_trained_at(resnet_run, digits_small):
    from mdeq.data.classification import ImageFolderDataset
    from mdeq.data.inspect import typical_image_size
    from mdeq.engine.classification_trainer import build_model, data_choices_for

    run_dir, _ = resnet_run  # trained at 16x16 on 32-px digits
    model = build_model({"name": "resnet18", "weights": str(run_dir / "checkpoints" / "last.pth")}, num_classes=2)
    assert model.pretrained_cfg["input_size"] == (3, 16, 16)
    data = {"overrides": {"input_size": "auto", "crop_pct": "auto"}, "aug": {"policy": "auto", "hflip": 0.5}}
    side = typical_image_size(ImageFolderDataset(digits_small / "train"))
    assert data_choices_for(data, model, side, from_weights=True).overrides["input_size"] == 16
    fresh = timm.create_model("resnet18", num_classes=2)
    assert data_choices_for(data, fresh, side).overrides["input_size"] == 32  # from scratch: the images' size


def test_explicit_networks_and_wrapped_mdeqs_get_input_sizes_they_take():
    from mdeq.engine.classification_trainer import data_choices_for

    data = {"overrides": {"input_size": "auto", "crop_pct": "auto"}, "aug": {"policy": "auto", "hflip": 0.5}}
    hrnet = timm.create_model("hrnet_w18_small", num_classes=2)  # branches that must line up: multiples of 32
    assert [data_choices_for(data, hrnet, side).overrides["input_size"] for side in (25, 28, 48, 375)] == [
        32, 32, 64, 224]
    wrapped = WrappedMDEQ(num_classes=2)  # the MDEQ inside sets the rules: multiples of 2, finest branch <= 16
    assert data_choices_for(data, wrapped, 32).overrides["input_size"] == 16


def test_the_health_of_a_run_survives_a_resume():
    from mdeq.engine.train_health import TrainingHealth

    health = TrainingHealth("optim.lr=1")
    health.begin(2.3)
    health.begin(9.0)  # only the first step is the reference
    health.loss(50.0, step=10)
    assert len(health.warnings) == 1 and "22x its start (2.3)" in health.warnings[0]
    resumed = TrainingHealth("optim.lr=1")
    resumed.load_state_dict(health.state_dict())
    resumed.begin(40.0)  # the resumed run's first step is no reference: the saved one is
    resumed.loss(60.0, step=20)
    assert resumed.warnings == health.warnings and resumed.start == 2.3  # warned once, across the resume
    old = TrainingHealth("optim.lr=1")
    old.load_state_dict(None)  # a checkpoint written before the checks: its first step after resuming
    old.begin(3.0)
    assert old.start == 3.0


def test_a_resumed_run_keeps_the_data_choices_it_started_with(digits_small, tmp_path):
    from mdeq.engine.classification_trainer import ClassificationTrainer
    from mdeq.engine.distributed import DistEnv

    cfg = compose_config(explicit_overrides(digits_small, "model.name=resnet18", "data.overrides.input_size=auto",
                                            f"output_dir={tmp_path}"))
    trainer = ClassificationTrainer(cfg, DistEnv(), tmp_path)
    assert list(trainer.data_cfg["input_size"]) == [3, 32, 32]
    saved = trainer.extra_state()["data_choices"]
    saved = dict(saved, overrides=dict(saved["overrides"], input_size=24))  # chosen otherwise by an older version
    trainer.restore_extra({"data_choices": saved})
    assert list(trainer.data_cfg["input_size"]) == [3, 24, 24]
    assert trainer.train_set.transform is not None and trainer.data_choices.overrides["input_size"] == 24


def test_deq_fast_builds_the_predictor_for_a_local_dir_mdeq_too(tmp_path):
    from timm.models import save_for_hf

    from mdeq.engine.model_config import architecture_kwargs, architecture_of

    save_for_hf(timm.create_model("mdeq_tiny", num_classes=3), str(tmp_path / "m"))
    name = f"local-dir:{tmp_path / 'm'}"
    assert architecture_of(name) == "mdeq_tiny"
    assert architecture_kwargs({"name": name, "kwargs": {"dropout": 0.0}}, {"init": "skip"}) == {
        "dropout": 0.0, "skip_init": True}
    assert architecture_kwargs({"name": "resnet18", "kwargs": {"dropout": 0.0}}, {"init": "skip"}) == {}
