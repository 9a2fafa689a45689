"""The budget benchmark's report: its three targets (met or not, with the numbers behind each), the Markdown
table and the accuracy-vs-f-evaluations plot."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from ..report import fmt_number as _fmt
from ..report import save_report
from .evaluation import CONVERGE_MAX_ITER

__all__ = ["REACH_TOLERANCE", "NEAR_POINTS", "FAST_POINTS", "FAST_SPEEDUP", "compute_targets", "fast_point",
           "to_markdown", "plot", "save"]

REACH_TOLERANCE = 0.5      # "reaches plain's accuracy": within this many points of it
NEAR_POINTS = 2.0          # the C-DEQ / Skip DEQ target: within 2 points of plain at convergence
FAST_POINTS, FAST_SPEEDUP = 1.0, 10.0  # an operating point within 1 point of the official setting, 10x faster


def _top1_at(row: Dict, k: int) -> Optional[float]:
    for b in row.get("budgets", []):
        if b["evals"] == k:
            return b["top1"]
    return None


def _reach(row: Dict, target: float) -> Optional[int]:
    """The smallest budget at which ``row`` is within REACH_TOLERANCE points of ``target``."""
    for b in row.get("budgets", []):
        if b["top1"] >= target - REACH_TOLERANCE:
            return b["evals"]
    return None


def compute_targets(result: Dict) -> Dict:
    """The issue's three targets as met / not met, with the numbers behind each."""
    rows, out = result["methods"], {}
    plain = rows.get("plain", {})
    ref = plain.get("converged", {}).get("top1")
    # 1. C-DEQ and Skip DEQ with 1-2 f-evaluations within 2 points of plain DEQ at convergence
    if ref is not None:
        per = {}
        for name in ("cdeq", "skip"):
            if "budgets" not in rows.get(name, {}):
                continue
            at = {k: _top1_at(rows[name], k) for k in (1, 2)}
            ok = {k: v is not None and v >= ref - NEAR_POINTS for k, v in at.items()}
            per[name] = dict(top1_at_1=at[1], top1_at_2=at[2], within_at_1=ok[1], within_at_2=ok[2],
                             met=ok[1] or ok[2])
        if per:
            out["cheap_inference"] = dict(plain_converged=ref, points=NEAR_POINTS, methods=per,
                                          met=all(p["met"] for p in per.values()))
    # 2. JR reaches plain DEQ's accuracy with about half the f-evaluations
    if ref is not None and "budgets" in rows.get("jr", {}):
        k_plain = _reach(plain, ref)
        plain_from = "budget"
        if k_plain is None:  # not within the budgets: its steps at convergence
            k_plain, plain_from = plain["converged"]["fevals_mean"], "mean steps at convergence"
        k_jr = _reach(rows["jr"], ref)
        jr_steps, plain_steps = rows["jr"]["converged"]["fevals_mean"], plain["converged"]["fevals_mean"]
        out["jr_half_evals"] = dict(plain_converged=ref, tolerance=REACH_TOLERANCE, plain_evals=k_plain,
                                    plain_evals_from=plain_from, jr_evals=k_jr,
                                    jr_converged=rows["jr"]["converged"]["top1"],
                                    jr_converged_steps=jr_steps, plain_converged_steps=plain_steps,
                                    converged_steps_ratio=round(jr_steps / plain_steps, 2) if plain_steps else None,
                                    met=k_jr is not None and k_jr <= k_plain / 2)
    # 4. an operating point >= 10x faster than the official setting with at most 1 point lost
    fast = fast_point(result)
    if fast:
        out["fast_inference"] = fast
    # 3. DEQ training memory below the residual stack's at equal depth
    if result.get("memory"):
        depths = {}
        mem = {(r["mode"], r["max_iter"]): r for r in result["memory"]["rows"]}
        for (mode, d), r in sorted(mem.items()):
            if mode == "deq" and ("unroll", d) in mem:
                u = mem[("unroll", d)]
                depths[d] = dict(deq_peak_mb=r["peak_mb"], stack_peak_mb=u["peak_mb"], deq_saved_mb=r["saved_mb"],
                                 stack_saved_mb=u["saved_mb"],
                                 met=r["peak_mb"] < u["peak_mb"] and r["saved_mb"] < u["saved_mb"])
        procs = {n: rows[n].get("peak_mb") for n in ("plain", "stack") if rows.get(n, {}).get("peak_mb") is not None}
        if depths:
            out["memory"] = dict(depths=depths, process_peak_mb=procs, met=all(d["met"] for d in depths.values()))
    return out



