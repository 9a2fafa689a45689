"""Segmentation inference benchmark: forward time, solver steps and peak memory of an MDEQ segmentation preset
at Cityscapes resolutions (batch 1), in DEQ mode and unrolled.

Each configuration (input size x mode) runs in its own subprocess, like the training benchmark (so a peak is
not hidden by an earlier, larger one): build ``create_segmentation_model(model, num_classes=19)`` (optionally
loading ``checkpoint``), eval mode, ``torch.no_grad()``, one warm-up forward, then ``repeats`` timed forwards
of a fixed random image. Reported per configuration:

* ``forward_ms``: median forward time (logits at 1/4 resolution, as ``model(x)`` returns them);
* ``nfe``: f-evaluations of the last forward; ``mean_nstep``: its per-sample solver steps; ``rel_residual`` /
  ``abs_residual``: the residual of the returned state (unrolled: ``||z_N - z_{N-1}||``, relative to ``||z_N||``);
* ``peak_mb``: on CUDA ``torch.cuda.max_memory_allocated`` during the timed forwards; on CPU the growth of the
  process's peak resident set (VmHWM) over its size just before the warm-up forward.

DEQ mode uses the preset's solver settings (Anderson at the official budget, tolerance and stop mode; a
Broyden setting with memory keeps every update); ``max_iter`` and ``tol`` override the budget and the
tolerance (``tol=0`` runs the full budget). Unrolled mode applies the cell ``num_layers`` times (the preset's
official unrolled depth) or ``unroll_steps`` times. With random weights the cell is not contractive, so the
solver's steps and residuals show its budget, not the convergence of a trained model: pass a Cityscapes
checkpoint for that.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .processes import peak_rss_mb, rss_mb, run_in_subprocess

__all__ = ["run", "run_one", "to_markdown", "save", "default_configs", "parse_size", "DEFAULT_SIZES"]

DEFAULT_SIZES: Tuple[Tuple[int, int], ...] = ((512, 1024), (1024, 2048))
MODES = ("deq", "unroll")


def parse_size(text: str) -> Tuple[int, int]:
    """``'512x1024'`` -> (512, 1024)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"an input size is HxW (e.g. 512x1024), got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"an input size must be positive, got {text!r}")
    return h, w


def default_configs(model: str = "mdeq_small", sizes: Sequence[Tuple[int, int]] = DEFAULT_SIZES,
                    max_iter: Optional[int] = None, unroll_steps: Optional[int] = None,
                    tol: Optional[float] = None) -> List[Dict]:
    """Every size in DEQ mode (the preset's solver, or ``max_iter`` / ``tol``) and unrolled (``num_layers``
    steps, or ``unroll_steps``)."""
    from mdeq.models.config import SEG_PRESETS

    cfg = SEG_PRESETS[model]
    out = []
    for h, w in sizes:
        out.append(dict(model=model, height=h, width=w, mode="deq", max_iter=max_iter or cfg.deq["max_iter"],
                        tol=cfg.deq["tol"] if tol is None else tol))
        out.append(dict(model=model, height=h, width=w, mode="unroll", max_iter=unroll_steps or cfg.num_layers,
                        tol=cfg.deq["tol"] if tol is None else tol))
    return out


def _deq_options(preset: Dict, mode: str, max_iter: int, tol: float) -> Dict:
    if mode == "unroll":
        return dict(solver="unroll", max_iter=max_iter, tol=tol, stop_mode=preset["stop_mode"])
    if mode != "deq":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    opts = dict(preset.get("solver_options") or {})
    if "memory" in opts:  # the official configs keep every Broyden update (max_iter - 1 of them)
        opts["memory"] = max(1, max_iter - 1)
    return dict(solver=preset["solver"], max_iter=max_iter, tol=tol, stop_mode=preset["stop_mode"],
                solver_options=opts)


