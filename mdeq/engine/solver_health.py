"""Telling the user, once, that some samples' solves diverged (non-finite input, or an exploding solve).

A diverged sample's output is its best finite iterate when its input was finite, NaN when it was not
(``mdeq.models.layers.propagate_nonfinite``); either way the numbers of that sample mean little, so the tools
count such samples (``deq/fwd/diverged``, ``val/deq_diverged``, ``deq_diverged`` in metrics.json) and warn.
"""
from __future__ import annotations

import logging
from typing import Set

__all__ = ["warn_diverged"]

_log = logging.getLogger("mdeq")
_warned: Set[str] = set()


def warn_diverged(count: int, total: int, where: str) -> bool:
    """Log a warning the first time ``where`` (e.g. "training", "validation") sees diverged samples; returns
    whether it warned."""
    if count <= 0 or where in _warned:
        return False
    _warned.add(where)
    _log.warning(
        "%s: the DEQ solve diverged for %d of %d samples (a non-finite input gives a NaN output; a finite one "
        "whose solve exploded gives its best iterate). Check the data for NaN/inf pixels, or lower the learning "
        "rate / raise the Jacobian penalty; the count is logged as deq/fwd/diverged (training) and "
        "deq_diverged (evaluation). Warned once per run.", where, count, total)
    return True