def fast_point(result: Dict, batch: str = "b1") -> Optional[Dict]:
    """The fastest (method, budget) at batch 1 within FAST_POINTS of the official setting's accuracy, against the
    official setting (the original's Broyden from zeros with its thresholds) on plain DEQ's weights."""
    rows = result["methods"]
    ref_row = rows.get("plain") if (rows.get("plain") or {}).get("official") else next(
        (r for r in rows.values() if r.get("official")), None)
    if ref_row is None:
        return None
    ref = ref_row["official"]
    key = f"ms_per_image_{batch}"
    best = None
    for name, r in rows.items():
        for b in r.get("budgets", []):
            if b.get(key) is not None and b["top1"] >= ref["top1"] - FAST_POINTS and (best is None or
                                                                                       b[key] < best["ms"]):
                best = dict(method=name, label=r["label"], evals=b["evals"], top1=b["top1"], ms=b[key],
                            ms_b64=b.get("ms_per_image_b64"))
    if best is None:
        return dict(official=ref, reference=ref_row["label"], point=None, met=False)
    speedup = ref[key] / best["ms"]
    return dict(official=ref, reference=ref_row["label"], point=best, speedup=round(speedup, 1),
                points=FAST_POINTS, target=FAST_SPEEDUP, met=speedup >= FAST_SPEEDUP)


def _yes(flag: bool) -> str:
    return "**met**" if flag else "**not met**"


