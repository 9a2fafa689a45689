"""The experiment configs carry the official recipes (values from the locuslab YAMLs, see the shared notes)."""
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
    "cifar10_tiny": ("mdeq_tiny", {}, "broyden", (18, 20), "rel", 3000, "adam", 1e-3, 2.5e-6, 128, 50, None),
    "cifar10_large": ("mdeq_cifar_large", {}, "broyden", (18, 20), "rel", 20000, "adam", 1e-3, 0.0, 128, 220, None),
    "cifar10_large_jr": ("mdeq_cifar_large", {"num_layers": 8, "dropout": 0.22}, "broyden", (8, 7), "rel", 16000,
                         "adam", 1e-3, 0.0, 96, 220, (0.4, 0.02, 0, 0.0)),
}


# Cityscapes (seg_mdeq_*.yaml, v2; notes §2.2/2.4): (preset, pretrain steps, wd, batch per GPU, crop, backbone)
SEG_OFFICIAL = {
    "cityscapes_small": ("mdeq_small", 60000, 2e-4, 3, [512, 1024], "mdeq_small.in1k_official"),
    "cityscapes_large": ("mdeq_large", 60000, 3e-4, 3, [512, 1024], None),  # no ImageNet LARGE weights released
    "cityscapes_xl": ("mdeq_xl", 40000, 3e-4, 2, [768, 1024], "mdeq_xl.in1k_official"),
}


def _compose(experiment, app="train_cls"):
    from hydra import compose, initialize_config_dir

    from mdeq.engine.app import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(app, overrides=[f"experiment={experiment}"])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_experiment_reproduces_the_official_recipe(name):
    model, kwargs, solver, (f, b), stop, pre, opt, lr, wd, batch, epochs, jac = OFFICIAL[name]
    c = _compose(name)
    assert c.recipe == name
    assert c.model.name == model and dict(c.model.kwargs) == kwargs
    assert (c.deq.solver, c.deq.b_solver, c.deq.f_thres, c.deq.b_thres, c.deq.stop_mode) == (solver, solver, f, b, stop)
    assert c.deq.solver_options.memory == f and c.deq.b_solver_options.memory == b  # full-memory Broyden
    assert c.deq.pretrain_steps == pre and c.deq.backward == "ift"
    assert (c.optim.opt, c.optim.lr, c.optim.weight_decay) == (opt, lr, wd)
    assert c.data.batch_size == batch and c.train.epochs == epochs
    assert (c.sched.sched, c.sched.min_lr, c.sched.warmup_epochs, c.sched.step_on_epochs) == ("cosine", 1e-6, 0, False)
    if jac is None:
        assert c.jac.weight == 0 and c.jac.freq == 0
    else:
        assert (c.jac.weight, c.jac.freq, c.jac.incremental, c.jac.pretrain_weight) == jac
    if name == "cifar10_large_jr":
        assert c.deq.rand_f_thres_delta == 2 and c.jac.stop_epoch == 90


@pytest.mark.parametrize("name", sorted(SEG_OFFICIAL))
def test_cityscapes_experiment_reproduces_the_official_recipe(name):
    preset, pre, wd, batch, crop, backbone = SEG_OFFICIAL[name]
    c = _compose(name, "train_seg")
    assert c.recipe == name and c.task == "segmentation" and c.model.task == c.data.task == "segmentation"
    assert c.model.name == preset and c.model.backbone == backbone and dict(c.model.kwargs) == {}
    assert (c.deq.solver, c.deq.b_solver, c.deq.f_thres, c.deq.b_thres, c.deq.stop_mode) == ("broyden", "broyden", 27,
                                                                                            30, "abs")
    assert c.deq.solver_options.memory == 27 and c.deq.b_solver_options.memory == 30 and c.deq.pretrain_steps == pre
    assert (c.optim.opt, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == ("momentum", 0.01, 0.9, wd)
    assert (c.sched.sched, c.sched.min_lr, c.sched.step_on_epochs) == ("cosine", 1e-6, False)
    assert c.data.name == "cityscapes" and c.data.batch_size == batch and list(c.data.crop_size) == crop
    assert list(c.data.scale_range) == [0.5, 2.0] and c.data.flip
    assert c.loss.class_weights == "cityscapes" and c.loss.ohem_thresh is None
    assert c.train.epochs == 500 and c.train.sync_bn and c.inference.mode == "whole"


def test_seg_option_groups():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        c = compose("train_seg", overrides=["experiment=cityscapes_small", "loss=ohem", "inference=ms_flip",
                                            "sched=poly"])
    assert (c.loss.ohem_thresh, c.loss.ohem_min_kept, c.loss.class_weights) == (0.9, 131072, "cityscapes")
    assert list(c.inference.scales) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and c.inference.flip
    assert (c.sched.sched, c.sched.decay_rate) == ("poly", 0.9)


# the budget benchmark's digits runs: digits_tiny's recipe, no Jacobian penalty, one change each
CHEAP = {
    "digits_plain": {},
    "digits_phantom": {"backward": "phantom"},
    "digits_skip": {"init": "skip"},
    "digits_skip_reg": {"init": "skip_reg"},
    "digits_stack": {"pretrain_steps": 1000000, "unroll_steps": 8},
}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_budget_experiments_change_one_thing_of_the_digits_recipe(name):
    base, c = _compose("digits_tiny"), _compose(name)
    assert c.recipe == name and (c.jac.weight, c.jac.freq, c.jac.pretrain_weight) == (0.0, 0.0, 0.0)
    changed = {k: v for k, v in c.deq.items() if base.deq[k] != v and k != "solver_options"}
    assert changed == CHEAP[name]
    assert (c.train.epochs, c.optim.lr, c.data.overrides.input_size) == (base.train.epochs, base.optim.lr, 16)


def test_the_continuous_deq_experiment_keeps_the_jacobian_penalty():
    base, c = _compose("digits_tiny"), _compose("digits_ode")
    assert c.recipe == "digits_ode" and c.jac == base.jac and c.jac.weight == 1.0
    assert (c.deq.solver, c.deq.f_thres, dict(c.deq.solver_options)) == (
        "ode", 16, {"method": "bosh3", "rtol": 0.05, "atol": 0.05})


@pytest.mark.parametrize("init", ["skip", "skip_reg"])
def test_imagenet_skip_experiments_are_the_jr_recipe_with_an_initial_guess(init):
    jr, c = _compose("imagenet_small_jr"), _compose(f"imagenet_small_{init}")
    assert c.deq.init == init and c.deq.init_weight == 1.0
    assert {k: v for k, v in c.deq.items() if jr.deq[k] != v} == {"init": init}
    assert c.jac == jr.jac and c.optim == jr.optim and c.model == jr.model


def test_every_experiment_file_is_covered():
    files = {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")}
    assert files == set(OFFICIAL) | set(SEG_OFFICIAL) | set(CHEAP) | {
        "digits_tiny", "digits_ode", "synthetic_seg", "imagenet_small_skip", "imagenet_small_skip_reg"}
