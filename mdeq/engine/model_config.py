"""The ``model`` config group's architecture keywords (``model.kwargs``): which are set, which an MDEQ takes, and
what the run's DEQ settings need built.

For an MDEQ (``model.name=mdeq_*``) the keywords are ``MDEQConfig`` fields; ``model_base``, the config every model
file starts from (registered by the tools), lists every one of them as null (the preset's own), so
``model.kwargs.skip_init=true`` needs no Hydra ``+`` (the ``+`` that it needed before is dropped, so old command
lines still work: ``without_needless_plus``). A null keyword is not passed. Any other timm model takes its own
keywords (``+model.kwargs.drop_path_rate=0.1``). A run whose DEQ settings start from the Skip DEQ predictor
(``deq=fast``: ``deq.init=skip``) gets the predictor built unless ``model.kwargs.skip_init`` says otherwise.
"""
from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence

from ..models.config import CLS_PRESETS, SEG_PRESETS, config_field_names

__all__ = ["MDEQ_KWARGS", "kwargs_base", "set_kwargs", "architecture_of", "is_mdeq_name", "check_mdeq_kwargs",
           "architecture_kwargs", "check_kwargs_overrides", "without_needless_plus"]

_log = logging.getLogger("mdeq.train")

# the MDEQConfig fields a model config may set (``deq`` is not one: the run-time settings are the deq group's)
MDEQ_KWARGS = tuple(sorted(config_field_names() - {"deq"}))


def kwargs_base() -> Dict[str, Any]:
    """The ``model_base`` config: every MDEQ architecture keyword, null (the preset's own)."""
    return {"kwargs": {name: None for name in MDEQ_KWARGS}}


def set_kwargs(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The keywords of a ``model`` config that are set (not null)."""
    return {k: v for k, v in dict(model_cfg.get("kwargs") or {}).items() if v is not None}


def architecture_of(name: str) -> str:
    """The timm architecture a model name builds: the name itself (``arch`` or ``arch.tag``), or for a
    ``local-dir:<folder>`` / ``hf-hub:<repo>`` name the ``architecture`` of its ``config.json`` (the name itself when
    that cannot be read: a Hub repo that is not cached offline)."""
    name = str(name)
    try:
        if name.startswith("local-dir:"):
            config = json.loads((Path(name[len("local-dir:"):]) / "config.json").read_text())
            return str(config.get("architecture") or name)
        if name.startswith("hf-hub:"):
            from timm.models import load_model_config_from_hf

            pretrained_cfg, arch, _ = load_model_config_from_hf(name[len("hf-hub:"):])
            return str(arch or pretrained_cfg.get("architecture") or name)
    except Exception:  # unreadable: timm.create_model will say what is wrong with the name
        return name
    return name


def is_mdeq_name(name: str) -> bool:
    """Whether ``name`` (``arch``, ``arch.tag``, or a ``local-dir:`` / ``hf-hub:`` name of one) builds one of this
    package's MDEQ presets."""
    return architecture_of(name).split(".", 1)[0] in set(CLS_PRESETS) | set(SEG_PRESETS)


def _unknown_message(keys: Iterable[str], name: str) -> str:
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, MDEQ_KWARGS, n=1)
        hints.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    return (f"model.kwargs {', '.join(hints)}: not an MDEQConfig field, so {name} does not take it; the MDEQ "
            f"architecture fields are {', '.join(MDEQ_KWARGS)} (solver settings are the deq group's: deq.max_iter, "
            "deq.solver, ...)")


def check_mdeq_kwargs(kwargs: Mapping[str, Any], name: str) -> None:
    """A ValueError naming the keywords of ``kwargs`` that are not ``MDEQConfig`` fields."""
    unknown = sorted(set(kwargs) - set(MDEQ_KWARGS))
    if unknown:
        raise ValueError(_unknown_message(unknown, name))


def architecture_kwargs(model_cfg: Mapping[str, Any], deq_cfg: Mapping[str, Any], given: Sequence[str] = ()
                        ) -> Dict[str, Any]:
    """The keywords to build the run's model with.

    For an MDEQ preset: the set ones, checked, plus ``skip_init=True`` when the run's DEQ settings start from the
    Skip DEQ predictor (``deq.init=skip``) and the config does not say. For any other model: its own keywords; the
    MDEQ fields among the config's defaults (the own-data ``dropout``) are not passed, unless the command line
    (``given``: its overrides) sets them.
    """
    name = model_cfg["name"]
    kwargs = set_kwargs(model_cfg)
    if not is_mdeq_name(name):
        named = _kwargs_given(given)
        return {k: v for k, v in kwargs.items() if k not in MDEQ_KWARGS or k in named or "*" in named}
    check_mdeq_kwargs(kwargs, name)
    if (deq_cfg or {}).get("init") == "skip" and "skip_init" not in kwargs:
        kwargs["skip_init"] = True
        _log.info("deq.init=skip starts each solve from the Skip DEQ predictor: building it "
                  "(model.kwargs.skip_init=true)")
    return kwargs


def _kwargs_given(overrides: Sequence[str]) -> set:
    """The ``model.kwargs`` keys a command line sets (``*``: the whole dict, ``model.kwargs={...}``)."""
    keys = set()
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key == "model.kwargs":
            keys.add("*")
        elif key.startswith("model.kwargs."):
            keys.add(key.split(".")[2])
    return keys


def check_kwargs_overrides(overrides: Iterable[str]) -> List[str]:
    """Messages for command-line overrides ``model.kwargs.<key>=...`` without Hydra's ``+`` whose key is no MDEQ
    field (Hydra would answer "Key '<key>' is not in struct"); ``+model.kwargs.<key>`` passes (another timm model's
    own keyword)."""
    problems = []
    for o in overrides:
        if o.startswith(("+", "~")):
            continue
        key = o.split("=", 1)[0]
        if key.startswith("model.kwargs.") and key.count(".") == 2 and key.split(".")[2] not in MDEQ_KWARGS:
            field = key.split(".")[2]
            problems.append(_unknown_message([field], "an MDEQ") + f"; a keyword of another timm model (model.name="
                            f"resnet18, ...) is added with Hydra's +: +model.kwargs.{field}=...")
    return problems


def without_needless_plus(overrides: Sequence[str]) -> List[str]:
    """The command line with Hydra's ``+`` dropped from ``+model.kwargs.<MDEQ field>=...`` (the spelling these keys
    needed before ``model_base`` listed them; Hydra now refuses to add a key that is there)."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith("+model.kwargs.") and not key.startswith("++") and key.count(".") == 2 and \
                key.split(".")[2] in MDEQ_KWARGS:
            o = o[1:]
        out.append(o)
    return out
