"""Weight normalisation for DEQ cells on top of ``torch.nn.utils.parametrizations.weight_norm``.

W = g * v / ||v|| (norm over every dimension but the output one), the formula and initialisation (g = ||v||)
of the original MDEQ. A solver evaluates the cell dozens of times per forward, so the normalised weight
must be computed once per model forward, not once per evaluation: wrap the forward in ``cached_weights()``
(torch's parametrization cache). The cached weight keeps its graph, so g and v still receive gradients.

Built on torch parametrizations (not a hand-made attribute), so a weight-normed model can be deep-copied
(``timm.utils.ModelEmaV3``), moved with ``.to()`` and wrapped in DDP like any other.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["apply_weight_norm", "remove_weight_norm", "cached_weights", "has_weight_norm"]

_DEFAULT_TYPES: Tuple[Type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_weight_norm(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


def apply_weight_norm(
    module: nn.Module,
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    types: Tuple[Type[nn.Module], ...] = _DEFAULT_TYPES,
) -> List[str]:
    """Weight-normalise (dim 0) every submodule of ``types`` for which ``filter_fn(name, module)`` holds.

    ``module`` itself is included (with name ""). Returns the names of the modules changed.
    """
    changed = []
    for name, sub in list(module.named_modules()):
        if not isinstance(sub, types) or has_weight_norm(sub):
            continue
        if filter_fn is not None and not filter_fn(name, sub):
            continue
        weight_norm(sub, name="weight", dim=0)
        changed.append(name)
    return changed


def remove_weight_norm(module: nn.Module) -> List[str]:
    """Fold the weight norm of every submodule back into a plain ``weight`` parameter.

    Safe on a deep copy (an EMA copy, an export): torch keeps a parametrized weight as a property of a class made
    for the module, which a deep copy shares, and removing the parametrization deletes that property from the
    class; each module first gets a class of its own, so the original keeps its weight.
    """
    changed = []
    for name, sub in list(module.named_modules()):
        if has_weight_norm(sub):
            cls = type(sub)
            sub.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
            changed.append(name)
    return changed


@contextmanager
def cached_weights(module: Optional[nn.Module] = None) -> Iterator[None]:
    """Compute every parametrized weight once inside this block and reuse it (with its graph).

    torch caches a weight at its first use, so when that use is inside a ``no_grad`` solve the cached weight
    would carry no graph and g, v would get no gradient. Passing ``module`` computes all of its parametrized
    weights on entry, in the caller's grad mode, which is what a DEQ needs.
    """
    with parametrize.cached():
        if module is not None:
            for sub in module.modules():
                if parametrize.is_parametrized(sub):
                    for name in sub.parametrizations:
                        getattr(sub, name)
        yield
