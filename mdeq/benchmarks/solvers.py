"""Solver benchmark: f-evaluations and wall time to a tolerance, and the solver-overhead ratio.

Problems (batch 8 each):

* ``linear_rho{0.9,0.95,0.99}``: z = A z + b with A = Q diag(linspace(-rho, rho)) Q^T, D = 1024;
* ``sym_conv_0.95``: z = tanh(s A^T A z + x), A a 3x3 conv (16 channels, 32x32), s such that the top eigenvalue
  of s A^T A is 0.95 (power iteration), x ~ 0.1 N(0, 1);
* ``mdeq_block``: the MDEQ residual block as the realistic cell, 32 channels at 56x56 (1e5 values per sample):
  relu(GN(conv3x3 32->160 (z))), GN(conv3x3 160->32 (.) + x), + z, GN(relu(.)); the GroupNorms keep it contractive.

Every solver runs with ``stop_mode='rel'`` to ``tol`` from z0 = 0 under ``torch.no_grad()``.
Reported per (problem, solver): f-evaluations of the batch (``nfe``), mean per-sample steps, the fraction of
converged samples, the median wall time, and the **overhead ratio** = wall time / (nfe x t_f), where t_f is the
median time of one f-evaluation measured by chaining f with nothing else in the loop.

Timing method: one warm-up run of everything, then ``repeats`` rounds in which every solver and the bare-f loop
run once each in turn (interleaved, so drift on a shared machine hits all of them alike); medians over rounds.
glibc returns large freed blocks to the OS (and maps big allocations fresh) by default, so every iteration
would page-fault its tensors in again, inflating t_f by up to 2x on these machines; ``keep_heap()`` raises
M_MMAP_THRESHOLD to its 32 MiB maximum and M_TRIM_THRESHOLD to 1 GiB via mallopt before timing.

When ``torchdeq`` (PyPI) is importable, its ``fixed_point_iter``, ``anderson`` (defaults m=6, lam=1e-4) and
``broyden`` run on the same problems side by side (their loop stops when the whole batch meets tol).
"""
from __future__ import annotations

import ctypes
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mdeq.core import get_solver

