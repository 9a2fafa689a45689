"""Segmentation of video, frame by frame: streamed (``mdeq.stream``: each stream's solve starts from its previous
frame's equilibrium) or solving every frame from scratch, at the same per-frame solver settings.

Scored on the annotated frames with one confusion matrix (mIoU, pixel accuracy), with the f-evaluations each frame
cost (the solves' ``nfe``, summed over the model's MDEQs: with several streams a batch iterates until its last stream
stops), the model's milliseconds per frame, and the
scores against the number of frames since the last scene cut (clips whose cuts are known: the generated video),
which shows how fast a stream recovers from a cut it was not told about.

``compare_video`` runs the comparison the ``eval_seg --stream`` report shows: streaming and from-scratch at each
per-frame budget (exactly k f-evaluations: ``mdeq.core.budget_options``) and from scratch at a reference setting
(the model's official tolerance).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mdeq.core import budget_options
from mdeq.models import configured_deq, deq_stats, stream as make_stream
from mdeq.models.control import require_mdeqs, stage_deq

from ..data.video import VideoSegmentationDataset, frames_since_cut, stream_batches
from .seg_metrics import ConfusionMatrix

__all__ = ["VideoEvalResult", "evaluate_video", "compare_video", "video_table", "DEFAULT_BUDGETS"]

DEFAULT_BUDGETS = (2,)  # f-evaluations per frame of a streamed comparison (eval_seg --stream --budget)


@dataclass
class VideoEvalResult:
    """One pass over a video set. Scores in percent; ``after_cut[i]``: the frames ``i`` frames after a scene cut
    (0: the cut frame itself), with their mIoU, pixel accuracy and f-evaluations per frame."""

    name: str
    streaming: bool
    settings: Dict[str, Any]
    frames: int  # frames run (every stream's)
    scored: int  # annotated frames scored
    miou: float
    aacc: float
    evals_per_frame: float
    ms_per_frame: float
    rel_residual_mean: float
    after_cut: List[Dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def evaluate_video(model: nn.Module, data: VideoSegmentationDataset, *, streaming: bool,
                   settings: Optional[Mapping[str, Any]] = None, streams: int = 1,
                   device: Optional[torch.device] = None, name: str = "", progress: bool = True) -> VideoEvalResult:
    """Run ``model`` (eval mode) over every clip of ``data``, ``streams`` clips at a time, and score it.

    ``settings``: ``configure_deq`` changes for every frame (applied during this call only). ``streaming``: each
    stream starts from its previous equilibrium (``mdeq.stream``; a new clip in a slot restarts that stream);
    otherwise every frame is solved from the model's own start.
    """
    settings = dict(settings or {})
    device = device or next(model.parameters()).device
    model.eval()
    total = ConfusionMatrix(data.num_classes, data.ignore_index)
    by_cut: Dict[int, ConfusionMatrix] = {}
    cut_evals: Dict[int, List[float]] = {}
    evals: List[float] = []
    residuals: List[float] = []
    seconds, frames, scored = 0.0, 0, 0
    run = make_stream(model, **settings) if streaming else None
    last_size: Optional[tuple] = None
    context = contextlib.nullcontext() if streaming else configured_deq(model, **settings)
    steps = stream_batches(data, streams)
    with context, torch.no_grad():
        for batch in tqdm(steps, desc=name or "video", disable=not progress, leave=False, unit="step"):
            images = batch.images.to(device)
            if run is not None:
                if bool(batch.reset.all()):
                    run.reset()  # every slot starts a clip: any size, any number of streams
                else:
                    _check_same_size(data, batch, images, last_size)
                    run.reset(batch.reset)
            last_size = tuple(images.shape[-2:])
            _sync(device)
            start = time.perf_counter()
            logits = run(images) if run is not None else model(images)
            _sync(device)
            seconds += time.perf_counter() - start
            stats = run.stats if run is not None else deq_stats(model)
            nfe = float(sum(s.nfe for s in stats.values()))
            rel = torch.stack([s.rel_residual.float().cpu() for s in stats.values()]).mean(0)
            if logits.shape[-2:] != images.shape[-2:]:
                logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
            pred = logits.argmax(1).cpu()
            for i in range(images.shape[0]):
                if not bool(batch.active[i]):
                    continue
                frames += 1
                evals.append(nfe)
                residuals.append(float(rel[i]))
                clip = data.clips[int(batch.clip[i])]
                since = frames_since_cut(clip, int(batch.frame[i])) if any(
                    c <= int(batch.frame[i]) for c in clip.cuts) else None
                if since is not None:
                    cut_evals.setdefault(since, []).append(nfe)
                mask = batch.masks[i] if batch.masks is not None else None
                if mask is None:
                    continue
                scored += 1
                total.update(pred[i], mask)
                if since is not None:
                    by_cut.setdefault(since, ConfusionMatrix(data.num_classes, data.ignore_index)).update(pred[i], mask)
    if scored == 0:
        raise ValueError(f"no annotated frame in the {frames} frames of {len(data.clips)} clips: nothing to score "
                         "(a video set needs label files for some frames)")
    m = total.compute()
    cut_metrics = {i: cm.compute() for i, cm in sorted(by_cut.items())}
    after_cut = [dict(frame=i, miou=s.miou, aacc=s.aacc, frames=len(cut_evals.get(i, [])),
                      evals_per_frame=_mean(cut_evals.get(i, []))) for i, s in cut_metrics.items()]
    return VideoEvalResult(name=name, streaming=streaming, settings=settings, frames=frames, scored=scored,
                           miou=m.miou, aacc=m.aacc, evals_per_frame=_mean(evals),
                           ms_per_frame=1000.0 * seconds / max(frames, 1), rel_residual_mean=_mean(residuals),
                           after_cut=after_cut)


def compare_video(model: nn.Module, data: VideoSegmentationDataset, budgets: Sequence[int],
                  reference: Mapping[str, Any], streams: int = 1, device: Optional[torch.device] = None,
                  progress: bool = True, say: Callable[[str], None] = print) -> List[VideoEvalResult]:
    """Streaming and from-scratch at each per-frame budget (exactly k f-evaluations), then from scratch at
    ``reference`` (``configure_deq`` settings: the model's official tolerance), in that order. The budget settings
    are ``budget_options`` of the model's first MDEQ, applied to every MDEQ it holds."""
    options = _merged_options(model)
    runs: List[VideoEvalResult] = []
    for k in budgets:
        settings = budget_options(options, int(k))
        for streaming in (True, False):
            label = f"{'stream' if streaming else 'scratch'} @{k}"
            runs.append(evaluate_video(model, data, streaming=streaming, settings=settings, streams=streams,
                                       device=device, name=label, progress=progress))
            say(_line(runs[-1]))
    runs.append(evaluate_video(model, data, streaming=False, settings=reference, streams=streams, device=device,
                               name="scratch, reference", progress=progress))
    say(_line(runs[-1]))
    return runs


def video_table(runs: Sequence[VideoEvalResult]) -> str:
    """A Markdown table of the runs, and one of mIoU against the frames since a cut (when cuts are known)."""
    lines = ["| run | mIoU | pixel acc. | f-evals / frame | ms / frame | rel. residual |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.miou:.2f} | {r.aacc:.2f} | {r.evals_per_frame:.2f} | {r.ms_per_frame:.1f} | "
                     f"{r.rel_residual_mean:.3g} |")
    cut_runs = [r for r in runs if r.after_cut]
    if cut_runs:
        width = max(len(r.after_cut) for r in cut_runs)
        lines += ["", "mIoU t frames after a scene cut (the stream is not told about the cut):", "",
                  "| run | " + " | ".join(f"t={i}" for i in range(width)) + " |",
                  "|---|" + "---:|" * width]
        for r in cut_runs:
            cells = [f"{c['miou']:.1f}" for c in r.after_cut] + [""] * (width - len(r.after_cut))
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_same_size(data: VideoSegmentationDataset, batch: Any, images: torch.Tensor, last: Optional[tuple]) -> None:
    """A clip that changes its frame size mid-way cannot be streamed (the state belongs to one size): name it."""
    if last is not None and tuple(images.shape[-2:]) != last:
        i = int((~batch.reset & batch.active).nonzero()[0]) if bool((~batch.reset & batch.active).any()) else 0
        raise ValueError(f"clip {data.clips[int(batch.clip[i])].name!r} changes its frame size at frame "
                         f"{int(batch.frame[i])} ({last[0]}x{last[1]} -> {images.shape[-2]}x{images.shape[-1]}): a "
                         "stream carries an equilibrium of one size; make its frames one size")


def _merged_options(model: nn.Module) -> Dict[str, Any]:
    """The resolved DEQ options of the model's (first) MDEQ: what ``budget_options`` starts from."""
    stage = next(iter(require_mdeqs(model).values()))
    return stage_deq(stage).options


def _line(r: VideoEvalResult) -> str:
    return (f"{r.name}: mIoU {r.miou:.2f}%  pixel acc. {r.aacc:.2f}%  {r.evals_per_frame:.2f} f-evaluations and "
            f"{r.ms_per_frame:.1f} ms per frame ({r.frames} frames, {r.scored} scored)")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
