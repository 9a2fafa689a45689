"""The renderers of the documentation's measured tables: one function per table, from a result file's dict to
Markdown (``docs_tables`` writes them between their markers). Each table keeps the shape the docs had when it
was written by hand; the full per-row reports stay in each benchmark's own ``to_markdown``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from .report import fmt_number as _fmt
from .report import markdown_table as _table

__all__ = ["RENDERERS", "renderer"]

RENDERERS: Dict[str, Callable[[Dict], str]] = {}


def renderer(name: str):
    def register(fn: Callable[[Dict], str]) -> Callable[[Dict], str]:
        RENDERERS[name] = fn
        return fn
    return register


# ------------------------------------------------------------------------------------------------ streaming
def _pair(stream: float, scratch: float) -> str:
    """"a / b" with the better one in bold when they differ by a point or more."""
    a, b = f"{stream:.1f}", f"{scratch:.1f}"
    if stream - scratch >= 1.0:
        a = f"**{a}**"
    elif scratch - stream >= 1.0:
        b = f"**{b}**"
    return f"{a} / {b}"


@renderer("stream_summary")
def stream_summary(result: Dict) -> str:
    """``benchmark.py stream``: mIoU streamed / from scratch at each budget and from scratch at the references."""
    budgets = result["budgets"]
    first = next(iter(result["recipes"].values()))["runs"]
    refs = [r["name"] for r in first if not r["streaming"] and not r["name"].startswith("scratch @")]
    rows = []
    for rec in result["recipes"].values():
        by_name = {r["name"]: r for r in rec["runs"]}
        cells = [_pair(by_name[f"stream @{b}"]["miou"], by_name[f"scratch @{b}"]["miou"]) for b in budgets]
        cells += [f"{by_name[n]['miou']:.1f} ({by_name[n]['evals_per_frame']:.1f} evals, "
                  f"{by_name[n]['ms_per_frame']:.0f} ms)" for n in refs]
        rows.append([rec["label"], *cells])
    return _table(["recipe", *(f"stream / scratch @{b}" for b in budgets), *refs],
                  "l" + "r" * (len(budgets) + len(refs)), rows)


# ------------------------------------------------------------------------------------------------ own data, default job
@renderer("owndata")
def owndata(result: Dict) -> str:
    """``benchmark.py owndata``: its own Markdown (one table per data set)."""
    from .own_data import to_markdown

    return to_markdown(result)


@renderer("default_job")
def default_job(result: Dict) -> str:
    """The default job's ``metrics.json``: the figures the quickstart quotes (its time depends on the machine's
    load, so it is left to the run's record)."""
    r = result
    return _table(["model", "recipe", "epochs", "steps", "val top-1", "best val top-1", "val top-5",
                   "solver steps / image", "rel. residual"], "llrrrrrrr",
                  [[r["model"], r.get("recipe") or "-", str(r["epochs"]), str(r["steps"]), f"{r['val_top1']:.2f}",
                    f"{r['best_val_top1']:.2f}", f"{r['val_top5']:.2f}", f"{r['deq_nstep_mean']:.1f}",
                    f"{r['deq_rel_residual_mean']:.4f}"]])


# ------------------------------------------------------------------------------------------------ cell
_CELL_VARIANTS = {"eager": "eager", "channels_last": "channels-last", "compiled": "compiled",
                  "channels_last_compiled": "channels-last + compiled", "bf16": "bf16"}


@renderer("cell")
def cell(result: Dict) -> str:
    """``benchmark.py cell``: ms per f-evaluation per variant, the speed-up over eager in brackets."""
    variants = [v for v in _CELL_VARIANTS if any(r["variant"] == v for r in result["rows"])]
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["model"], r["input"], r["batch"], r["mode"]), {})[r["variant"]] = r
    def timing(r: Dict) -> str:
        return f"{r['ms']:.1f} ms" if r["variant"] == "eager" else f"{r['ms']:.1f} ({r['speedup']:.2f}x)"

    rows = [[f"{model}, {size} x {batch}", mode, *(timing(by[v]) if v in by else "-" for v in variants)]
            for (model, size, batch, mode), by in groups.items()]
    return _table(["model, input x batch", "mode", *(_CELL_VARIANTS[v] for v in variants)],
                  "ll" + "r" * len(variants), rows)


# ------------------------------------------------------------------------------------------------ training step
_TRAIN_MODES = {"deq": ("DEQ", "= max_iter"), "unroll": ("unrolled", "max_iter / -"), "explicit": ("explicit", "-")}


def _joined(rows: List[Dict], key: str, digits: int) -> str:
    return " / ".join(f"{r[key]:.{digits}f}" for r in rows)


