"""One vocabulary for the DEQ settings: the Hydra groups hold the core's names (their defaults come from the
code), old names fail with a message naming the new one, and a run's settings reach the model whole."""
import pytest
import timm
from hydra import compose, initialize_config_module

import mdeq  # noqa: F401
from mdeq.core import DEQ_OPTIONS
from mdeq.engine.app import CONFIG_MODULE, plain_config, register_configs
from mdeq.engine.deq_schedule import DEQSchedule, build_schedule, resolve_pretrain, schedule_defaults
from mdeq.engine.legacy import RENAMED, check_config, check_overrides

from ..tools.conftest import run_tool


def _compose(*overrides, app="train_cls"):
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return plain_config(compose(app, overrides=["output_dir=/tmp/unused", *overrides]))


def test_the_deq_group_is_the_cores_options_and_null_leaves_the_models_setting():
    cfg = _compose("~experiment", "model=mdeq_small")
    assert set(cfg["deq"]) == set(DEQ_OPTIONS)
    assert {k: v for k, v in cfg["deq"].items() if v is not None} == dict(  # deq/default: the fast budgets
        solver="anderson", max_iter=8, b_max_iter=8, tol=1e-3, stop_mode="rel", backward="ift", b_solver="anderson")
    model = timm.create_model("mdeq_small", num_classes=10)
    cfg = resolve_pretrain(cfg, 100)  # ~experiment: unrolled for the first 15% of the run's steps
    assert cfg["schedule"]["pretrain_steps"] == 15
    schedule = build_schedule(cfg, model)
    o = model.deq.options
    assert (o["solver"], o["max_iter"], o["b_max_iter"], o["solver_options"]) == ("anderson", 8, 8, {})
    assert o["phantom_steps"] == DEQ_OPTIONS["phantom_steps"].default  # null: the model's own (the default)
    assert schedule.deq["solver"] == "anderson" and schedule.unroll_steps == model.cfg.num_layers
    schedule.apply(model, schedule.plan(14, 0))
    assert model.deq.options["solver"] == "unroll"
    schedule.apply(model, schedule.plan(15, 0))
    assert model.deq.options["max_iter"] == 8 and model.deq.options["solver"] == "anderson"
    # an explicit pretrain_steps wins over the fraction
    assert resolve_pretrain({**cfg, "schedule": {**cfg["schedule"], "pretrain_steps": 7}}, 100)["schedule"][
        "pretrain_steps"] == 7


def test_the_schedule_group_is_the_schedules_own_names_with_the_codes_defaults():
    cfg = _compose("~experiment", "data=imagefolder", "data.root=/tmp/x", "schedule=base")
    defaults = schedule_defaults()
    assert cfg["schedule"] == defaults
    assert DEQSchedule(deq={"max_iter": 1}).pretrain_steps == defaults["pretrain_steps"] == 0
    assert cfg["schedule"]["jac"]["probes"] == 2
    cfg = _compose("experiment=imagenet_small_jr", "data.root=/tmp/x", "schedule.max_iter_jitter=3",
                   "schedule.jac.freq=0.5")
    assert cfg["schedule"]["max_iter_jitter"] == 3 and cfg["schedule"]["jac"]["freq"] == 0.5


@pytest.mark.parametrize("old, new", [("deq.f_thres=8", "deq.max_iter"), ("deq.b_thres=8", "deq.b_max_iter"),
                                      ("+deq.pretrain_steps=3", "schedule.pretrain_steps"),
                                      ("deq.eval_f_thres=4", "schedule.eval_max_iter"),
                                      ("deq.rand_f_thres_delta=2", "schedule.max_iter_jitter"),
                                      ("jac.weight=1.0", "schedule.jac.weight"), ("jac=disabled", "schedule.jac"),
                                      ("~jac", "schedule.jac")])
def test_old_names_on_the_command_line_name_the_new_one(old, new):
    with pytest.raises(SystemExit, match=f"is now {new}"):
        check_overrides([old])
    check_overrides(["deq.max_iter=8", "schedule.jac.weight=1.0", "hydra.run.dir=/tmp/x"])  # the new names pass


def test_old_names_in_a_config_file_name_the_new_one():
    with pytest.raises(SystemExit, match="deq.f_thres is now deq.max_iter"):
        check_config(_compose("+deq.f_thres=3"))
    with pytest.raises(SystemExit, match="jac is now schedule.jac"):
        check_config({**_compose(), "jac": {"weight": 1.0}})
    check_config(_compose("deq.init=skip"))  # no longer old: a run starting from the predictor builds it
    check_config(_compose("experiment=digits_skip"))
    assert set(RENAMED.values()) <= {"deq.max_iter", "deq.b_max_iter", "schedule.pretrain_steps",
                                     "schedule.unroll_steps", "schedule.eval_max_iter", "schedule.max_iter_jitter",
                                     "schedule.jac"}


def test_the_tools_refuse_old_names_with_the_new_one(tmp_path):
    proc = run_tool("train_cls.py", ["deq.f_thres=8", "jac.weight=1.0"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "deq.f_thres is now deq.max_iter" in proc.stderr and "jac.weight is now schedule.jac.weight" in proc.stderr
    proc = run_tool("eval_cls.py", ["mdeq_tiny", "--f-thres", "3"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--f-thres is now --max-iter" in proc.stderr
