"""Variational dropout for DEQ cells: one mask per model forward, reused at every solver iteration.

A fixed point only exists if f is the same function at every iteration, so the dropout mask must not be
resampled between evaluations. The mask is drawn on the input's device and dtype at the first evaluation
after ``reset_dropout`` and dropped again by the next reset (``forward_scope`` does both).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["VariationalDropout", "reset_dropout"]


class VariationalDropout(nn.Module):
    """Dropout with a mask shared by every call until ``reset()``; identity in eval mode or when p == 0.

    The mask has shape (B, C, 1, ..., 1): one keep/drop decision per sample and channel (for inputs of shape
    (B, C, ...)), scaled by 1 / (1 - p) so the expectation is unchanged.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.mask: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        mask = self.mask
        if mask is None or mask.device != x.device:
            mask = self.mask = _draw_mask(shape, x.device, self.p)
        elif mask.shape != shape:
            raise ValueError(
                f"VariationalDropout got an input of shape {tuple(x.shape)} but holds a mask for {tuple(mask.shape)}; "
                "one module serves one state tensor: call reset_dropout(model) (or use forward_scope) per forward"
            )
        return x * mask.to(x.dtype)  # the same mask under autocast (values are 0 or 1/(1-p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


@torch.compiler.disable
def _draw_mask(shape, device: torch.device, p: float) -> torch.Tensor:
    """Eagerly, also inside a compiled cell: the same seed gives the same masks compiled or not."""
    keep = 1.0 - p
    return torch.empty(shape, device=device, dtype=torch.float32).bernoulli_(keep).div_(keep)


def reset_dropout(module: nn.Module) -> None:
    """Drop the masks of every ``VariationalDropout`` inside ``module`` (new masks on the next call)."""
    for m in module.modules():
        if isinstance(m, VariationalDropout):
            m.reset()
