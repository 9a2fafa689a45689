"""Running means of a training window (loss, throughput, solver statistics) for TensorBoard, and the time the
training loop waits for its loader."""
from __future__ import annotations

import time
from typing import Dict, Optional

from ..core import SolverStats

__all__ = ["StatsWindow", "LoaderWaitClock"]


class StatsWindow:
    """Sums over the steps since the last log point; ``scalars`` turns them into the logged means."""

    def __init__(self):
        self.t = time.perf_counter()
        self.loss = 0.0
        self.n = 0
        self.samples = 0
        self.nstep = self.rel = self.bnstep = self.jac = 0.0
        self.bn = self.jn = 0
        self.diverged = 0
        self.last_loss = 0.0
        self.task_loss = 0.0  # the task's loss alone (no DEQ terms), summed
        self.data_seconds = 0.0  # time the window waited for the loader (set by the loop)

    def add(self, loss: float, samples: int, stats: Optional[SolverStats], task_loss: Optional[float] = None) -> int:
        """One optimizer step: its loss (and ``task_loss``, without the DEQ terms; default the same), the samples it
        saw and the forward's solver statistics; returns the number of samples whose solve diverged in this step."""
        self.loss += loss
        self.task_loss += loss if task_loss is None else task_loss
        self.n += 1
        self.samples += samples
        if stats is None:
            return 0
        self.nstep += stats.nstep.float().mean().item()
        self.rel += stats.rel_residual.float().mean().item()
        diverged = int(stats.diverged.sum())
        self.diverged += diverged
        if stats.backward is not None:
            self.bnstep += stats.backward.nstep.float().mean().item()
            self.bn += 1
        if stats.jac_loss is not None:
            self.jac += float(stats.jac_loss.detach())
            self.jn += 1
        return diverged

    def deq_scalars(self) -> Dict[str, float]:
        """``deq/fwd/nstep``, ``deq/fwd/rel_residual``, ``deq/fwd/diverged`` (samples of the window whose solve
        diverged, this rank) and, when measured, ``deq/bwd/nstep``, ``deq/jac_loss``."""
        k = max(self.n, 1)
        out = {"deq/fwd/nstep": self.nstep / k, "deq/fwd/rel_residual": self.rel / k,
               "deq/fwd/diverged": float(self.diverged)}
        if self.bn:
            out["deq/bwd/nstep"] = self.bnstep / self.bn
        if self.jn:
            out["deq/jac_loss"] = self.jac / self.jn
        return out

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t, 1e-9)


class LoaderWaitClock:
    """Seconds a loop waits for its loader's next batch (``timed(loader)``), the first batch (workers starting)
    not counted; ``take()`` returns the wait since the last ``take``, ``total`` all of it."""

    def __init__(self):
        self.total = 0.0
        self._taken = 0.0

    def timed(self, loader):
        it, first = iter(loader), True
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            if not first:
                self.total += time.perf_counter() - t
            first = False
            yield batch

    def take(self) -> float:
        waited, self._taken = self.total - self._taken, self.total
        return waited