def run_one(model: str, height: int, width: int, mode: str, max_iter: int, tol: float, repeats: int = 2,
            device: str = "cpu", amp: Optional[str] = None, checkpoint: Optional[str] = None,
            threads: Optional[int] = None, num_classes: int = 19) -> Dict:
    """Measure one configuration in this process (``run`` calls it in a fresh subprocess)."""
    import torch

    from mdeq.engine.weights import read_state_dict
    from mdeq.models.convert import load_converted
    from mdeq.models.segmentation import create_segmentation_model

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    net = create_segmentation_model(model, num_classes=num_classes)
    if checkpoint:
        load_converted(net, read_state_dict(checkpoint))
    net = net.to(dev).eval()
    opts = _deq_options(net.cfg.deq, mode, max_iter, tol)
    net.configure_deq(**opts)
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(dev)
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16}.get(amp or "", None)

    def forward():
        ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = net(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    base_rss = rss_mb()
    out = forward()  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = peak_rss_mb() - base_rss
    s = net.deq_stats
    return dict(model=model, input=f"{height}x{width}", height=height, width=width, batch=1, mode=mode,
                solver=opts["solver"], max_iter=max_iter, tol=tol, stop_mode=opts["stop_mode"],
                forward_ms=round(statistics.median(times) * 1e3, 1), nfe=s.nfe,
                mean_nstep=round(s.nstep.float().mean().item(), 2),
                rel_residual=round(s.rel_residual.float().mean().item(), 4),
                abs_residual=round(s.abs_residual.float().mean().item(), 4),
                converged=s.converged.float().mean().item(), peak_mb=round(peak, 1), device=str(dev), amp=amp,
                output=list(out.shape), params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 2))


def run(configs: Optional[Sequence[Dict]] = None, repeats: int = 2, device: str = "cpu", amp: Optional[str] = None,
        checkpoint: Optional[Path] = None, threads: Optional[int] = None, progress=print) -> Dict:
    """Run each configuration in a fresh Python process and collect the rows."""
    configs = list(configs or default_configs())
    rows = []
    for c in configs:
        args = dict(c, repeats=repeats, device=device, amp=amp, threads=threads,
                    checkpoint=str(checkpoint) if checkpoint else None)
        row = run_in_subprocess("mdeq.benchmarks.segmentation", args)
        rows.append(row)
        progress(f"  {row['model']:12s} {row['input']:>9s} {row['mode']:6s} {row['solver']:8s} "
                 f"iters={row['max_iter']:3d}  {row['forward_ms']:10.1f} ms  nfe={row['nfe']:3d}  "
                 f"steps={row['mean_nstep']:6.2f}  rel_res={row['rel_residual']:.4f}  peak {row['peak_mb']:8.1f} MB")
    import torch

    return dict(rows=rows, settings=dict(batch=1, repeats=repeats, device=device, amp=amp,
                                         checkpoint=str(checkpoint) if checkpoint else None,
                                         threads=threads or torch.get_num_threads()),
                environment=dict(torch=torch.__version__))


def to_markdown(result: Dict) -> str:
    s = result["settings"]
    peak = ("torch.cuda.max_memory_allocated" if s["device"].startswith("cuda")
            else "growth of the peak RSS over the process size before the first forward")
    lines = [f"Segmentation inference benchmark ({s['device']}, batch {s['batch']}, eval + no_grad, amp {s['amp']}, "
             f"median of {s['repeats']} forwards after 1 warm-up, {s['threads']} threads, torch "
             f"{result['environment']['torch']}, weights: {s['checkpoint'] or 'random init'})", "",
             "| model | input | mode | solver | max_iter | forward ms | f-evals | mean steps | rel. residual | "
             "peak MB | device |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['input']} | {r['mode']} | {r['solver']} | {r['max_iter']} | "
                     f"{r['forward_ms']:.1f} | {r['nfe']} | {r['mean_nstep']} | {r['rel_residual']:.4f} | "
                     f"{r['peak_mb']:.1f} | {r['device']} |")
    tols = sorted({(r["tol"], r["stop_mode"]) for r in result["rows"] if r["mode"] == "deq"})
    lines += ["", f"DEQ mode: the preset's solver, tolerance {', '.join(f'{t} ({m})' for t, m in tols) or '-'} "
                  "(0 = the full budget); unroll: the cell applied max_iter times, its residual is "
                  "||z_N - z_{N-1}|| / ||z_N||. Peak MB: " + peak + "."]
    if not s["checkpoint"]:
        lines.append("Random weights: the freshly initialised cell is not contractive, so the solver steps and "
                     "residuals show the solver's budget, not the convergence of a trained model (pass "
                     "--checkpoint with Cityscapes weights for representative steps).")
    return "\n".join(lines) + "\n"


def save(result: Dict, out_dir: Path, name: str = "seg") -> Dict[str, Path]:
    from .report import save_report

    return save_report(result, out_dir, name, to_markdown)
