"""Glue between the Hydra tools and the engine: the config groups whose defaults live in the code, resolvers,
old setting names, the run folder under torchrun, logging setup, and the bodies of the training tools."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .. import models  # noqa: F401  (registers the mdeq_* models with timm)
from ..core import DEQ_OPTIONS
from .classification_trainer import ClassificationTrainer
from .deq_schedule import schedule_defaults
from .distributed import DistEnv, broadcast_object, init_distributed, shared_run_stamp, shutdown_distributed
from .legacy import check_config
from .segmentation_trainer import SegmentationTrainer

__all__ = ["CONFIG_MODULE", "register_configs", "plain_config", "resolve_output_dir", "setup_logging",
           "run_classification", "run_segmentation"]

CONFIG_MODULE = "mdeq.configs"  # the Hydra config package (mdeq/configs/), shipped with the package


def register_configs() -> None:
    """What the Hydra tools need besides ``mdeq/configs/``: the ``deq/base`` group entry (every
    ``mdeq.core.DEQ`` option, null = the model's own setting; the values live in the core's declarations), the
    ``schedule/base`` entry (the training schedule's defaults, from ``deq_schedule``), and the
    ``${mdeq_run_stamp:}`` resolver (a timestamp shared by all ranks of a torchrun job: one run folder)."""
    if not OmegaConf.has_resolver("mdeq_run_stamp"):
        OmegaConf.register_new_resolver("mdeq_run_stamp", lambda: shared_run_stamp())
    store = ConfigStore.instance()
    store.store(group="deq", name="base", node={name: None for name in DEQ_OPTIONS})
    store.store(group="schedule", name="base", node=schedule_defaults())


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


def run_classification(cfg: DictConfig, require_start_weights: bool = False) -> Dict[str, Any]:
    """The body of ``train_cls`` / ``finetune``: join torchrun's group, train, return the final metrics."""
    config = plain_config(cfg)
    check_config(config)
    model, train = config["model"], config["train"]
    for group in ("model", "data"):
        if config[group].get("task") == "segmentation":
            raise SystemExit(f"{group}={config[group].get('name')} is a segmentation config; train segmentation "
                             f"models with tools/train_seg.py")
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
        return ClassificationTrainer(config, env, resolve_output_dir(config, env)).fit()
    finally:
        shutdown_distributed()


def run_segmentation(cfg: DictConfig) -> Dict[str, Any]:
    """The body of ``train_seg``: check the config is a segmentation one, join torchrun's group, train."""
    config = plain_config(cfg)
    check_config(config)
    for group in ("model", "data"):
        if config[group].get("task") != "segmentation":
            raise SystemExit(
                f"{group}={config[group].get('name')} is a classification config; train_seg needs segmentation "
                f"configs: model=seg_mdeq_small|seg_mdeq_large|seg_mdeq_xl, data=cityscapes|seg_folder|synthetic_seg")
    if config.get("recipe") == "synthetic_seg" and config["data"].get("name") != "synthetic":
        raise SystemExit(
            "experiment=synthetic_seg (the default) is the recipe of the bundled generated data and would be applied "
            f"to data={config['data'].get('name')}; choose an experiment (mdeq/configs/experiment/, e.g. "
            "experiment=cityscapes_small) or ~experiment and set model=, deq=, schedule.*, optim=, loss=, train.* "
            "yourself")
    env = init_distributed(config["train"]["device"])
    try:
        setup_logging(env)
        return SegmentationTrainer(config, env, resolve_output_dir(config, env)).fit()
    finally:
        shutdown_distributed()
