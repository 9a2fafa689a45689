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
