"""The per-forward state of a DEQ cell in one context manager.

Inside ``forward_scope(cell)`` every weight-normed weight is computed once and every variational-dropout
mask is drawn once, however many times the solver evaluates the cell; both are released on exit, so
nothing from one forward leaks into the next (or into a deep copy of the model).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .dropout import reset_dropout
from .norm import cached_weights

__all__ = ["forward_scope"]


@contextmanager
def forward_scope(cell: nn.Module) -> Iterator[None]:
    reset_dropout(cell)
    try:
        with cached_weights(cell):
            yield
    finally:
        reset_dropout(cell)