@renderer("training_step")
def training_step(result: Dict) -> str:
    """``benchmark.py train``: samples/s and memory of DEQ and unrolled steps at each budget (one row per mode,
    the budgets side by side), the explicit baseline, and the data pipeline alone."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in result["rows"]:
        if r["mode"] in _TRAIN_MODES:
            groups.setdefault((r["mode"], r["model"]), []).append(r)
    rows = []
    for (mode, model), rs in sorted(groups.items(), key=lambda g: list(_TRAIN_MODES).index(g[0][0])):
        label, nfe = _TRAIN_MODES[mode]
        iters = " / ".join(str(r["max_iter"]) for r in rs) if mode != "explicit" else "-"
        rows.append([model, label, iters, nfe, _joined(rs, "samples_per_s", 2), _joined(rs, "peak_mb", 0),
                     _joined(rs, "saved_mb", 0)])
    d = result.get("pipeline")
    if d:
        rows.append([f"data pipeline ({d['workers']} loader workers)", "decode + augment", "-", "-",
                     f"{d['images_per_s']:.0f} images/s", "-", "-"])
    return _table(["model", "mode", "max_iter", "f-evals fwd / bwd", "samples/s", "peak MB", "autograd-saved MB"],
                  "lllrrrr", rows)


@renderer("fast_recipe")
def fast_recipe(result: Dict) -> str:
    """``benchmark.py train``: the fast recipe's step against the original's, the Anderson/IFT step and the
    unrolled one at the smallest budget, and the explicit baseline (time relative to it)."""
    rows = result["rows"]
    smallest = min((r["max_iter"] for r in rows if r["mode"] == "deq"), default=None)
    picked = [("official", None, "the original's Broyden"), ("deq", smallest, f"Anderson {smallest} / IFT {smallest}"),
              ("unroll", smallest, f"unrolled, depth {smallest}"), ("fast", None, "fast recipe"),
              ("explicit", None, "explicit")]
    base = next((r for r in rows if r["mode"] == "explicit"), None)
    out = []
    for mode, k, label in picked:
        r = next((r for r in rows if r["mode"] == mode and (k is None or r["max_iter"] == k)), None)
        if r is None:
            continue
        nfe = "-" if mode == "explicit" else f"{r['fwd_nfe']} / {r['bwd_nfe'] or '-'}"
        ratio = f"{r['step_s'] / base['step_s']:.1f}x" if base else "-"
        out.append([r["model"], label, nfe, f"{r['step_s']:.2f}", ratio, f"{r['peak_mb']:.0f}"])
    return _table(["model", "mode", "f-evals fwd / bwd", "step s", f"vs {base['model'] if base else 'baseline'}",
                   "peak MB"], "llrrrr", out)


# ------------------------------------------------------------------------------------------------ segmentation
@renderer("segmentation")
def segmentation(result: Dict) -> str:
    """``benchmark.py seg``: eval forward time, f-evaluations, time per f-evaluation and peak memory per input."""
    rows = []
    for r in result["rows"]:
        mode = f"DEQ ({r['solver']})" if r["mode"] == "deq" else "unrolled"
        rows.append([r["input"], mode, str(r["nfe"]), f"{r['forward_ms'] / 1000:.2f} s",
                     f"{r['forward_ms'] / max(r['nfe'], 1):.0f} ms", f"{r['peak_mb']:.0f}"])
    return _table(["input", "mode", "f-evals", "forward", "per f-eval", "peak MB"], "llrrrr", rows)


# ------------------------------------------------------------------------------------------------ solvers
@renderer("solvers")
def solvers(result: Dict) -> str:
    """``benchmark.py solvers``: "f-evaluations / overhead ratio" per problem and solver (TorchDEQ's columns when it
    was installed); a solver that left samples short of the tolerance is marked."""
    names = list(dict.fromkeys(r["solver"] for r in result["rows"]))
    described = {p["name"]: p["description"] for p in result.get("problems", [])}
    by = {(r["problem"], r["solver"]): r for r in result["rows"]}
    rows = []
    for problem in dict.fromkeys(r["problem"] for r in result["rows"]):
        cells = []
        for s in names:
            r = by.get((problem, s))
            if r is None:
                cells.append("-")
                continue
            short = "" if r["converged"] >= 1.0 else f" ({r['converged']:.0%} reached)"
            cells.append(f"{r['nfe']} / {r['overhead_ratio']:.2f}{short}")
        rows.append([described.get(problem, problem), *cells])
    header = [n.replace("torchdeq.", "TorchDEQ ") for n in names]
    return _table(["problem", *header], "l" + "r" * len(names), rows)


# ------------------------------------------------------------------------------------------------ budget
def _budget_rows(result: Dict) -> List[Dict]:
    return [r for r in result["methods"].values() if "budgets" in r]


@renderer("budget")
def budget(result: Dict) -> str:
    """``benchmark.py budget``: val top-1 at k f-evaluations and at convergence, training time and memory per
    method; then one training step's memory at equal depth (DEQ against the stack) when it was measured."""
    evals = result["settings"]["evals"]
    rows = []
    for r in _budget_rows(result):
        cells = [f"{b['top1']:.1f}" + ("" if b["exact"] else f" ({b['nfe']} f)") for b in r["budgets"]]
        c = r["converged"]
        n = c["deq_nstep_mean"]
        steps = {"unroll": f"depth {n:.0f}",
                 "consistency": f"{n:.0f} student step{'s' * (n != 1)}"}.get(c.get("solver"), f"{n:.1f}")
        train = _fmt(r.get("train_seconds"), 0) + (" (distil)" if r.get("recipe", "").startswith("distill") else "")
        rows.append([r["label"], *cells, f"{c['top1']:.1f} ({steps})", train, _fmt(r.get("peak_mb"), 0)])
    text = _table(["method", *(f"@{k}" for k in evals), "converged (steps)", "train s", "peak MB"],
                  "l" + "r" * (len(evals) + 3), rows)
    mem = result.get("memory")
    if mem:
        by = {(m["mode"], m["max_iter"]): m for m in mem["rows"]}
        depths = sorted({m["max_iter"] for m in mem["rows"]})
        text += "\n\n" + _table(
            ["depth", "DEQ step peak MB", "stack step peak MB", "DEQ autograd-saved MB", "stack autograd-saved MB"],
            "rrrrr", [[str(d), *(_fmt(by.get((mode, d), {}).get(key), 0) for key in ("peak_mb", "saved_mb")
                                 for mode in ("deq", "unroll"))] for d in depths])
    return text


