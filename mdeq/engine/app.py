"""Glue between the Hydra tools and the engine: the config groups whose defaults live in the code, resolvers,
old setting names, the rule by which a tool takes or refuses a group option, the run folder under torchrun,
logging setup, and the bodies of the training tools."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .. import models  # noqa: F401  (registers the mdeq_* models with timm)
from ..core import DEQ_OPTIONS
from .classification_trainer import ClassificationTrainer
from .deq_schedule import schedule_defaults
from .distributed import DistEnv, broadcast_object, init_distributed, shared_run_stamp, shutdown_distributed
from .legacy import check_config
from .model_config import kwargs_base
from .segmentation_trainer import SegmentationTrainer

__all__ = ["CONFIG_MODULE", "CODE_CONFIGS", "TASK_GROUPS", "register_configs", "config_task", "task_refusal",
           "check_task", "plain_config", "resolve_output_dir", "setup_logging", "command_line_overrides",
           "run_classification",
           "run_segmentation"]

CONFIG_MODULE = "mdeq.configs"  # the Hydra config package (mdeq/configs/), shipped with the package

# the group options registered in code (no YAML file) by register_configs, with the line the tools' --help shows
CODE_CONFIGS = {
    "deq/base": "every mdeq.core.DEQ option, null: the model's own settings (the base of the deq files)",
    "schedule/base": "the training schedule's defaults in the code (mdeq.engine.deq_schedule; the base of "
                     "schedule/default)",
}

# the groups whose options are for one task (a ``task`` key; none: classification); a tool refuses the others'
TASK_GROUPS = ("model", "data")


def register_configs() -> None:
    """What the Hydra tools need besides ``mdeq/configs/``: the ``deq/base`` group entry (every
    ``mdeq.core.DEQ`` option, null = the model's own setting; the values live in the core's declarations), the
    ``model_base`` config that every model file starts from (every ``MDEQConfig`` architecture field under
    ``kwargs``, null = the preset's own, so ``model.kwargs.<field>=...`` needs no ``+``; not a group option), the
    ``schedule/base`` entry (the training schedule's defaults, from ``deq_schedule``), and the
    ``${mdeq_run_stamp:}`` resolver (a timestamp shared by all ranks of a torchrun job: one run folder)."""
    if not OmegaConf.has_resolver("mdeq_run_stamp"):
        OmegaConf.register_new_resolver("mdeq_run_stamp", lambda: shared_run_stamp())
    store = ConfigStore.instance()
    store.store(group="deq", name="base", node={name: None for name in DEQ_OPTIONS})
    store.store(name="model_base", node=kwargs_base())
    store.store(group="schedule", name="base", node=schedule_defaults())


def config_task(node: Mapping[str, Any]) -> str:
    """The task a config (a tool's, or a model / data option's) is for: its ``task`` key, else classification."""
    return node.get("task") or "classification"


def task_refusal(group: str, node: Mapping[str, Any], task: str) -> Optional[str]:
    """Why a tool that trains ``task`` refuses this option of a task group (``TASK_GROUPS``); None: it takes it.
    The one rule by which the training tools take or refuse a group option (their ``--help`` lists by it)."""
    other = config_task(node)
    if other == task:
        return None
    tool = "tools/train_seg.py" if other == "segmentation" else "tools/train_cls.py or tools/finetune.py"
    return (f"{group} {node.get('name')!r} is a {other} config and this tool trains {task} models; train {other} "
            f"models with {tool} (a tool's --help lists the options it takes)")


def check_task(config: Mapping[str, Any], task: str) -> None:
    """Refuse a run config whose model or data option is for another task than the tool's."""
    for group in TASK_GROUPS:
        problem = task_refusal(group, config[group], task)
        if problem:
            raise SystemExit(problem)


def plain_config(cfg: DictConfig) -> Dict[str, Any]:
    """The resolved config as plain containers (safe to store in a ``weights_only`` checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def resolve_output_dir(cfg: Dict[str, Any], env: DistEnv) -> Path:
    """The run's output folder: the resumed run's folder when resuming, else ``output_dir``; rank 0 decides."""
    out = Path(cfg["output_dir"])
    resume = cfg.get("train", {}).get("resume")
    if resume:
        ckpt = Path(resume)
        if ckpt.parent.name == "checkpoints":
            out = ckpt.parent.parent
    return Path(broadcast_object(str(out.resolve()), env))


def setup_logging(env: DistEnv, level: int = logging.INFO) -> None:
    """INFO from the ``mdeq`` loggers on rank 0, warnings only elsewhere (Hydra has configured the handlers)."""
    logging.getLogger("mdeq").setLevel(level if env.is_main else logging.WARNING)


def command_line_overrides() -> List[str]:
    """The config overrides of the running Hydra app's command line (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def run_classification(cfg: DictConfig, require_start_weights: bool = False) -> Dict[str, Any]:
    """The body of ``train_cls`` / ``finetune``: join torchrun's group, train, return the final metrics."""
    config = plain_config(cfg)
    check_config(config)
    model, train = config["model"], config["train"]
    check_task(config, "classification")
    if str(config.get("recipe") or "").startswith("digits_") and config["data"].get("name") != "digits":
        raise SystemExit(
            f"experiment={config['recipe']} is a recipe for the bundled digits and would be applied to "
            f"data={config['data'].get('name')}; choose an experiment for your data (mdeq/configs/experiment/, e.g. "
            "experiment=imagenet_small) or ~experiment and set model=, deq=, schedule.*, optim=, train.* yourself")
    if require_start_weights and not (model.get("weights") or model.get("pretrained") or train.get("resume")):
        raise SystemExit("fine-tuning needs starting weights: model.weights=<file> (a checkpoint, safetensors or an "
                         "official MDEQ .pkl) or model.pretrained=true with model.name=<arch>.<tag>")
    env = init_distributed(train["device"])
    try:
        setup_logging(env)
        return ClassificationTrainer(config, env, resolve_output_dir(config, env),
                                     overrides=command_line_overrides()).fit()
    finally:
        shutdown_distributed()


def run_segmentation(cfg: DictConfig) -> Dict[str, Any]:
    """The body of ``train_seg``: check the config is a segmentation one, join torchrun's group, train."""
    config = plain_config(cfg)
    check_config(config)
    check_task(config, "segmentation")
    if config.get("recipe") == "synthetic_seg" and config["data"].get("name") not in ("synthetic", "synthetic_video"):
        raise SystemExit(
            "experiment=synthetic_seg (the default) is the recipe of the bundled generated data and would be applied "
            f"to data={config['data'].get('name')}; choose an experiment (mdeq/configs/experiment/, e.g. "
            "experiment=cityscapes_small) or ~experiment and set model=, deq=, schedule.*, optim=, loss=, train.* "
            "yourself")
    env = init_distributed(config["train"]["device"])
    try:
        setup_logging(env)
        return SegmentationTrainer(config, env, resolve_output_dir(config, env),
                                   overrides=command_line_overrides()).fit()
    finally:
        shutdown_distributed()