def to_markdown(result: Dict) -> str:
    s, rows = result["settings"], result["methods"]
    evals = s["evals"]
    first = next((r for r in rows.values() if "budgets" in r), {})
    size = "x".join(str(v) for v in first.get("input_size", [3, 16, 16])[1:])
    data = f"ImageFolder {s['data_root']}" if s["data_root"] else "the bundled digits"
    epochs = s["epochs"] or "the recipes'"
    reused = sum(1 for r in rows.values() if r.get("reused"))
    lines = [f"Budget benchmark: mdeq_tiny on {data} at {size}, {epochs} epochs per method "
             f"(C-DEQ: {s['distill_epochs']} distillation epochs), {first.get('val_images', '?')} val images; "
             f"{s['jobs']} training(s) at once, {s['threads']} thread(s) each, {result['environment']['cpus']} CPUs, "
             f"torch {result['environment']['torch']}; total wall time {result['wall_s'] / 60:.1f} min"
             + (f" ({reused} of {len(rows)} trainings reused from an earlier invocation)" if reused else ""), "",
             "| method | recipe | " + " | ".join(f"top-1 @{k}" for k in evals)
             + " | converged (mean steps) | train s | process s | process peak MB |",
             "|---|---|" + "---:|" * len(evals) + "---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "budgets" not in r:
            lines.append(f"| {r['label']} | {r['recipe']} | " + " | ".join("-" for _ in evals)
                         + " | failed | - | - | - |")
            continue
        cells = [f"{b['top1']:.1f}" + ("" if b["exact"] else f" ({b['nfe']} f)") for b in r["budgets"]]
        c = r["converged"]
        conv = f"{c['top1']:.1f} ({c['deq_nstep_mean']:.1f})"
        reused = " (reused)" if r.get("reused") else ""
        lines.append(f"| {r['label']} | {r['recipe']}{reused} | " + " | ".join(cells) + f" | {conv} | "
                     f"{_fmt(r.get('train_seconds'), 0)} | {_fmt(r.get('wall_s'), 0)} | {_fmt(r.get('peak_mb'), 0)} |")
    lines += ["", f"top-1 @k: val top-1 (%) with exactly k f-evaluations per forward (`budget_options`: tolerance 0, "
                  "the head sees f's last output; Skip Reg. DEQ spends one on z0 = f(0); the stack is the cell applied "
                  "k times; C-DEQ takes k student steps); \"(n f)\": the solver made n evaluations, not k. "
                  f"Converged: the method's solver with max_iter {s['converge']['max_iter']} and tol "
                  f"{s['converge']['tol']:g} (mean solver steps per image); the stack at its own depth, C-DEQ's "
                  "student at its default steps. Train s: metrics.json `train_seconds` (C-DEQ: the distillation "
                  "only, on top of plain's training); process s / peak MB: wall time and peak RSS (`os.wait4` "
                  "ru_maxrss) of the training process."]
    timed = [(r, b) for r in rows.values() for b in r.get("budgets", []) if b.get("ms_per_image_b1") is not None]
    if timed:
        lines += ["", "Latency: milliseconds per image of an eval forward at batch 1 and at batch 64 (median of 5), "
                      "at each budget and at the preset's official setting (the original's Broyden at the preset's "
                      "thresholds, tolerance and stop mode, from the method's own start).", "",
                  "| method | " + " | ".join(f"@{k} ms b1 / b64" for k in evals) + " | official: top-1, steps, "
                  "ms b1 / b64 |", "|---|" + "---:|" * (len(evals) + 1)]
        for r in rows.values():
            if "budgets" not in r:
                continue
            cells = [f"{_fmt(b.get('ms_per_image_b1'), 2)} / {_fmt(b.get('ms_per_image_b64'), 2)}"
                     for b in r["budgets"]]
            o = r.get("official")
            off = (f"{o['top1']:.1f}, {o['deq_nstep_mean']:.1f}, {_fmt(o.get('ms_per_image_b1'), 2)} / "
                   f"{_fmt(o.get('ms_per_image_b64'), 2)}" if o else "-")
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {off} |")
    mem = result.get("memory")
    if mem:
        ms = mem["settings"]
        lines += ["", f"Memory at equal depth: one training step of mdeq_tiny, batch {ms['batch']} at {ms['size']}x"
                      f"{ms['size']} ({ms['device']}, {ms['threads']} threads; `training.run_one`, each in its own "
                      "process): DEQ (Anderson + IFT, depth forward and backward iterations) vs. the stack (unrolled).",
                  "", "| depth | DEQ step peak MB | stack step peak MB | DEQ autograd-saved MB | "
                      "stack autograd-saved MB |",
                  "|---:|---:|---:|---:|---:|"]
        by = {(r["mode"], r["max_iter"]): r for r in mem["rows"]}
        for d in sorted({r["max_iter"] for r in mem["rows"]}):
            dq, un = by.get(("deq", d), {}), by.get(("unroll", d), {})
            lines.append(f"| {d} | {_fmt(dq.get('peak_mb'))} | {_fmt(un.get('peak_mb'))} | "
                         f"{_fmt(dq.get('saved_mb'))} | {_fmt(un.get('saved_mb'))} |")
        lines.append("Step peak MB: growth of the process's peak RSS over its size before the first step.")
    lines += ["", "Targets", ""]
    t = result["targets"]
    c = t.get("cheap_inference")
    if c:
        parts = [f"{rows[n]['label']} {_fmt(p['top1_at_1'])} at 1, {_fmt(p['top1_at_2'])} at 2 "
                 f"({'within' if p['met'] else 'not within'})" for n, p in c["methods"].items()]
        lines.append(f"- C-DEQ and Skip DEQ at 1-2 f-evaluations within {c['points']:g} points of plain DEQ at "
                     f"convergence ({c['plain_converged']:.1f}): {_yes(c['met'])}: " + "; ".join(parts) + ".")
    else:
        lines.append("- C-DEQ / Skip DEQ at 1-2 f-evaluations: not evaluated (needs plain and cdeq or skip).")
    j = t.get("jr_half_evals")
    if j:
        plain_k = (f"{j['plain_evals']}" if j["plain_evals_from"] == "budget"
                   else f"{_fmt(j['plain_evals'])} ({j['plain_evals_from']})")
        jr_k = j["jr_evals"] if j["jr_evals"] is not None else f"none of {evals}"
        lines.append(f"- JR reaches plain DEQ's accuracy ({j['plain_converged']:.1f}, within {j['tolerance']:g} "
                     f"points) with about half the f-evaluations: {_yes(j['met'])} at equal budgets: plain needs "
                     f"{plain_k}, JR {jr_k}. To convergence (tol {s['converge']['tol']:g}): JR "
                     f"{j['jr_converged_steps']:.1f} mean steps ({j['jr_converged']:.1f}%) vs plain "
                     f"{j['plain_converged_steps']:.1f} ({j['converged_steps_ratio']}x).")
    else:
        lines.append("- JR with half the f-evaluations: not evaluated (needs plain and jr).")
    fi = t.get("fast_inference")
    if fi and fi.get("point"):
        p, o = fi["point"], fi["official"]
        lines.append(f"- An operating point at least {fi['target']:g}x faster than the official setting "
                     f"({o['top1']:.1f}%, {o['ms_per_image_b1']:.2f} ms/image at batch 1 on {fi['reference']}) "
                     f"within {fi['points']:g} point: {_yes(fi['met'])}: {p['label']} at {p['evals']} "
                     f"f-evaluations, {p['top1']:.1f}%, {p['ms']:.2f} ms/image ({fi['speedup']:g}x).")
    elif fi:
        lines.append("- A point within 1 point of the official setting: **not met** (none of the budgets).")
    mm = t.get("memory")
    if mm:
        parts = [f"depth {d}: peak {v['deq_peak_mb']:.1f} vs {v['stack_peak_mb']:.1f} MB, autograd-saved "
                 f"{v['deq_saved_mb']:.1f} vs {v['stack_saved_mb']:.1f} MB" for d, v in mm["depths"].items()]
        procs = mm["process_peak_mb"]
        proc = (f"; whole training processes (plain also runs unrolled, at depth 4, for its first 2 epochs): "
                f"plain {procs['plain']:.0f} MB vs stack {procs['stack']:.0f} MB" if len(procs) == 2 else "")
        lines.append(f"- DEQ training memory below the residual stack's at equal depth: {_yes(mm['met'])}: "
                     + "; ".join(parts) + proc + ".")
    else:
        lines.append("- DEQ vs. stack memory at equal depth: not measured.")
    if result.get("notes"):
        lines += ["", "Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: Path) -> Path:
    """Top-1 vs. f-evaluations (log2 axis), one line per method; convergence as a star at its mean steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, r in enumerate(r for r in result["methods"].values() if "budgets" in r):
        color = f"C{i % 10}"
        xs = [b["nfe"] for b in r["budgets"]]
        ax.plot(xs, [b["top1"] for b in r["budgets"]], "o-", color=color, label=r["label"], ms=4)
        c = r["converged"]
        ax.plot([max(c["fevals_mean"], 0.5)], [c["top1"]], "*", color=color, ms=11, mec="k", mew=0.5)
    ax.set_xscale("log", base=2)
    ticks = sorted(set(result["settings"]["evals"]) | {CONVERGE_MAX_ITER})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("f-evaluations per forward (star: at convergence, mean steps)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("accuracy vs. f-evaluations (mdeq_tiny, same data and training budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save(result: Dict, out_dir: Path, name: str = "budget") -> Dict[str, Path]:
    paths = save_report(result, out_dir, name, to_markdown)
    paths["png"] = plot(result, out_dir / f"{name}.png")
    return paths
