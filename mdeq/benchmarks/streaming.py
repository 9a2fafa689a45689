"""Streaming benchmark (``tools/benchmark.py stream``): video segmentation with the equilibrium carried from frame to
frame (``mdeq.stream``) against solving every frame from scratch, on the generated street-scene video.

Each training recipe (``RECIPES``) trains ``mdeq_small`` segmentation on the frames of the generated video's train
clips (``python -m mdeq.cli.train_seg data=synthetic_video ...``, the default segmentation recipe for ``EPOCHS``
epochs, in a subprocess; a finished run is reused unless ``retrain``), then its final weights run over the val clips
(by default 4 clips of 30 frames at 128x256 in 3 shots: the scene cuts are not told to the stream), one stream at
a time, in this process:

* streamed and from scratch at exactly k f-evaluations per frame for each k of ``BUDGETS``
  (``mdeq.core.budget_options``: tolerance 0, the head sees the last evaluation's output);
* from scratch at the preset's official setting (``segmentation_eval.reference_settings``: for mdeq_small Anderson
  up to 28 evaluations, tolerance 1e-3 on the absolute residual, MDEQ-Small Cityscapes' F_THRES 27 and stop mode),
  and at the same budget and tolerance on the relative residual (which stops much earlier: the fairer count of what a
  converged solve needs).

Reported per run: mIoU and pixel accuracy over every val frame, f-evaluations and model milliseconds per frame, and
mIoU at each frame index after a cut; per streamed run, ``recovery``: the frames after a cut until its mIoU stays
within 1 point of the official from-scratch solve's at the same index. Time only on an idle machine.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .processes import launch
from .report import with_provenance

__all__ = ["RECIPES", "BUDGETS", "EPOCHS", "run", "references", "train_command", "recovery_frames", "to_markdown",
           "save"]

BUDGETS = (1, 2, 4)
EPOCHS = 6
# trained on 240 frames at batch 8 (30 steps an epoch): 2 epochs unrolled, then DEQ mode
COMMON = ("data=synthetic_video", f"train.epochs={EPOCHS}", "schedule.pretrain_steps=60")
_PENALTY = ("schedule.jac.weight=1.0", "schedule.jac.freq=0.5", "schedule.jac.pretrain_weight=1.0",
            "schedule.jac.probes=1")
RECIPES: Dict[str, Dict] = {
    "plain": dict(label="default recipe (Anderson 8, implicit gradient)", overrides=()),
    "penalty": dict(label="+ Jacobian penalty (half of the steps, 1 probe)", overrides=_PENALTY),
    "fast": dict(label="fast recipe (Skip DEQ start, Anderson 4, one-step gradient, penalty on a quarter)",
                 overrides=("deq=fast", "model.kwargs.skip_init=true", "deq.max_iter=4", "deq.b_max_iter=null",
                            "schedule.jac.weight=1.0", "schedule.jac.freq=0.25", "schedule.jac.pretrain_weight=1.0",
                            "schedule.jac.probes=1")),
}
RECORD = "stream_run.json"


def references(model, arch: str) -> Dict[str, Dict]:
    """The from-scratch references: the preset's official setting, and the same budget and tolerance on the relative
    residual; each with its label."""
    from mdeq.engine.segmentation_eval import reference_settings

    official = reference_settings(model, arch)
    rel = dict(official, stop_mode="rel")
    return {"official": dict(settings=official, label=f"scratch, official (<= {official['max_iter']}, "
                                                      f"{official['stop_mode']}. tol {official['tol']:g})"),
            "rel": dict(settings=rel, label=f"scratch, converged (<= {rel['max_iter']}, rel. tol {rel['tol']:g})")}


def train_command(recipe: str, run_dir: Path) -> List[str]:
    return [sys.executable, "-m", "mdeq.cli.train_seg", *COMMON, *RECIPES[recipe]["overrides"],
            f"hydra.run.dir={run_dir}", "train.progress=false"]


def _read(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train(recipe: str, runs_dir: Path, retrain: bool, progress: Callable[[str], None]) -> Path:
    """The recipe's run folder, trained unless a finished run of the same command is there."""
    run_dir = runs_dir / recipe
    cmd = train_command(recipe, run_dir)
    command = shlex.join(cmd[1:])
    record = _read(run_dir / RECORD)
    finished = record and record.get("command") == command and (run_dir / "checkpoints" / "last.pth").is_file()
    if retrain or not finished:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        progress(f"[stream] training {recipe}: {command}")
        res = launch(cmd, runs_dir / f"{recipe}.log")
        if res["returncode"] != 0:
            raise RuntimeError(f"training {recipe} failed (exit {res['returncode']}); see {runs_dir / f'{recipe}.log'}")
        res.update(command=command, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        (run_dir / RECORD).write_text(json.dumps(res, indent=2))
    return run_dir


def recovery_frames(stream_cut: Sequence[Dict], reference_cut: Sequence[Dict], points: float = 1.0
                    ) -> Optional[int]:
    """The first frame index t after a cut from which the streamed mIoU stays within ``points`` of the reference's at
    every later index (None when it never does)."""
    ref = {c["frame"]: c["miou"] for c in reference_cut}
    ok = [c["frame"] for c in stream_cut if c["frame"] in ref and c["miou"] >= ref[c["frame"]] - points]
    frames = [c["frame"] for c in stream_cut if c["frame"] in ref]
    for t in frames:
        if all(f in ok for f in frames if f >= t):
            return t
    return None


def run(recipes: Sequence[str] = tuple(RECIPES), budgets: Sequence[int] = BUDGETS,
        runs_dir: Path = Path("results/benchmarks/stream_runs"), retrain: bool = False,
        progress: Callable[[str], None] = print) -> Dict:
    """Train (or reuse) each recipe's model and measure it on the generated video's val clips."""
    import torch

    from mdeq.data.factory import build_video_dataset
    from mdeq.data.segmentation import build_seg_eval_transform
    from mdeq.engine.model_source import load_segmentation_model_for_eval
    from mdeq.engine.video_eval import compare_video, evaluate_video

    data = build_video_dataset("synthetic_video", None, "val", transform=build_seg_eval_transform())
    height, width = data.load_frame(0, 0)[0].shape[-2:]
    out: Dict = dict(recipes={}, budgets=list(budgets), clips=len(data.clips),
                     frames=sum(len(c.frames) for c in data.clips), size=[int(height), int(width)],
                     cuts=sorted({c for clip in data.clips for c in clip.cuts}), threads=torch.get_num_threads())
    for recipe in recipes:
        run_dir = _train(recipe, runs_dir, retrain, progress)
        loaded = load_segmentation_model_for_eval(str(run_dir / "checkpoints" / "last.pth"))
        model = loaded.model.eval()
        refs = references(model, loaded.arch)
        out["references"] = {k: r["settings"] for k, r in refs.items()}
        runs = compare_video(model, data, budgets, refs["official"]["settings"], progress=False,
                             say=lambda s: progress(f"[{recipe}] {s}"))
        runs[-1].name = refs["official"]["label"]
        runs.append(evaluate_video(model, data, streaming=False, settings=refs["rel"]["settings"],
                                   name=refs["rel"]["label"], progress=False))
        progress(f"[{recipe}] {runs[-1].name}: mIoU {runs[-1].miou:.2f}, {runs[-1].evals_per_frame:.2f} f-evals")
        reference = runs[-2]
        metrics = _read(run_dir / "metrics.json") or {}
        out["recipes"][recipe] = dict(
            label=RECIPES[recipe]["label"], command=shlex.join(train_command(recipe, run_dir)[1:]),
            val_miou_training=metrics.get("val_miou"), train_seconds=metrics.get("train_seconds"),
            runs=[dict(r.as_dict(), recovery=recovery_frames(r.after_cut, reference.after_cut) if r.streaming
                       else None) for r in runs])
    return out


def to_markdown(result: Dict) -> str:
    """Per recipe: the runs' mIoU / f-evaluations / ms per frame, and mIoU against the frames after a cut."""
    h, w = result["size"]
    lines: List[str] = [f"Generated street-scene video: {result['clips']} val clips, {result['frames']} frames of "
                        f"{h}x{w}, scene cuts at frames {result['cuts']}; one stream at a time, {result['threads']} "
                        "threads.", ""]
    for name, rec in result["recipes"].items():
        runs = rec["runs"]
        lines += [f"**{name}**: {rec['label']}", "",
                  "| run | mIoU | pixel acc. | f-evals / frame | ms / frame | recovers after a cut (frames) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in runs:
            rec_ = "-" if not r["streaming"] else ("never" if r["recovery"] is None else str(r["recovery"]))
            lines.append(f"| {r['name']} | {r['miou']:.2f} | {r['aacc']:.2f} | {r['evals_per_frame']:.2f} | "
                         f"{r['ms_per_frame']:.1f} | {rec_} |")
        width = max(len(r["after_cut"]) for r in runs)
        lines += ["", "mIoU t frames after a cut:", "",
                  "| run | " + " | ".join(f"t={t}" for t in range(width)) + " |", "|---|" + "---:|" * width]
        for r in runs:
            lines.append(f"| {r['name']} | " + " | ".join(f"{c['miou']:.1f}" for c in r["after_cut"]) + " |")
        lines.append("")
    return "\n".join(lines)


def save(result: Dict, out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "stream.json", out / "stream.md"]
    paths[0].write_text(json.dumps(with_provenance(result), indent=2, default=lambda v: None) + "\n")
    paths[1].write_text(to_markdown(result) + "\n")
    return paths
