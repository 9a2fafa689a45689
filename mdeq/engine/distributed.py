"""torchrun / DistributedDataParallel plumbing: process-group setup, rank-0 helpers, all-reduced numbers.

Launch with ``torchrun --nproc_per_node=N tools/train_cls.py ...``: the environment variables torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) select DDP, with nccl on CUDA and gloo on CPU.
Without them everything runs in one process and the helpers are no-ops.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "all_reduce_sum", "broadcast_object",
           "launched_by_torchrun", "shared_run_stamp", "main_print"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, its device, and whether it logs and writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def main_print(env: DistEnv) -> Callable[..., None]:
    """``print`` on the main process, a no-op on the others (one report per job)."""
    return print if env.is_main else (lambda *args, **kwargs: None)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} was asked for but CUDA is not available; use device=cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    if not launched_by_torchrun():
        return DistEnv(device=_pick_device(device, 0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> list:
    """Sum a few numbers over all ranks (float64, so counts and sums stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if env.distributed:
        t = t.to(env.device) if env.device.type == "cuda" else t
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s value of a picklable object, on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_STAMP: Optional[str] = None


def shared_run_stamp(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """A timestamp that is the same in every process of a torchrun job (cached per process).

    Used for the run folder before the process group exists: rank 0 publishes its time in torchrun's
    rendezvous store and the other ranks read it, so all ranks name one output folder.
    """
    global _STAMP
    if _STAMP is not None:
        return _STAMP
    stamp = time.strftime(fmt)
    if launched_by_torchrun() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=120))
            key = (f"mdeq/run_stamp/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                   f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
            if int(os.environ["RANK"]) == 0:
                store.set(key, stamp)
            stamp = store.get(key).decode()
        except Exception:  # an unusual launcher: each rank keeps its own stamp; rank 0's folder is still used
            pass
    _STAMP = stamp
    return stamp
