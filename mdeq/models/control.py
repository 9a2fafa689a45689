"""Solver control of every MDEQ inside any module: timm feature wrappers, segmentation_models_pytorch models, a
user's own model holding several MDEQs.

The unit is the module that owns a ``mdeq.core.DEQ`` as a direct child: in this package the equilibrium stage
``MDEQStage`` (``fullstage`` of every MDEQ model), which holds the solver settings (``.deq``) and the last forward's
``SolverStats`` (``.stats``). Searching for the stage, not for the models around it, finds each equilibrium once
however it is wrapped (``MDEQNet`` inside timm's ``FeatureGetterNet`` inside smp's ``TimmUniversalEncoder``), and a
stage shared by two parents is found once, under its first path.

    mdeq.configure_deq(unet, solver='anderson', max_iter=3)   # every MDEQ in the Unet; validated first
    mdeq.deq_stats(unet)      # {'encoder.model.model.fullstage': SolverStats(...)}

Both key their answer by the stage's path in ``module`` (``''`` when ``module`` is the stage itself) and raise a
``ValueError`` starting "no MDEQ found in <type>" when ``module`` holds none. Nothing here knows about images.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, Optional

from torch import nn

from mdeq.core import DEQ, SolverStats

__all__ = ["find_mdeqs", "require_mdeqs", "stage_deq", "check_deq_changes", "configure_deq", "configured_deq",
           "deq_stats", "set_jac_probes"]


def stage_deq(module: nn.Module) -> Optional[DEQ]:
    """The ``mdeq.core.DEQ`` that ``module`` owns as a direct child (an equilibrium stage's solver), else None."""
    for child in module.children():
        if isinstance(child, DEQ):
            return child
    return None


def find_mdeqs(module: nn.Module) -> Dict[str, nn.Module]:
    """Every equilibrium stage in ``module`` (a module owning a ``mdeq.core.DEQ``), keyed by its path in
    ``module``, in ``named_modules`` order; empty when there is none."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return {name: m for name, m in module.named_modules() if stage_deq(m) is not None}


def require_mdeqs(module: nn.Module) -> Dict[str, nn.Module]:
    """``find_mdeqs(module)``, or a ValueError starting "no MDEQ found in <type>" when there is none."""
    stages = find_mdeqs(module)
    if not stages:
        raise ValueError(
            f"no MDEQ found in {type(module).__name__}: none of its submodules owns a mdeq.core.DEQ (an MDEQ "
            "equilibrium stage); a features_only MDEQ keeping only the stem tap (out_indices=(0,)) has none")
    return stages


def configure_deq(module: nn.Module, **options: Any) -> Dict[str, DEQ]:
    """Change the solver settings of every MDEQ in ``module``, as each model's own ``configure_deq(**options)``.

    The options are validated by the same check, with the same errors, on every stage before any is changed:
    when one stage refuses them (a bad value, or a solver needing an add-on only some stages have), none changes.
    Returns the configured ``DEQ`` of each stage, keyed by the stage's path. ValueError when there is no MDEQ.
    """
    stages = check_deq_changes(module, **options)
    return {name: stage_deq(stage).configure(**options) for name, stage in stages.items()}


@contextlib.contextmanager
def configured_deq(module: nn.Module, **options: Any) -> Iterator[Dict[str, DEQ]]:
    """``configure_deq(module, **options)`` inside the ``with`` block only (``DEQ.temporarily`` on every stage):
    each MDEQ's own settings come back exactly afterwards. Validated first, like ``configure_deq``."""
    stages = check_deq_changes(module, **options)
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(stage_deq(stage).temporarily(**options)) for name, stage in stages.items()}


def check_deq_changes(module: nn.Module, **options: Any) -> Dict[str, nn.Module]:
    """Validate ``configure_deq(module, **options)`` without changing anything: a dry run on a copy of every
    stage's ``DEQ`` (the same check, with the same errors). Returns the stages, keyed by path."""
    stages = require_mdeqs(module)
    for name, stage in stages.items():
        try:
            copy.deepcopy(stage_deq(stage)).configure(**options)
        except (TypeError, ValueError) as err:
            if len(stages) > 1 and hasattr(err, "add_note"):  # Python >= 3.11: say which one, same message
                err.add_note(f"refused by the MDEQ at {name!r} of {type(module).__name__}; no MDEQ was changed")
            raise
    return stages


def deq_stats(module: nn.Module) -> Dict[str, Optional[SolverStats]]:
    """The last forward's ``SolverStats`` of every MDEQ in ``module`` (with ``.backward`` once its backward ran),
    keyed by the stage's path; a stage not run yet maps to None. Always a dict, also for one MDEQ
    (``stats, = mdeq.deq_stats(unet).values()``). ValueError when there is no MDEQ."""
    return {name: getattr(stage, "stats", None) for name, stage in require_mdeqs(module).items()}


def set_jac_probes(module: nn.Module, probes: int) -> None:
    """Hutchinson probes of the Jacobian penalty in the training forwards of every MDEQ in ``module`` (0 = off; the
    penalty lands in each stage's ``stats.jac_loss``). ValueError when there is no MDEQ or ``probes`` is not an
    integer >= 0."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise ValueError(f"jac_probes must be an integer >= 0, got {probes!r}")
    for stage in require_mdeqs(module).values():
        stage.jac_probes = probes
