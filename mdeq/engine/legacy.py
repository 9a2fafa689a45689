"""Old setting names and checkpoint formats: what each became, and the upgrade of files written before.

Until version 0.1.0 (checkpoint format 1) the solver budget had other names (``deq.f_thres``, ``deq.b_thres``,
``eval_f_thres``, ``--f-thres``), the training schedule lived in the ``deq`` and ``jac`` groups, and the Skip
DEQ predictor was built from a run-time setting (``deq.init=skip``; a training run starting from it still builds
it: ``model_config.architecture_kwargs``). ``RENAMED`` maps every old config key to
its new one; ``check_overrides`` and ``check_config`` turn an old name on the command line or in a config file
into an error that names the new one; ``upgrade_checkpoint`` rewrites a format-1 checkpoint in memory, so old
checkpoints load, resume and evaluate as before.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Mapping

__all__ = ["RENAMED", "CHECKPOINT_VERSION", "check_overrides", "check_config", "upgrade_checkpoint",
           "upgrade_config", "upgrade_model_kwargs"]

CHECKPOINT_VERSION = 2

# old config key -> new key (a group of keys: every key below it)
RENAMED: Dict[str, str] = {
    "deq.f_thres": "deq.max_iter",
    "deq.b_thres": "deq.b_max_iter",
    "deq.pretrain_steps": "schedule.pretrain_steps",
    "deq.unroll_steps": "schedule.unroll_steps",
    "deq.eval_f_thres": "schedule.eval_max_iter",
    "deq.rand_f_thres_delta": "schedule.max_iter_jitter",
    "jac": "schedule.jac",
}


def _new_name(key: str) -> str:
    """The new name of an old key ('' if it was not renamed)."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return ""


def check_overrides(overrides: Iterable[str]) -> None:
    """Refuse command-line overrides that use an old name (``deq.f_thres=8``, ``jac.weight=1``, ``jac=disabled``,
    ``+deq.b_thres=3``, ``~jac``), naming the new one, before Hydra's generic "not in struct" error."""
    problems: List[str] = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra."):
            continue
        new = _new_name(key)
        if new:
            problems.append(f"{key} is now {new}")
    if problems:
        raise SystemExit("old setting name(s): " + "; ".join(problems) + " (mdeq/configs/ holds the groups and "
                         "their settings)")


def _flat_keys(cfg: Mapping[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, Mapping):
            out += _flat_keys(v, key + ".")
    return out


def check_config(cfg: Mapping[str, Any]) -> None:
    """Refuse a composed run config that still uses an old name (a user's experiment file, say), naming the new
    one: such a key would otherwise be carried along and silently ignored."""
    problems = [f"{k} is now {_new_name(k)}" for k in _flat_keys(cfg)
                if _new_name(k) and not any(_new_name(p) for p in _parents(k))]
    if problems:
        raise SystemExit("the config uses old setting names: " + "; ".join(problems))


def _parents(key: str) -> List[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def upgrade_model_kwargs(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Model kwargs of format 1: ``deq.init='skip'`` (the Skip DEQ predictor) -> ``skip_init=True``."""
    kwargs = copy.deepcopy(dict(kwargs or {}))
    deq = dict(kwargs.get("deq") or {})
    if deq.get("init") == "skip":
        kwargs["skip_init"] = True
        deq.pop("init")
    if "deq" in kwargs:
        if deq:
            kwargs["deq"] = deq
        else:
            kwargs.pop("deq")
    return kwargs


def upgrade_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A run config of format 1 in the new vocabulary (old keys moved to their new homes, ``deq.init=skip`` ->
    ``model.kwargs.skip_init``). A config that is already new comes back unchanged."""
    cfg = copy.deepcopy(dict(cfg))
    deq = dict(cfg.get("deq") or {})
    schedule = dict(cfg.get("schedule") or {})
    if "jac" in cfg:
        schedule["jac"] = dict(cfg.pop("jac") or {})
    for old, new in RENAMED.items():
        group, _, key = old.partition(".")
        if group != "deq" or key not in deq:
            continue
        value = deq.pop(key)
        new_group, _, new_key = new.partition(".")
        (deq if new_group == "deq" else schedule)[new_key] = value
    model = dict(cfg.get("model") or {})
    kwargs = upgrade_model_kwargs(model.get("kwargs") or {})
    if deq.get("init") == "skip":
        kwargs["skip_init"] = True
    if kwargs or "kwargs" in model:
        model["kwargs"] = kwargs
    if model:
        cfg["model"] = model
    if "deq" in cfg or deq:
        cfg["deq"] = deq
    if "schedule" in cfg or schedule:
        cfg["schedule"] = schedule
    return cfg


def upgrade_checkpoint(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """A training checkpoint in the current format (format 1 is rewritten; the file is not touched)."""
    ckpt = dict(ckpt)
    if int(ckpt.get("version", 1)) >= CHECKPOINT_VERSION or "identity" not in ckpt:
        return ckpt
    if isinstance(ckpt.get("config"), Mapping):
        ckpt["config"] = upgrade_config(ckpt["config"])
    identity = dict(ckpt["identity"])
    kwargs = upgrade_model_kwargs(identity.get("model_kwargs") or {})
    if (ckpt.get("config") or {}).get("model", {}).get("kwargs", {}).get("skip_init"):
        kwargs["skip_init"] = True  # written before the identity recorded deq.init
    identity["model_kwargs"] = kwargs
    ckpt["identity"] = identity
    progress = dict(ckpt.get("progress") or {})
    if "best_top1" in progress:  # written before the segmentation tasks existed
        progress["best_score"] = progress.pop("best_top1")
    ckpt["progress"] = progress
    ckpt["version"] = CHECKPOINT_VERSION
    return ckpt
