"""The experiment configs carry the official recipes (values from the locuslab YAMLs, see the shared notes).

The tables hold the official F_THRES / B_THRES. The original's Broyden evaluates f at z0 and then takes that many
steps, and ``max_iter`` counts every evaluation, so the configs' budgets are the thresholds + 1 (``memory``, the
updates kept, is the threshold)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# experiment: (model, model kwargs, solver, f/b thres, stop mode, pretrain steps, opt, lr, wd, batch, epochs, jac)
OFFICIAL = {
    "imagenet_small": ("mdeq_small", {}, "broyden", (26, 27), "abs", 510000, "sgd", 0.05, 5e-5, 32, 100, None),
    "imagenet_small_jr": ("mdeq_small", {"head_channels": [28, 56, 112, 224], "dropout": 0.02,
                                         "post_gn_affine": False}, "broyden", (14, 14), "abs", 510000, "sgd", 0.04,
                          2e-5, 32, 100, (2.5, 0.08, 50000, 0.03)),
    "imagenet_large": ("mdeq_large", {}, "broyden", (26, 27), "abs", 510000, "sgd", 0.05, 1e-4, 32, 100, None),
    "imagenet_large_jr": ("mdeq_large", {"post_gn_affine": False}, "broyden", (14, 14), "abs", 510000, "sgd", 0.05,
                          1e-4, 32, 100, (3.0, 0.08, 50000, 0.03)),
    "imagenet_xl": ("mdeq_xl", {}, "broyden", (26, 27), "abs", 400000, "sgd", 0.05, 1e-4, 32, 100, None),
    "imagenet_xl_jr": ("mdeq_xl", {"post_gn_affine": False}, "broyden", (14, 14), "abs", 400000, "sgd", 0.05, 1e-4,
                       32, 100, (3.0, 0.08, 50000, 0.03)),
    "cifar10_tiny": ("mdeq_tiny", {"dropout": 0.25}, "broyden", (18, 20), "rel", 3000, "adam", 1e-3, 2.5e-6, 128, 50,
                     None),
    "cifar10_large": ("mdeq_cifar_large", {"dropout": 0.3}, "broyden", (18, 20), "rel", 20000, "adam", 1e-3, 0.0, 128,
                      220, None),
    "cifar10_large_jr": ("mdeq_cifar_large", {"num_layers": 8, "dropout": 0.22}, "broyden", (8, 7), "rel", 16000,
                         "adam", 1e-3, 0.0, 96, 220, (0.4, 0.02, 0, 0.0)),
}


# Cityscapes (seg_mdeq_*.yaml, v2; notes §2.2/2.4): (preset, pretrain steps, wd, batch per GPU, crop, backbone)
SEG_OFFICIAL = {
    "cityscapes_small": ("mdeq_small", 60000, 2e-4, 3, [512, 1024], "mdeq_small.in1k_official"),
    "cityscapes_large": ("mdeq_large", 60000, 3e-4, 3, [512, 1024], None),  # no ImageNet LARGE weights released
    "cityscapes_xl": ("mdeq_xl", 40000, 3e-4, 2, [768, 1024], "mdeq_xl.in1k_official"),
}


CONFIGS = ROOT / "mdeq" / "configs"


def _compose(experiment, app="train_cls", *extra):
    from hydra import compose, initialize_config_dir

    from mdeq.engine.app import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        chosen = "~experiment" if experiment is None else f"experiment={experiment}"
        return compose(app, overrides=[chosen, *extra])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_experiment_reproduces_the_official_recipe(name):
    model, kwargs, solver, (f, b), stop, pre, opt, lr, wd, batch, epochs, jac = OFFICIAL[name]
    c = _compose(name)
    assert c.recipe == name
    assert c.model.name == model and {k: v for k, v in c.model.kwargs.items() if v is not None} == kwargs
    assert (c.deq.solver, c.deq.b_solver, c.deq.max_iter, c.deq.b_max_iter, c.deq.stop_mode) == (
        solver, solver, f + 1, b + 1, stop)
    assert c.deq.solver_options.memory == f and c.deq.b_solver_options.memory == b  # full-memory Broyden
    assert c.schedule.pretrain_steps == pre and c.deq.backward == "ift"
    assert (c.optim.opt, c.optim.lr, c.optim.weight_decay) == (opt, lr, wd)
    assert c.data.batch_size == batch and c.train.epochs == epochs
    assert c.train.precise_bn_batches == 0  # validated with BatchNorm's running averages, as the original
    if name.startswith("imagenet"):  # the original's crops, whatever size the copy of ImageNet has
        assert (c.data.overrides.input_size, c.data.overrides.crop_pct, c.data.aug.policy) == (None, None, "rrc")
        assert (list(c.data.aug.scale), c.data.aug.hflip) == ([0.08, 1.0], 0.5)
    assert (c.sched.sched, c.sched.min_lr, c.sched.warmup_epochs, c.sched.step_on_epochs) == ("cosine", 1e-6, 0, False)
    jacobian = c.schedule.jac
    if jac is None:
        assert jacobian.weight == 0 and jacobian.freq == 0
    else:
        assert (jacobian.weight, jacobian.freq, jacobian.incremental, jacobian.pretrain_weight) == jac
    if name == "cifar10_large_jr":
        assert c.schedule.max_iter_jitter == 2 and jacobian.stop_epoch == 90


@pytest.mark.parametrize("name", sorted(SEG_OFFICIAL))
def test_cityscapes_experiment_reproduces_the_official_recipe(name):
    preset, pre, wd, batch, crop, backbone = SEG_OFFICIAL[name]
    c = _compose(name, "train_seg")
    assert c.recipe == name and c.task == "segmentation" and c.model.task == c.data.task == "segmentation"
    assert c.model.name == preset and c.model.backbone == backbone
    assert all(v is None for v in c.model.kwargs.values())  # the preset's architecture
    assert (c.deq.solver, c.deq.b_solver, c.deq.max_iter, c.deq.b_max_iter, c.deq.stop_mode) == (
        "broyden", "broyden", 27 + 1, 30 + 1, "abs")
    assert c.deq.solver_options.memory == 27 and c.deq.b_solver_options.memory == 30
    assert c.schedule.pretrain_steps == pre
    assert (c.optim.opt, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == ("momentum", 0.01, 0.9, wd)
    assert (c.sched.sched, c.sched.min_lr, c.sched.step_on_epochs) == ("cosine", 1e-6, False)
    assert c.data.name == "cityscapes" and c.data.batch_size == batch and list(c.data.crop_size) == crop
    assert list(c.data.scale_range) == [0.5, 2.0] and c.data.flip
    assert c.loss.class_weights == "cityscapes" and c.loss.ohem_thresh is None
    assert c.train.epochs == 500 and c.train.sync_bn and c.inference.mode == "whole"


def test_seg_option_groups():
    from hydra import compose, initialize_config_dir

    from mdeq.engine.app import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        c = compose("train_seg", overrides=["experiment=cityscapes_small", "loss=ohem", "inference=ms_flip",
                                            "sched=poly"])
    assert (c.loss.ohem_thresh, c.loss.ohem_min_kept, c.loss.class_weights) == (0.9, 131072, "cityscapes")
    assert list(c.inference.scales) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and c.inference.flip
    assert (c.sched.sched, c.sched.decay_rate) == ("poly", 0.9)


# the budget benchmark's digits runs: digits_tiny's recipe, no Jacobian penalty, one change each (deq, schedule
# or model keys; init_weight 1.0 is spelled out by the Skip recipes and is the default)
CHEAP = {
    "digits_plain": {},
    "digits_phantom": {"deq.backward": "phantom", "deq.phantom_steps": 5, "deq.phantom_damping": 0.5},
    "digits_skip": {"model.kwargs.skip_init": True, "deq.init_weight": 1.0},
    "digits_skip_reg": {"deq.init": "skip_reg", "deq.init_weight": 1.0},
    "digits_stack": {"schedule.pretrain_steps": 1000000, "schedule.unroll_steps": 8},
}


def _flat(cfg, prefix=""):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_budget_experiments_change_one_thing_of_the_digits_recipe(name):
    base, c = _compose("digits_tiny"), _compose(name)
    jac = c.schedule.jac
    assert c.recipe == name and (jac.weight, jac.freq, jac.pretrain_weight) == (0.0, 0.0, 0.0)
    before, after = _flat(base), _flat(c)
    changed = {k: v for k, v in after.items() if before.get(k) != v and k.split(".")[0] in ("deq", "schedule", "model")
               and not k.startswith("schedule.jac.")}
    assert changed == CHEAP[name]
    assert (c.train.epochs, c.optim.lr, c.data.overrides.input_size) == (base.train.epochs, base.optim.lr, 16)


def test_the_continuous_deq_experiment_keeps_the_jacobian_penalty():
    base, c = _compose("digits_tiny"), _compose("digits_ode")
    assert c.recipe == "digits_ode" and c.schedule.jac == base.schedule.jac and c.schedule.jac.weight == 1.0
    assert (c.deq.solver, c.deq.max_iter, dict(c.deq.solver_options)) == (
        "ode", 16, {"method": "bosh3", "rtol": 0.05, "atol": 0.05})


@pytest.mark.parametrize("init", ["skip", "skip_reg"])
def test_imagenet_skip_experiments_are_the_jr_recipe_with_an_initial_guess(init):
    jr, c = _compose("imagenet_small_jr"), _compose(f"imagenet_small_{init}")
    assert c.deq.init_weight == 1.0
    before, after = _flat(jr), _flat(c)
    changed = {k: v for k, v in after.items() if before.get(k) != v and k != "recipe"}
    new_part = {"model.kwargs.skip_init": True} if init == "skip" else {"deq.init": "skip_reg"}
    assert changed == {**new_part, "deq.init_weight": 1.0}
    assert c.schedule == jr.schedule and c.optim == jr.optim


FAST = {"digits_fast": "digits_tiny", "imagenet_small_fast": "imagenet_small",
        "cityscapes_small_fast": "cityscapes_small"}


@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_experiments_are_their_base_recipe_with_the_fast_deq_settings(name):
    app = "train_seg" if name.startswith("cityscapes") else "train_cls"
    base, c = _compose(FAST[name], app), _compose(name, app)
    assert c.recipe == name and c.model.kwargs.skip_init is True
    assert (c.deq.solver, c.deq.max_iter, c.deq.init, c.deq.backward) == ("anderson", 4, "skip", "one_step")
    assert (c.schedule.jac.weight, c.schedule.jac.freq, c.schedule.jac.probes) == (1.0, 0.25, 1)
    assert c.optim == base.optim and c.train.epochs == base.train.epochs and c.data.batch_size == base.data.batch_size
    if name == "imagenet_small_fast":  # pre-training by fraction instead of the official 510k steps
        assert (c.schedule.pretrain_steps, c.schedule.pretrain_fraction) == (0, 0.15)
    else:
        assert c.schedule.pretrain_steps == base.schedule.pretrain_steps


def test_a_run_without_an_experiment_gets_the_mdeq_essentials():
    c = _compose(None)
    assert (c.deq.solver, c.deq.max_iter, c.deq.b_max_iter, c.deq.backward) == ("anderson", 8, 8, "ift")
    assert (c.schedule.pretrain_steps, c.schedule.pretrain_fraction) == (0, 0.15)
    assert (c.schedule.jac.weight, c.schedule.jac.freq, c.schedule.jac.pretrain_weight) == (1.0, 0.5, 1.0)
    # the official recipes keep their own schedule (no penalty, pre-training by steps)
    official = _compose("imagenet_small")
    assert (official.schedule.pretrain_fraction, official.schedule.jac.weight) == (0.0, 0.0)


def test_every_experiment_file_is_covered():
    files = {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    assert files == set(OFFICIAL) | set(SEG_OFFICIAL) | set(CHEAP) | set(FAST) | {
        "digits_tiny", "digits_ode", "synthetic_seg", "imagenet_small_skip", "imagenet_small_skip_reg"}


# ---------------------------------------------------------------------------------------------- field by field
# The original experiment files' values (locuslab/mdeq and locuslab/deq, v2 YAMLs; shared notes §2.2-2.3), one
# entry per official experiment config. batch is the original's per-GPU batch and gpus its GPU count: the configs
# hold the per-process batch, which torchrun --nproc_per_node=<gpus> multiplies back into the original's global batch.
_CIFAR = dict(opt="adam", lr=1e-3, sched="cosine", epochs=220, size=32, eval="whole 32x32",
              mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), stop_mode="rel", jac=(0.0, 0.0),
              augment="pad 4 + random crop 32 + hflip 0.5")
_IMAGENET = dict(opt="sgd", lr=0.05, sched="cosine", epochs=100, size=224, eval="resize 256 + center crop 224",
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), stop_mode="abs", jac=(0.0, 0.0),
                 augment="random-resized crop 224 (0.08-1, 3/4-4/3) + hflip 0.5", batch=32, gpus=4,
                 pretrain_steps=510000, dropout=0.0, f_thres=26, b_thres=27)
ORIGINAL = {
    "cifar10_tiny": dict(_CIFAR, source="cls_mdeq_TINY.yaml", model="mdeq_tiny", weight_decay=2.5e-6, epochs=50,
                         batch=64, gpus=2, pretrain_steps=3000, depth=10, f_thres=18, b_thres=20, dropout=0.25,
                         augment="none"),
    "cifar10_large": dict(_CIFAR, source="cls_mdeq_LARGE.yaml", model="mdeq_cifar_large", weight_decay=0.0, batch=32,
                          gpus=4, pretrain_steps=20000, depth=10, f_thres=18, b_thres=20, dropout=0.3),
    "cifar10_large_jr": dict(_CIFAR, source="cls_mdeq_LARGE_reg.yaml", model="mdeq_cifar_large", weight_decay=0.0,
                             batch=96, gpus=1, pretrain_steps=16000, depth=8, f_thres=8, b_thres=7, dropout=0.22,
                             jac=(0.4, 0.02)),
    "imagenet_small": dict(_IMAGENET, source="cls_mdeq_SMALL.yaml", model="mdeq_small", weight_decay=5e-5, depth=5),
    "imagenet_large": dict(_IMAGENET, source="cls_mdeq_LARGE.yaml", model="mdeq_large", weight_decay=1e-4, depth=4),
    "imagenet_xl": dict(_IMAGENET, source="cls_mdeq_XL.yaml", model="mdeq_xl", weight_decay=1e-4, depth=4, gpus=8),
    "imagenet_small_jr": dict(_IMAGENET, source="cls_mdeq_SMALL_reg.yaml", model="mdeq_small", lr=0.04,
                              weight_decay=2e-5, depth=5, f_thres=14, b_thres=14, dropout=0.02, jac=(2.5, 0.08)),
    "imagenet_large_jr": dict(_IMAGENET, source="cls_mdeq_LARGE_reg.yaml", model="mdeq_large", weight_decay=1e-4,
                              depth=4, f_thres=14, b_thres=14, jac=(3.0, 0.08)),
    "imagenet_xl_jr": dict(_IMAGENET, source="LARGE_reg's recipe on XL (no official XL_reg)", model="mdeq_xl",
                           weight_decay=1e-4, depth=4, gpus=8, f_thres=14, b_thres=14, jac=(3.0, 0.08)),
}
# (experiment, field) -> why the config differs from the original file; each must still differ (no stale reasons)
DIFFERENCES = {
    ("imagenet_xl", "pretrain_steps"): "v2's 510,000 exceeds the ~500,500 steps of 100 epochs at batch 256, so DEQ "
                                       "mode would never start; v1's 400,000 is kept",
    ("imagenet_xl_jr", "pretrain_steps"): "as imagenet_xl: v1's 400,000",
    ("cifar10_tiny", "batch"): "the original's global batch (64 per GPU x 2) in one process, where CIFAR fits; "
                               "data.batch_size=64 under torchrun --nproc_per_node=2",
    ("cifar10_large", "batch"): "the global batch (32 per GPU x 4) in one process; data.batch_size=32 under "
                                "torchrun --nproc_per_node=4",
}


def _config_values(c):
    """The comparable fields of a composed train_cls config, nulls resolved as the tools resolve them."""
    from mdeq.models.config import CLS_PRESETS

    preset = CLS_PRESETS[c.model.name]
    kwargs = {k: v for k, v in c.model.kwargs.items() if v is not None}
    cfg = _pretrained_cfg(c.model.name)
    size = c.data.overrides.input_size or cfg["input_size"][-1]
    crop_pct = c.data.overrides.crop_pct or cfg["crop_pct"]
    aug = c.data.aug
    if aug.policy == "pad_crop" and (aug.padding or aug.hflip):
        augment = f"pad {aug.padding} + random crop {size} + hflip {aug.hflip}"
    elif aug.policy == "pad_crop":
        augment = "none"
    else:
        ratio = "3/4-4/3" if [round(r, 4) for r in aug.ratio] == [0.75, 1.3333] else list(aug.ratio)
        augment = f"random-resized crop {size} ({aug.scale[0]:g}-{aug.scale[1]:g}, {ratio}) + hflip {aug.hflip}"
    assert not aug.color_jitter and not aug.auto_augment and not aug.re_prob  # the originals use none of these
    resize = round(size / crop_pct)
    return dict(
        model=c.model.name, opt=c.optim.opt, lr=c.optim.lr, sched=c.sched.sched, weight_decay=c.optim.weight_decay,
        epochs=c.train.epochs, batch=c.data.batch_size, pretrain_steps=c.schedule.pretrain_steps,
        depth=c.schedule.unroll_steps or kwargs.get("num_layers", preset.num_layers),
        f_thres=c.deq.max_iter - 1, b_thres=c.deq.b_max_iter - 1, stop_mode=c.deq.stop_mode,
        dropout=kwargs.get("dropout", preset.dropout), jac=(c.schedule.jac.weight, c.schedule.jac.freq),
        augment=augment, size=size,
        eval=f"whole {size}x{size}" if crop_pct == 1.0 else f"resize {resize} + center crop {size}",
        mean=tuple(c.data.overrides.mean or cfg["mean"]), std=tuple(c.data.overrides.std or cfg["std"]))


def _pretrained_cfg(name):
    import timm

    import mdeq  # noqa: F401 (registers the models)

    return timm.create_model(name, pretrained=False).pretrained_cfg


def test_every_official_experiment_matches_the_original_field_by_field():
    experiments = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")
                         if p.stem.startswith(("imagenet", "cifar")) and not p.stem.endswith(("_fast", "_skip",
                                                                                             "_skip_reg")))
    assert experiments == sorted(ORIGINAL), "every official classification experiment has its row here"
    problems, stale = [], []
    for name in experiments:
        want, got = ORIGINAL[name], _config_values(_compose(name))
        for field, value in got.items():
            expected = want[field]
            same = (value == pytest.approx(expected) if isinstance(expected, (float, tuple)) else value == expected)
            reason = DIFFERENCES.get((name, field))
            if not same and reason is None:
                problems.append(f"{name}.{field}: config {value!r}, original ({want['source']}) {expected!r}")
            elif same and reason is not None:
                stale.append(f"{name}.{field} is now the original's; drop the reason {reason!r}")
    assert not problems, "configs differ from the original files:\n" + "\n".join(problems)
    assert not stale, "\n".join(stale)
