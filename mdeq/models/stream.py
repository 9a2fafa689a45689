"""Streaming MDEQ: carry each video stream's equilibrium from one frame to the next (StreamDEQ).

Consecutive frames of a video have nearby fixed points, so a solve that starts from the previous frame's z*
needs a fraction of the f-evaluations of one from zeros (Ertenli, Akbas, Cinbis: "Streaming Multiscale Deep
Equilibrium Models", ECCV 2022: MDEQ segmentation at on-par mIoU with >3x less time per frame).

    run = mdeq.stream(model.eval(), max_iter=2)     # any module holding MDEQs; per-frame solver settings
    for frames in video:                            # (B, 3, H, W): frame t of B streams
        out = run(frames)                           # what model(frames) returns
        run.reset(cut_mask)                         # a scene cut / a new video in some slots: start those over
    run.stats                                       # {stage path: SolverStats} of the last frame

How: forward hooks on every equilibrium stage of the model (``find_mdeqs``), attached only while a frame runs,
hand the stage each stream's previous equilibrium as its start ``z0`` with ``warm`` set for the streams that have
one; a stream's first frame (and the first after ``reset``) starts as the model does (zeros, or the Skip DEQ
prediction: ``DEQ``'s ``warm`` mask), and the stage's output becomes that stream's state. The per-frame settings
(``deq_options``, validated once when the stream is made) apply during the frame only (``DEQ.temporarily``), so the
model's own settings stay. Frames run under ``no_grad`` in eval mode: no autograd graph is kept from frame to frame.

Faults: a frame that is not finite (or whose equilibrium is not) gives that stream a NaN output (as the model
does) and restarts its state, so the next frame starts clean; a batch with another number of streams or another
frame size than the state is an error that names ``reset``; a model in train mode is refused. Streams never share
state: each sample of the batch is one stream, and the solvers stop per sample.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mdeq.core import SolverStats

from .control import check_deq_changes, stage_deq

__all__ = ["MDEQStream", "stream"]

Mask = Union[torch.Tensor, Sequence[bool], Sequence[int]]


def stream(model: nn.Module, **deq_options: Any) -> "MDEQStream":
    """A callable running ``model`` on video frames, each stream's solve starting from its previous equilibrium.

    ``model``: any module holding MDEQs (a classifier, a ``features_only`` extractor, a segmentation model, an
    smp model with an MDEQ encoder), in eval mode. ``deq_options``: ``configure_deq`` settings for every frame
    (e.g. ``max_iter=2``), validated now; the model's own settings are left as they are. See ``MDEQStream``.
    """
    return MDEQStream(model, **deq_options)


class MDEQStream:
    """The state of B video streams through one model; call it with one frame per stream, (B, C, H, W).

    Attributes (read-only):
        stats: ``{stage path: SolverStats}`` of the last frame (per-stream ``nstep``, residuals; ``nfe``).
        frame_index: (B,) long, the frames each stream has run since it started (0: the last frame was its first).
        state: ``{stage path: [branch tensors (B, ...)]}``, each stream's equilibrium after the last frame.
        fresh: (B,) bool, the streams whose next frame starts over (after ``reset`` or a non-finite frame).
    """

    def __init__(self, model: nn.Module, **deq_options: Any):
        self.model = model
        self.stages = check_deq_changes(model, **deq_options)  # validated now: no error on the first frame
        self.deq_options = dict(deq_options)
        self.stats: Dict[str, SolverStats] = {}
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self, mask: Optional[Mask] = None) -> None:
        """Start streams over: all of them (``mask=None``; the next batch may have any number of streams and any
        frame size) or those that ``mask`` selects (a (B,) bool mask or stream indices: a scene cut, a new video
        in that slot); their next frame starts as the model does (zeros or the Skip DEQ prediction)."""
        if mask is None:
            self._state: Dict[str, List[torch.Tensor]] = {}
            self._fresh: Optional[torch.Tensor] = None
            self._frames: Optional[torch.Tensor] = None
            self._shape: Optional[Tuple[int, ...]] = None
            return
        selected = self._as_mask(mask, None if self._shape is None else self._shape[0])
        if selected is not None:  # (before the first frame every stream starts fresh anyway)
            self._fresh = self._fresh | selected

    @staticmethod
    def _as_mask(mask: Mask, n: Optional[int]) -> Optional[torch.Tensor]:
        """``mask`` as a (n,) bool tensor on the CPU (None when ``n`` is not known yet: checked as far as it can)."""
        m = torch.as_tensor(mask)
        if m.numel() == 0:
            m = m.long()  # reset([]): no stream
        if m.dim() > 1 or m.dtype.is_floating_point or m.dtype.is_complex:
            raise ValueError(f"reset(mask) takes a (B,) bool mask or stream indices, got {m.dtype} of shape "
                             f"{tuple(m.shape)}")
        m = m.reshape(-1).cpu()
        if n is None:
            return None
        if m.dtype == torch.bool:
            if m.numel() != n:
                raise ValueError(f"reset(mask): a bool mask needs one flag per stream, shape ({n},), got "
                                 f"{tuple(m.shape)}")
            return m
        idx = m.long()
        if idx.numel() and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"reset(mask): stream indices must be in [0, {n}), got {idx.tolist()}")
        out = torch.zeros(n, dtype=torch.bool)
        out[idx] = True
        return out

    @property
    def state(self) -> Dict[str, List[torch.Tensor]]:
        """A copy: changing it does not change the streams."""
        return {name: [t.clone() for t in s] for name, s in self._state.items()}

    @property
    def fresh(self) -> Optional[torch.Tensor]:
        return None if self._fresh is None else self._fresh.clone()

    @property
    def frame_index(self) -> Optional[torch.Tensor]:
        return None if self._frames is None else self._frames.clone()

    # ------------------------------------------------------------------ frames
    def __call__(self, frames: torch.Tensor) -> Any:
        """Run one frame of every stream; returns what ``model(frames)`` returns."""
        self._check_frames(frames)
        n = frames.shape[0]
        fresh = torch.ones(n, dtype=torch.bool) if self._fresh is None else self._fresh
        calls: Dict[str, int] = {}
        new_state: Dict[str, List[torch.Tensor]] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            for name, stage in self.stages.items():
                stack.enter_context(stage_deq(stage).temporarily(**self.deq_options))
                stack.enter_context(_hooked(stage, self._start_hook(name, fresh, calls),
                                            self._end_hook(name, new_state)))
            out = self.model(frames)
        if set(new_state) != set(self.stages):
            missing = sorted(set(self.stages) - set(new_state))
            raise RuntimeError(f"the model's forward did not run its MDEQ stage(s) {missing}: a stream needs every "
                               "equilibrium of the model to run once per frame")
        bad = ~torch.isfinite(frames.detach()).flatten(1).all(dim=1).cpu()
        for states in new_state.values():
            for t in states:
                bad |= ~torch.isfinite(t).flatten(1).all(dim=1).cpu()
        self._state = new_state
        self._shape = tuple(frames.shape)
        self._frames = torch.zeros(n, dtype=torch.long) if self._frames is None else \
            torch.where(fresh, torch.zeros_like(self._frames), self._frames + 1)
        self._fresh = bad
        self.stats = {name: stage.stats for name, stage in self.stages.items()}
        return out

    def _check_frames(self, frames: Any) -> None:
        if any(m.training for m in self.model.modules()):
            raise RuntimeError("a stream runs in eval mode (it keeps no autograd graph and BatchNorm must use its "
                               "running statistics): call model.eval() first; train on single frames instead")
        if not isinstance(frames, torch.Tensor) or frames.dim() < 2:
            raise ValueError(f"a stream takes a frame batch (B, C, H, W), one frame per stream, got "
                             f"{tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
        if self._shape is None:
            return
        if frames.shape[0] != self._shape[0]:
            raise ValueError(f"this MDEQStream holds {self._shape[0]} streams but got {frames.shape[0]} frames: one "
                             f"frame per stream; call reset() (all streams) before changing the number of streams")
        if tuple(frames.shape[1:]) != self._shape[1:]:
            raise ValueError(f"frames of shape {tuple(frames.shape[1:])}, but the streams' state belongs to frames "
                             f"of {self._shape[1:]}: the equilibrium depends on the frame size; call reset() to start "
                             f"every stream over at the new size")

    def _start_hook(self, name: str, fresh: torch.Tensor, calls: Dict[str, int]):
        """The stage's start: the previous equilibrium for warm streams, the model's own start for fresh ones."""

        def hook(stage: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                raise RuntimeError(f"the MDEQ stage {name!r} ran twice in one frame (test-time augmentation, several "
                                   "scales?): a stream keeps one equilibrium per stage and stream; run one pass")
            injection = args[0] if args else kwargs["injection"]
            zeros = stage.initial_state(injection)
            prev = self._state.get(name)
            if prev is None:
                return (injection,), {"z0": None, "warm": None}
            if [tuple(t.shape) for t in prev] != [tuple(t.shape) for t in zeros]:
                raise ValueError(f"the MDEQ stage {name!r} got an input whose state has shapes "
                                 f"{[tuple(t.shape) for t in zeros]}, but the streams' state has "
                                 f"{[tuple(t.shape) for t in prev]}; call reset() to start over")
            f = fresh.to(injection.device)
            view = [f.view(-1, *([1] * (t.dim() - 1))) for t in zeros]
            z0 = [torch.where(v, z, p.to(z.dtype)) for v, z, p in zip(view, zeros, prev)]
            return (injection,), {"z0": z0, "warm": ~f}

        return hook

    @staticmethod
    def _end_hook(name: str, new_state: Dict[str, List[torch.Tensor]]):
        def hook(stage: nn.Module, args: Any, kwargs: Any, output: List[torch.Tensor]) -> None:
            new_state[name] = [t.detach() for t in output]

        return hook


@contextlib.contextmanager
def _hooked(stage: nn.Module, start, end):
    """``start`` as a forward pre-hook and ``end`` as a forward hook of ``stage`` (with kwargs) inside the block."""
    handles = [stage.register_forward_pre_hook(start, with_kwargs=True),
               stage.register_forward_hook(end, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
