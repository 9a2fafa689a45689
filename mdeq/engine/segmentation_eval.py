"""The segmentation evaluation jobs behind ``eval_seg``: a model from what the user points at, the dataset
(the run's, or one named on the command line), whole / sliding-window / multi-scale + flip inference, one
confusion matrix over the split; ``eval.json``, ``iou.md`` and optionally the predicted label PNGs. On video
(``evaluate_video_source``): streamed against from-scratch solves, ``video.json`` and ``video.md``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from ..data.cityscapes_labels import to_label_ids
from ..data.factory import VIDEO_DATASETS, build_segmentation_dataset, build_video_dataset
from ..data.loaders import build_eval_loader
from ..data.segmentation import build_seg_eval_transform, collate_same_size, save_label_png
from ..models import SEG_PRESETS
from .amp import amp_dtype
from .checkpoint import plain_data
from .distributed import DistEnv, main_print
from .model_source import load_segmentation_model_for_eval
from .seg_inference import build_inference, evaluate_segmentation
from .video_eval import DEFAULT_BUDGETS, compare_video, evaluate_video, video_table

__all__ = ["evaluate_segmentation_source", "evaluate_video_source", "inference_settings", "reference_settings"]


def inference_settings(run_cfg: Optional[Mapping[str, Any]], mode: Optional[str] = None,
                       window: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
                       scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None) -> Dict[str, Any]:
    """The run's ``inference`` config with the given changes (mode whole | slide, window, stride, scales, flip)."""
    cfg = dict((run_cfg or {}).get("inference") or {})
    for key, value in (("mode", mode), ("window", window), ("stride", stride), ("scales", scales)):
        if value is not None:
            cfg[key] = value
    if flip is not None:
        cfg["flip"] = flip
    if cfg.get("mode") == "slide" and not cfg.get("window"):
        raise SystemExit("--mode slide needs --window H W")
    if mode == "whole":
        cfg.pop("window", None), cfg.pop("stride", None)
    return cfg