__all__ = ["keep_heap", "make_problems", "run", "to_markdown"]

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_heap() -> bool:
    """Keep freed memory in the process heap (glibc only). Returns whether both settings took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    return bool(ok_mmap and ok_trim)


@dataclass
class Problem:
    name: str
    description: str
    f: Callable[[torch.Tensor], torch.Tensor]
    z0: torch.Tensor
    max_iter: int


def _linear(rho: float, dim: int, batch: int, gen: torch.Generator) -> Problem:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    a = (q @ torch.diag(torch.linspace(-rho, rho, dim, dtype=torch.float64)) @ q.T).float()
    b = torch.randn(batch, dim, generator=gen)
    return Problem(f"linear_rho{rho}", f"z = Az + b, real spectrum in [-{rho}, {rho}], D={dim}, batch {batch}",
                   lambda z: torch.addmm(b, z, a.T), torch.zeros(batch, dim), 1500)


def _sym_conv(batch: int, ch: int, size: int, gen: torch.Generator, radius: float = 0.95) -> Problem:
    w = torch.randn(ch, ch, 3, 3, generator=gen) / (3 * ch**0.5)
    x = 0.1 * torch.randn(batch, ch, size, size, generator=gen)

    def ata(z):
        return F.conv_transpose2d(F.conv2d(z, w, padding=1), w, padding=1)

    v = torch.randn(1, ch, size, size, generator=gen)
    for _ in range(200):  # power iteration for the top eigenvalue of A^T A (symmetric PSD)
        v = ata(v)
        top = v.norm()
        v = v / top
    s = radius / top.item()
    return Problem(f"sym_conv_{radius}", f"z = tanh(s A^T A z + x), A 3x3 conv, {ch}x{size}x{size}, batch {batch}",
                   lambda z: torch.tanh(s * ata(z) + x), torch.zeros(batch, ch, size, size), 400)


class MDEQStyleBlock(nn.Module):
    """The MDEQ residual block (without dropout and weight norm) with its injection x."""

    def __init__(self, ch: int, expansion: int = 5, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch * expansion, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, ch * expansion)
        self.conv2 = nn.Conv2d(ch * expansion, ch, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, ch)
        self.gn3 = nn.GroupNorm(groups, ch)

    def forward(self, z, x):
        out = F.relu(self.gn1(self.conv1(z)))
        out = self.gn2(self.conv2(out) + x)
        return self.gn3(F.relu(out + z))


def _mdeq_block(batch: int, ch: int, size: int, gen: torch.Generator) -> Problem:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    block = MDEQStyleBlock(ch).eval()
    x = torch.randn(batch, ch, size, size, generator=gen)
    return Problem("mdeq_block", f"MDEQ residual block, {ch}->{5 * ch}->{ch} ch, {size}x{size}, batch {batch}",
                   lambda z: block(z, x), torch.zeros(batch, ch, size, size), 200)


def make_problems(quick: bool = False, seed: int = 0) -> List[Problem]:
    """The benchmark suite; ``quick`` shrinks every problem (for tests), keeping its structure."""
    gen = torch.Generator().manual_seed(seed)
    if quick:
        return [_linear(0.9, 64, 2, gen), _sym_conv(2, 4, 8, gen), _mdeq_block(2, 8, 8, gen)]
    return [_linear(rho, 1024, 8, gen) for rho in (0.9, 0.95, 0.99)] + [
        _sym_conv(8, 16, 32, gen),
        _mdeq_block(8, 32, 56, gen),
    ]


def _our_solvers() -> Dict[str, Callable]:
    def make(name):
        solver = get_solver(name)

        def run(f, z0, max_iter, tol):
            _, stats = solver(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel")
            return stats.nfe, stats.nstep.float().mean().item(), stats.converged.float().mean().item()

        return run

    return {name: make(name) for name in ("fixed_point", "anderson", "broyden")}


def _torchdeq_solvers() -> Dict[str, Callable]:
    try:
        from torchdeq.solver import get_solver as tdq_get_solver
    except Exception:  # not installed (it is optional), or broken on this torch
        return {}

    def make(key):
        solver = tdq_get_solver(key)

        def run(f, z0, max_iter, tol):
            calls = [0]

            def counted(z):
                calls[0] += 1
                return f(z)

            _, _, info = solver(counted, z0, max_iter=max_iter, tol=tol, stop_mode="rel")
            rel = info["rel_lowest"].flatten()
            return calls[0], info["nstep"].float().mean().item(), (rel < tol).float().mean().item()

        return run

    return {f"torchdeq.{key}": make(key) for key in ("fixed_point_iter", "anderson", "broyden")}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(quick: bool = False, repeats: int = 5, tol: float = 1e-4, threads: Optional[int] = None,
        progress: Callable[[str], None] = print) -> Dict:
    """Run the suite; returns a JSON-able dict with one row per (problem, solver)."""
    heap_kept = keep_heap()
    if threads:
        torch.set_num_threads(threads)
    solvers = {**_our_solvers(), **_torchdeq_solvers()}
    rows = []
    with torch.no_grad():
        for prob in make_problems(quick):
            progress(f"[{prob.name}] {prob.description}")
            chain = 20 if not quick else 3

            def bare_f(prob=prob, chain=chain):
                z = prob.z0
                for _ in range(chain):
                    z = prob.f(z)

            results = {name: [] for name in solvers}
            counts = {}
            f_times = []
            for rnd in range(repeats + 1):  # round 0 is the warm-up
                f_times.append(_time(bare_f) / chain)
                for name, solve in solvers.items():
                    t0 = time.perf_counter()
                    counts[name] = solve(prob.f, prob.z0, prob.max_iter, tol)
                    results[name].append(time.perf_counter() - t0)
            t_f = statistics.median(f_times[1:])
            for name in solvers:
                nfe, nstep, conv = counts[name]
                wall = statistics.median(results[name][1:])
                row = dict(problem=prob.name, solver=name, nfe=nfe, mean_nstep=round(nstep, 2), converged=conv,
                           wall_ms=round(wall * 1e3, 3), f_ms=round(t_f * 1e3, 3),
                           overhead_ratio=round(wall / (nfe * t_f), 3))
                rows.append(row)
                progress(f"  {name:28s} nfe={nfe:5d} converged={conv:4.2f} wall={row['wall_ms']:9.1f} ms "
                         f"ratio={row['overhead_ratio']:.3f}")
    return dict(
        rows=rows,
        settings=dict(tol=tol, stop_mode="rel", repeats=repeats, quick=quick, heap_kept=heap_kept,
                      threads=torch.get_num_threads()),
        environment=dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                         processor=platform.processor(), torchdeq=_torchdeq_version()),
        problems=[dict(name=p.name, description=p.description) for p in make_problems(quick)],
    )


def _torchdeq_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("torchdeq")
    except Exception:
        return None


def to_markdown(result: Dict) -> str:
    """A table per problem: solver, nfe, steps, converged, wall ms, overhead ratio."""
    lines = [f"Solver benchmark (rel tol {result['settings']['tol']}, median of {result['settings']['repeats']}, "
             f"torch {result['environment']['torch']}, {result['settings']['threads']} threads, "
             f"torchdeq {result['environment']['torchdeq'] or 'not installed'})", ""]
    lines += ["| problem | solver | nfe | mean steps | converged | wall ms | t_f ms | overhead |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['problem']} | {r['solver']} | {r['nfe']} | {r['mean_nstep']} | {r['converged']:.2f} | "
                     f"{r['wall_ms']:.1f} | {r['f_ms']:.2f} | {r['overhead_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def save(result: Dict, out_dir: Path) -> Dict[str, Path]:
    from .report import save_report

    return save_report(result, out_dir, "solvers", to_markdown)

