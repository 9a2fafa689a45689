"""Loading any dataset for training and evaluation, task-independent.

* ``SeededDataset``: each item's augmentation is a pure function of (seed, epoch, index), whatever the worker
  count, prefetching or where a run resumed;
* ``ResumableSampler``: the (seed, epoch)-shuffled ``DistributedSampler`` that skips the samples a run killed
  mid-epoch had already trained on;
* ``ShardSampler``: an exact split of an eval set over the ranks (no padding duplicates);
* ``resolve_workers``: the loader workers of ``data.workers`` (null: what the machine has).
"""
from __future__ import annotations

import math
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["SeededDataset", "ResumableSampler", "ShardSampler", "build_train_loader", "build_eval_loader",
           "steps_per_epoch", "resolve_workers", "available_cores", "MAX_AUTO_WORKERS"]


class SeededDataset(Dataset):
    """Makes a dataset's random augmentation a function of (seed, epoch, index).

    Each item is produced under its own seed for torch, ``random`` and numpy, and the caller's RNG states
    are restored afterwards, so results do not depend on worker count, prefetching or where a run resumed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def item_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])

    def __getitem__(self, index: int):
        seed = self.item_seed(index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (per-epoch shuffle from ``seed + epoch``) that can skip the samples already seen.

    ``set_epoch(epoch, skip=n)`` drops this rank's first ``n`` indices of that epoch's order, which is how a
    run killed mid-epoch continues with exactly the batches it had not trained on.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``: an exact split of an eval set (no padding duplicates)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


MAX_AUTO_WORKERS = 8  # the most loader workers a process gets when data.workers is left to the machine


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: Any = None) -> int:
    """Loader workers per process: ``workers`` when given (an integer >= 0), else (null) what the machine has: the
    cores this process may use, shared by the processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), at
    most ``MAX_AUTO_WORKERS`` (torch warns when a loader has more workers than cores)."""
    if workers is None:
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
        return max(1, min(MAX_AUTO_WORKERS, available_cores() // local))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"data.workers must be an integer >= 0 (0: load in the training process) or null (the "
                         f"cores this process may use), got {workers!r}")
    return workers


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def build_train_loader(dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                       workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """Shuffled, seeded, resumable loader; full batches only (BatchNorm and mixup want equal batch sizes)."""
    if len(dataset) < batch_size * num_replicas:  # type: ignore[arg-type]
        raise ValueError(f"the train set has {len(dataset)} images, fewer than one global batch "
                         f"({batch_size} x {num_replicas} processes); lower data.batch_size")
    seeded = SeededDataset(dataset, seed)
    sampler = ResumableSampler(seeded, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # a private generator: creating an iterator must not consume the global RNG (dropout masks, Jacobian
    # probes), or a run resumed mid-epoch would draw different numbers than an uninterrupted one
    return DataLoader(seeded, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=True, worker_init_fn=_worker_init if workers else None,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def build_eval_loader(dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, workers: int = 2,
                      pin_memory: bool = False, collate_fn=None) -> DataLoader:
    """In-order loader over this rank's exact shard of the eval set."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), num_replicas, rank),
                      num_workers=workers, pin_memory=pin_memory, collate_fn=collate_fn,
                      worker_init_fn=_worker_init if workers else None, generator=torch.Generator().manual_seed(0))


def steps_per_epoch(loader: DataLoader) -> int:
    """Batches in one full epoch of a train loader (independent of any skip in progress)."""
    sampler = loader.sampler
    n = sampler.num_samples if isinstance(sampler, DistributedSampler) else len(sampler)  # type: ignore[arg-type]
    return n // loader.batch_size if loader.drop_last else math.ceil(n / loader.batch_size)