@renderer("budget_latency")
def budget_latency(result: Dict) -> str:
    """``benchmark.py budget``: top-1 and ms per image (batch 1 / 64) at each budget and at the official setting,
    for the plain DEQ and the fast recipe (every method's latency is in the run's budget.md)."""
    evals = result["settings"]["evals"]
    rows = []
    for key in ("plain", "fast"):
        r = result["methods"].get(key)
        if not r or "budgets" not in r:
            continue
        o = r.get("official")
        rows.append([f"{r['label']}: top-1", *(f"{b['top1']:.1f}" for b in r["budgets"]),
                     f"{o['top1']:.1f} ({o['deq_nstep_mean']:.1f} steps)" if o else "-"])
        rows.append([f"{r['label']}: ms / image, batch 1 / 64",
                     *(f"{_fmt(b.get('ms_per_image_b1'), 2)} / {_fmt(b.get('ms_per_image_b64'), 2)}"
                       for b in r["budgets"]),
                     f"{_fmt(o.get('ms_per_image_b1'), 2)} / {_fmt(o.get('ms_per_image_b64'), 2)}" if o else "-"])
    return _table(["method", *(f"@{k}" for k in evals), "official Broyden"], "l" + "r" * (len(evals) + 1), rows)


# ------------------------------------------------------------------------------------------------ models
@renderer("models")
def models(result: Dict) -> str:
    """``benchmark.py models``: eval forward per model and solver, its time per f-evaluation and what each
    solver adds per f-evaluation to fixed-point iteration's (the solver's own work; with ``--tol 0`` every
    solver makes its whole budget)."""
    rows = []
    by_model: Dict[tuple, List[Dict]] = {}
    for r in result["rows"]:
        by_model.setdefault((r["model"], r["input"], r["batch"]), []).append(r)
    for (model, size, batch), rs in by_model.items():
        per_f = {r["solver"]: r["forward_ms"] / max(r["nfe"], 1) for r in rs}
        base = per_f.get("fixed_point")
        for r in rs:
            extra = ("-" if base is None or r["solver"] in ("fixed_point", "unroll")
                     else f"{per_f[r['solver']] - base:+.1f} ms ({(per_f[r['solver']] - base) / base:+.2f}x)")
            rows.append([f"{model}, {size} x {batch}", r["solver"], str(r["nfe"]), f"{r['forward_ms']:.0f}",
                         f"{per_f[r['solver']]:.1f}", extra])
    return _table(["model, input x batch", "solver", "f-evals", "forward ms", "ms / f-eval",
                   "added per f-eval vs fixed point"], "llrrrr", rows)
