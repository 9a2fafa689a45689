"""Cell benchmark: the time of one evaluation of the MDEQ cell f(z, x), the unit every solver pays per step.

One evaluation is timed as a solver makes it: the packed (B, D) state is unpacked, the cell runs, its output is
packed again. ``eval``: under ``torch.no_grad()`` in eval mode (inference, and every solver step in training);
``train``: forward and backward of one application with gradients in train mode, dropout on (the differentiable
step after the solve, an unrolled pre-training layer; the backward solve's vector-Jacobian products cost about
the forward). Variants, all on the same weights and state, timed alternately in one process (median of
``repeats`` rounds after three warm-up calls per variant, which also compile):

* ``eager``: the NCHW eager cell, the path of the original and of earlier versions of this package;
* ``channels_last``: model and state in channels-last memory format (``model.to(memory_format=...)`` with a
  channels-last input; the training tools' ``train.channels_last``);
* ``compiled`` / ``channels_last_compiled``: the cell through ``torch.compile`` (``model.compile_cell()``,
  ``train.compile_cell``); the solver loop stays eager;
* ``bf16``: eager NCHW under bfloat16 autocast (CPU or CUDA); not bitwise comparable, shown for its speed.

Reported: milliseconds per evaluation, the speed-up over ``eager`` and the largest difference of the output
from ``eager``'s relative to its largest value (the float32 variants agree to ~1e-6).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["VARIANTS", "DEFAULT_MODELS", "run", "to_markdown", "save"]

VARIANTS = ("eager", "channels_last", "compiled", "channels_last_compiled", "bf16")
DEFAULT_MODELS = (("mdeq_tiny", 32, 64), ("mdeq_small", 224, 8))
MODES = ("eval", "train")
WARMUP = 3


def _variant(base, x: torch.Tensor, variant: str, train: bool, device: torch.device):
    """A timed closure for one variant: (step() -> packed output)."""
    from mdeq.core import StatePacker, forward_scope

    model = copy.deepcopy(base)
    cl = variant.startswith("channels_last")
    if cl:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if variant.endswith("compiled"):
        model.compile_cell(dynamic=False)
    stage = model.fullstage
    with torch.no_grad():
        _, injection = model.forward_stem(x)
    zeros = stage.initial_state(injection)
    packer = StatePacker(zeros)
    g = torch.Generator().manual_seed(2)
    state = packer.pack([torch.randn(t.shape, generator=g).to(device).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format) for t in zeros])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()

    def step() -> torch.Tensor:
        torch.manual_seed(3)  # the same dropout masks for every variant
        if train:
            flat = state.clone().requires_grad_()
            with forward_scope(stage), autocast:
                out = packer.pack(stage.cell(packer.unpack(flat), injection))
            out.float().square().sum().backward()
            return out.detach()
        with torch.no_grad(), forward_scope(stage), autocast:
            return packer.pack(stage.cell(packer.unpack(state), injection))

    return step, packer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(models: Sequence[Tuple[str, int, int]] = DEFAULT_MODELS, variants: Sequence[str] = VARIANTS,
        modes: Sequence[str] = MODES, repeats: int = 5, device: str = "cpu", threads: Optional[int] = None,
        progress: Callable[[str], None] = print) -> Dict:
    import timm

    import mdeq  # noqa: F401  (registers the models)

    from .solvers import keep_heap

    heap_kept = keep_heap()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    variants = ["eager"] + [v for v in variants if v != "eager"]
    rows: List[Dict] = []
    for name, size, batch in models:
        for mode in modes:
            train = mode == "train"
            torch.manual_seed(0)
            base = timm.create_model(name).to(dev).train(train)
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
            steps, outputs = {}, {}
            for v in variants:
                steps[v], packer = _variant(base, x, v, train, dev)
                for _ in range(WARMUP):  # compiles; the first calls also fault fresh memory in
                    steps[v]()
                outputs[v] = [t.float() for t in packer.unpack(steps[v]())]
            times: Dict[str, List[float]] = {v: [] for v in variants}
            for _ in range(repeats):
                for v in variants:
                    _sync(dev)
                    t0 = time.perf_counter()
                    steps[v]()
                    _sync(dev)
                    times[v].append(time.perf_counter() - t0)
            ref_ms = statistics.median(times["eager"]) * 1e3
            for v in variants:
                ms = statistics.median(times[v]) * 1e3
                diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outputs[v], outputs["eager"]))
                rows.append(dict(model=name, input=size, batch=batch, mode=mode, variant=v, ms=round(ms, 1),
                                 speedup=round(ref_ms / ms, 2), max_rel_diff=float(f"{diff:.1e}")))
                progress(f"[{name} {mode}] {v:24s} {ms:8.1f} ms  x{ref_ms / ms:.2f}  max rel diff {diff:.1e}")
    return dict(rows=rows, settings=dict(repeats=repeats, device=device, threads=torch.get_num_threads(),
                                         heap_kept=heap_kept), environment=dict(torch=torch.__version__))


def to_markdown(result: Dict) -> str:
    s = result["settings"]
    lines = [f"Cell benchmark (one f-evaluation as a solver makes it, {s['device']}, median of {s['repeats']}, "
             f"{s['threads']} threads, torch {result['environment']['torch']})", "",
             "| model | input x batch | mode | variant | ms / evaluation | speed-up vs eager | max rel. diff |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['input']} x {r['batch']} | {r['mode']} | {r['variant']} | {r['ms']:.1f} | "
                     f"{r['speedup']:.2f} | {r['max_rel_diff']:.0e} |")
    return "\n".join(lines) + "\n"


def save(result: Dict, out_dir: Path, name: str = "cell") -> Dict[str, Path]:
    from .report import save_report

    return save_report(result, out_dir, name, to_markdown)
