"""Precise BatchNorm: recompute BatchNorm statistics at the current weights before an evaluation.

The running averages lag behind weights that still move fast (a short schedule, or Adam on small weights); Wu &
Johnson, "Rethinking 'Batch' in BatchNorm" (2021). The images are a fixed random subset of the task's
``bn_dataset`` (drawn once from the seed, so the result is reproducible), split in equal shards over the ranks, so
every rank runs the same number of (SyncBN) batches.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.loaders import build_eval_loader
from .distributed import DistEnv

__all__ = ["PreciseBN"]


class PreciseBN:
    """``PreciseBN(...)(model)`` recomputes the statistics from ``batches`` batches (0: does nothing)."""

    def __init__(self, dataset: Callable[[], Dataset], batches: int, batch_size: int, seed: int, env: DistEnv,
                 workers: int = 2, channels_last: bool = False):
        self.dataset, self.batches, self.batch_size, self.seed = dataset, int(batches or 0), batch_size, seed
        self.env, self.workers, self.channels_last = env, workers, channels_last
        self._loader: Optional[DataLoader] = None

    def _build(self) -> DataLoader:
        data = self.dataset()
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))
        world = self.env.world_size
        count = min(self.batches * self.batch_size * world, len(data) // world * world)
        return build_eval_loader(Subset(data, order[:count].tolist()), self.batch_size, world, self.env.rank,
                                 workers=self.workers)

    def __call__(self, model: nn.Module) -> None:
        if self.batches <= 0:
            return
        if self._loader is None:
            self._loader = self._build()

        def images():
            for batch, _ in self._loader:
                batch = batch.to(self.env.device)
                yield batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

        update_bn(images(), model)
