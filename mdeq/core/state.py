"""Packing a DEQ state into one (B, D) matrix and back.

A DEQ state is either one tensor of shape (B, ...) or a list of tensors that share the batch size
(one per resolution in MDEQ). Solvers work on the flattened (B, D) matrix so that every norm,
mixing step and stopping test is a plain per-row operation.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

State = Union[torch.Tensor, List[torch.Tensor]]

__all__ = ["State", "StatePacker", "state_tensors", "state_like", "is_channels_last"]


class StatePacker:
    """Remembers the structure of a state so it can be packed to (B, D) and unpacked again.

    ``pack`` is a view for a single tensor and one ``torch.cat`` for a list; ``unpack`` returns views.
    A 4-d tensor stored channels-last (``torch.channels_last``, what ``model.to(memory_format=...)`` gives) is
    packed in its memory order (B, H, W, C), so packing it copies nothing and ``unpack`` hands back a
    channels-last view: the order of the D entries is the packer's business, every solver treats a row as a
    plain vector.
    """

    def __init__(self, state: State):
        if isinstance(state, torch.Tensor):
            tensors: Sequence[torch.Tensor] = [state]
            self.is_list = False
        elif isinstance(state, (list, tuple)) and len(state) > 0 and all(isinstance(t, torch.Tensor) for t in state):
            tensors = list(state)
            self.is_list = True
        else:
            raise TypeError(
                "a DEQ state must be a tensor of shape (B, ...) or a non-empty list of such tensors, "
                f"got {type(state).__name__}"
            )
        for i, t in enumerate(tensors):
            if t.dim() < 1:
                raise ValueError(f"state tensor {i} is a scalar; expected shape (B, ...) with a batch dimension")
            if not t.is_floating_point():
                raise TypeError(f"state tensor {i} has dtype {t.dtype}; a DEQ state must be floating point")
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            raise ValueError(
                "all tensors of a list state must share dtype and device, got "
                f"{[(str(t.dtype), str(t.device)) for t in tensors]}"
            )
        batch_sizes = {t.shape[0] for t in tensors}
        if len(batch_sizes) != 1:
            raise ValueError(
                f"all tensors of a list state must share the batch size, got {[t.shape[0] for t in tensors]}"
            )
        self.batch_size = tensors[0].shape[0]
        self.shapes = [tuple(t.shape[1:]) for t in tensors]
        self.nhwc = [is_channels_last(t) for t in tensors]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.dim = sum(self.sizes)

    def pack(self, state: State) -> torch.Tensor:
        """(B, ...) tensor or list of tensors -> (B, D) matrix."""
        b = self.batch_size
        if not self.is_list:
            if not isinstance(state, torch.Tensor):
                raise TypeError(f"expected a tensor state like the initial one, got {type(state).__name__}")
            self._check_shape(0, state)
            return _flat(state, b, self.dim, self.nhwc[0])
        if not isinstance(state, (list, tuple)) or len(state) != len(self.shapes):
            raise TypeError(
                f"expected a list of {len(self.shapes)} tensors like the initial state, got "
                f"{type(state).__name__}{'' if not isinstance(state, (list, tuple)) else f' of {len(state)}'}"
            )
        for i, t in enumerate(state):
            self._check_shape(i, t)
        return torch.cat([_flat(t, b, n, nhwc) for t, n, nhwc in zip(state, self.sizes, self.nhwc)], dim=1)

    def unpack(self, flat: torch.Tensor) -> State:
        """(B, D) matrix -> the original structure (views of ``flat``)."""
        b = flat.shape[0]
        if not self.is_list:
            return _unflat(flat, b, self.shapes[0], self.nhwc[0])
        return [_unflat(chunk, b, shape, nhwc)
                for chunk, shape, nhwc in zip(flat.split(self.sizes, dim=1), self.shapes, self.nhwc)]

    def _check_shape(self, i: int, t: torch.Tensor) -> None:
        if tuple(t.shape[1:]) != self.shapes[i] or t.shape[0] != self.batch_size:
            raise ValueError(
                f"f returned a state tensor {i} of shape {tuple(t.shape)}; expected "
                f"{(self.batch_size, *self.shapes[i])}, the shape of the initial state"
            )


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether each sample of the 4-d ``t`` is stored channels-last (H, W, C), and not also plainly contiguous as
    size-1 dims allow; the batch stride does not matter (an unpacked state is a view into the (B, D) matrix)."""
    if t.dim() != 4 or t.shape[0] == 0:
        return False
    one = t[:1]
    return not one.is_contiguous() and one.is_contiguous(memory_format=torch.channels_last)


def _flat(t: torch.Tensor, b: int, n: int, nhwc: bool) -> torch.Tensor:
    """(B, ...) -> (B, n); n is explicit so an empty batch (B = 0) packs too."""
    return (t.permute(0, 2, 3, 1) if nhwc else t).reshape(b, n)


def _unflat(chunk: torch.Tensor, b: int, shape, nhwc: bool) -> torch.Tensor:
    if nhwc:
        c, h, w = shape
        return chunk.view(b, h, w, c).permute(0, 3, 1, 2)
    return chunk.view(b, *shape)


def state_tensors(state: State) -> List[torch.Tensor]:
    """The tensors of a state: [state] for a single tensor, the list itself otherwise."""
    return [state] if isinstance(state, torch.Tensor) else list(state)


def state_like(state: State, tensors: List[torch.Tensor]) -> State:
    """``tensors`` in the structure of ``state`` (the inverse of ``state_tensors``)."""
    return tensors[0] if isinstance(state, torch.Tensor) else tensors
