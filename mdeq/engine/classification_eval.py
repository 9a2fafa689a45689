"""The classification evaluation job behind ``eval_cls``: a model from what the user points at, its val split,
top-1/top-5 with the solver's steps and residual, optionally at several solver budgets; ``eval.json`` and the
sweep's table and plot in the output folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

from ..data.classification import build_transform, resolve_data_cfg
from ..data.factory import CLASSIFICATION_BUILTINS, build_classification_split
from ..data.loaders import build_eval_loader
from .amp import amp_dtype
from .checkpoint import plain_data
from .distributed import DistEnv, main_print
from .equilibria import Equilibria
from .evaluate import evaluate_classifier, sweep_solver_budgets, write_sweep
from .model_source import load_model_for_eval

__all__ = ["evaluate_classification_source"]


def evaluate_classification_source(source: str, env: DistEnv, output_dir: Path, data_root: Optional[str] = None,
                                   split: str = "val", data_format: Optional[str] = None,
                                   image_key: Optional[str] = None, label_key: Optional[str] = None,
                                   model_name: Optional[str] = None, num_classes: Optional[int] = None,
                                   use_ema: bool = False,
                                   solver_changes: Optional[Mapping[str, Any]] = None, batch_size: int = 64,
                                   workers: int = 2, amp: Optional[str] = None, channels_last: bool = False,
                                   input_size: Optional[int] = None, crop_pct: Optional[float] = None,
                                   sweep_iters: Optional[Sequence[int]] = None, progress: bool = True,
                                   say: Optional[Callable[..., None]] = None) -> Dict[str, Any]:
    """Evaluate ``source`` (a training checkpoint, a weights file, or a timm name with a tag); see ``eval_cls``.

    A training checkpoint brings its evaluation settings, classes, data config and data (``data_root``
    overrides its root, read as ``data_format``: imagefolder (default), hfds or wds, with ``image_key`` /
    ``label_key`` naming the fields of the last two); ``solver_changes`` (``configure_deq`` keywords) apply on
    top. Writes ``eval.json`` (and ``sweep.csv/json/png`` with ``sweep_iters``) to ``output_dir`` on the main
    process; returns the result.
    ``say`` prints the report (default: ``print`` on the main process, nothing elsewhere).
    """
    say = say or main_print(env)
    loaded = load_model_for_eval(source, model_name, num_classes, use_ema)
    model = loaded.model.to(env.device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    equilibria = Equilibria(model)
    if not equilibria and (solver_changes or sweep_iters):
        asked = [f"--{k.replace('_', '-')}" for k in solver_changes or {}] + (["--sweep-iters"] if sweep_iters else [])
        raise SystemExit(f"{loaded.description} ({loaded.arch}) has no solver to set or sweep: it holds no MDEQ (an "
                         f"explicit network computes the same output at any budget), so {', '.join(asked)} "
                         "do not apply; evaluate it without them")
    if solver_changes:
        equilibria.configure(**solver_changes)

    data = dict((loaded.config or {}).get("data") or {})
    if data_format is not None and data_root is None:
        raise SystemExit(f"--data {data_format} names the format of --data-root; give --data-root too")
    if data_root is not None:  # the user's data, whatever the run trained on
        fmt = data_format or "imagefolder"
        if fmt != data.get("name"):
            data = {k: v for k, v in data.items() if k not in ("image_key", "label_key")}
        data.update(name=fmt, root=data_root)
    elif not data.get("root") and data.get("name") not in CLASSIFICATION_BUILTINS:
        raise SystemExit("--data-root is required: an ImageFolder root with a val/<class>/ split (or, with --data "
                         "hfds|wds, a Hugging Face dataset or a folder of WebDataset shards)")
    data.update({k: v for k, v in (("image_key", image_key), ("label_key", label_key)) if v is not None})
    # the run's training data config (else the model's pretrained cfg), then the command line's overrides
    given = {k: v for k, v in (("input_size", input_size), ("crop_pct", crop_pct)) if v is not None}
    data_cfg = resolve_data_cfg(model, {**(loaded.data_cfg or {}), **given})
    dataset = build_classification_split(data, split, transform=build_transform(data_cfg, False),
                                         classes=loaded.classes, env=env)
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and len(dataset.classes) > n_out:
        raise SystemExit(f"the val set has {len(dataset.classes)} classes but the model predicts {n_out}")
    loader = build_eval_loader(dataset, batch_size, env.world_size, env.rank, workers)
    kw = dict(amp_dtype=amp_dtype(bool(amp), amp, "--amp"), channels_last=channels_last, progress=progress)

    output_dir = Path(output_dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    res = evaluate_classifier(model, loader, env, **kw)
    result = dict(source=source, description=loaded.description, arch=loaded.arch, split=split,
                  data_root=dataset.location, images=res.count, top1=res.top1, top5=res.top5,
                  loss=res.loss, deq_nstep_mean=res.deq_nstep_mean, deq_rel_residual_mean=res.deq_rel_residual_mean,
                  deq_abs_residual_mean=res.deq_abs_residual_mean, solver=plain_data(equilibria.options),
                  has_mdeq=bool(equilibria), input_size=list(data_cfg["input_size"]),
                  crop_pct=data_cfg.get("crop_pct"))
    solved = (f"{res.deq_nstep_mean:.1f} solver steps/image, relative residual {res.deq_rel_residual_mean:.3g}"
              if res.solved else "an explicit network (no MDEQ, nothing solved)")
    say(f"{loaded.description}: top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  on {res.count} images; {solved}")
    if sweep_iters:
        base = equilibria.options
        rows = sweep_solver_budgets(model, loader, env, sweep_iters, lambda k: equilibria.configure(max_iter=k), **kw)
        equilibria.configure(max_iter=base["max_iter"])
        result["sweep"] = rows
        if env.is_main:
            write_sweep(rows, output_dir, f"{loaded.arch} ({base['solver']})")
        say("max_iter  top-1   top-5   steps  rel.residual")
        for r in rows:
            say(f"{r['max_iter']:8d}  {r['top1']:6.2f}  {r['top5']:6.2f}  {r['deq_nstep_mean']:5.1f}  "
                f"{r['deq_rel_residual_mean']:.3g}")
    if env.is_main:
        (output_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"results: {output_dir / 'eval.json'}" + (f", {output_dir / 'sweep.png'}" if sweep_iters else ""))
    return result