def evaluate_segmentation_source(source: str, env: DistEnv, output_dir: Path, dataset: Optional[str] = None,
                                 data_root: Optional[str] = None, split: str = "val",
                                 classes: Optional[Sequence[str]] = None, label_type: Optional[str] = None,
                                 no_labels: bool = False, model_name: Optional[str] = None, use_ema: bool = False,
                                 solver_changes: Optional[Mapping[str, Any]] = None,
                                 inference_changes: Optional[Mapping[str, Any]] = None, batch_size: int = 1,
                                 workers: int = 2, amp: Optional[str] = None,
                                 save_predictions: Optional[str] = None, progress: bool = True,
                                 say: Optional[Callable[..., None]] = None) -> Dict[str, Any]:
    """Evaluate ``source`` (a train_seg checkpoint, a weights file or a published tag); see ``eval_seg``.
    ``inference_changes`` (mode, window, stride, scales, flip; None keeps the run's) change the run's inference
    config (``inference_settings``). Returns the result (also written to ``output_dir/eval.json``). ``say`` prints
    the report (default: ``print`` on the main process, nothing elsewhere)."""
    say = say or main_print(env)
    loaded = load_segmentation_model_for_eval(source, model_name, use_ema=use_ema)
    model = loaded.model.to(env.device).eval()
    if solver_changes:
        model.configure_deq(**solver_changes)

    run_data = dict((loaded.config or {}).get("data") or {})
    name = dataset or run_data.get("name") or "cityscapes"
    root = data_root or run_data.get("root")
    if root is None and name not in ("synthetic", "synthetic_video"):
        raise SystemExit("--data-root is required (a Cityscapes root, or an images/ + masks/ folder with --dataset "
                         "folder)")
    classes = classes or (loaded.classes if name == "folder" else None) or run_data.get("classes")
    data_cfg = loaded.data_cfg or {}
    transform = build_seg_eval_transform(**{k: tuple(data_cfg[k]) for k in ("mean", "std") if data_cfg.get(k)})
    labelled = not (no_labels or (name == "cityscapes" and split == "test"))
    label_type = label_type or run_data.get("label_type") or "auto"
    try:
        data = build_segmentation_dataset(name, root, split, transform=transform, classes=classes,
                                          require_labels=labelled,
                                          **({"label_type": label_type} if name != "folder" else {}))
    except Exception as e:
        hint = "" if not labelled or "label" not in str(e) else " (a split without labels: pass --no-labels)"
        raise SystemExit(f"{type(e).__name__}: {e}{hint}") from e
    n_out = model.num_classes
    if data.num_classes != n_out:
        raise SystemExit(f"the dataset has {data.num_classes} classes but the model predicts {n_out}")
    loader = build_eval_loader(data, batch_size, env.world_size, env.rank, workers,
                               collate_fn=collate_same_size)
    icfg = inference_settings(loaded.config, **dict(inference_changes or {}))
    inferencer = build_inference(model, icfg, amp_dtype(bool(amp), amp, "--amp"))

    out = Path(output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    save_dir = Path(save_predictions) if save_predictions else None
    to_ids = name in ("cityscapes", "synthetic", "synthetic_video")

    def save(indices, images, masks, pred) -> None:
        for i, p in zip(indices, pred.cpu().numpy().astype(np.uint8)):
            save_label_png(save_dir / f"{data.relative_name(i)}.png", to_label_ids(p) if to_ids else p)

    res = evaluate_segmentation(model, loader, env, data.num_classes, ignore_index=data.ignore_index,
                                inference=inferencer, progress=progress, desc="eval",
                                on_batch=save if save_dir is not None else None)
    m = res.metrics
    result = dict(source=source, description=loaded.description, arch=loaded.arch, dataset=name,
                  data_root=str(root) if root else None, split=split, images=res.count, labelled=labelled,
                  miou=_num(m.miou), aacc=_num(m.aacc), macc=_num(m.macc),
                  iou={c: _num(v) for c, v in zip(data.classes, m.iou)},
                  deq_nstep_mean=res.deq_nstep_mean, deq_rel_residual_mean=res.deq_rel_residual_mean,
                  deq_abs_residual_mean=res.deq_abs_residual_mean, inference=icfg,
                  solver=plain_data(model.deq.options),
                  predictions=str(save_dir) if save_dir else None)
    if labelled:
        say(m.table(list(data.classes)))
        say(f"{loaded.description}: mIoU {m.miou:.2f}%  pixel acc. {m.aacc:.2f}%  mean acc. {m.macc:.2f}% on "
            f"{res.count} images; {res.deq_nstep_mean:.1f} solver steps/image, relative residual "
            f"{res.deq_rel_residual_mean:.3g}")
    else:
        say(f"{split}: no labels, no scores; {res.count} images predicted")
    if save_dir is not None:
        kind = "Cityscapes labelIds" if to_ids else "class indices"
        say(f"predictions ({kind}): {save_dir}")
    if env.is_main:
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        if labelled:
            (out / "iou.md").write_text(m.table(list(data.classes)) + "\n")
    say(f"results: {out / 'eval.json'}")
    return result


def _num(v: float):
    return v if v == v else None  # NaN (a class absent from labels and predictions) -> null in JSON


def reference_settings(model: Any, arch: Optional[str]) -> Dict[str, Any]:
    """The from-scratch reference of a video evaluation: the preset's official thresholds and tolerance
    (``max_iter``, ``tol``, ``stop_mode`` of ``SEG_PRESETS[arch].deq``; the model's own config for another
    architecture) on the model's solver."""
    source = SEG_PRESETS[arch].deq if arch in SEG_PRESETS else model.cfg.deq
    return {k: source[k] for k in ("max_iter", "tol", "stop_mode") if k in source}


def evaluate_video_source(source: str, env: DistEnv, output_dir: Path, dataset: str = "synthetic_video",
                          data_root: Optional[str] = None, split: str = "val", classes: Optional[Sequence[str]] = None,
                          label_type: Optional[str] = None, model_name: Optional[str] = None, use_ema: bool = False,
                          solver_changes: Optional[Mapping[str, Any]] = None, streaming: bool = True,
                          budgets: Sequence[int] = DEFAULT_BUDGETS, streams: int = 1, progress: bool = True,
                          say: Optional[Callable[..., None]] = None) -> Dict[str, Any]:
    """Evaluate ``source`` on a video set (``VIDEO_DATASETS``). ``streaming``: the comparison of
    ``video_eval.compare_video`` (streamed and from scratch at each per-frame budget, from scratch at the official
    tolerance); otherwise every frame from scratch at the model's settings (with ``solver_changes``). Writes
    ``video.json`` and ``video.md`` to ``output_dir``; returns the result."""
    say = say or main_print(env)
    if env.distributed:
        raise SystemExit("video evaluation runs in one process (a stream is a sequence): run it without torchrun")
    if dataset not in VIDEO_DATASETS:
        raise SystemExit(f"--dataset {dataset!r} is not a video set; video sets: {', '.join(VIDEO_DATASETS)}")
    loaded = load_segmentation_model_for_eval(source, model_name, use_ema=use_ema)
    model = loaded.model.to(env.device).eval()
    if solver_changes:
        model.configure_deq(**solver_changes)
    data_cfg = loaded.data_cfg or {}
    transform = build_seg_eval_transform(**{k: tuple(data_cfg[k]) for k in ("mean", "std") if data_cfg.get(k)})
    run_data = dict((loaded.config or {}).get("data") or {})
    classes = classes or (loaded.classes if dataset == "video_folder" else None) or run_data.get("classes")
    try:
        data = build_video_dataset(dataset, data_root, split, transform=transform, classes=classes,
                                   label_type=label_type or "auto", env=env)
    except Exception as e:
        raise SystemExit(f"{type(e).__name__}: {e}") from e
    if data.num_classes != model.num_classes:
        raise SystemExit(f"the dataset has {data.num_classes} classes but the model predicts {model.num_classes}")
    reference = reference_settings(model, loaded.arch)
    if streaming:
        runs = compare_video(model, data, budgets, reference, streams=streams, device=env.device,
                             progress=progress, say=say)
    else:
        runs = [evaluate_video(model, data, streaming=False, streams=streams, device=env.device, name="scratch",
                               progress=progress)]
    table = video_table(runs)
    result = dict(source=source, description=loaded.description, arch=loaded.arch, dataset=dataset,
                  data_root=str(data_root) if data_root else None, split=split, clips=len(data.clips),
                  streams=streams, budgets=list(budgets) if streaming else None, reference=reference,
                  solver=plain_data(model.deq.options), runs=[r.as_dict() for r in runs])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "video.json").write_text(json.dumps(result, indent=2, default=_num) + "\n")
    (out / "video.md").write_text(table + "\n")
    say(table)
    say(f"results: {out / 'video.json'}")
    return result
