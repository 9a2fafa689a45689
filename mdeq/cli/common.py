"""What the command-line programs share: the Hydra app around a training job, running a job under torchrun,
the output folder, and the DEQ flags by the same names as everywhere else (``--solver``, ``--max-iter``,
``--tol``, ``--stop-mode`` are ``deq.solver``, ``deq.max_iter``, ...)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, TypeVar

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402

from mdeq.core import list_solvers  # noqa: E402
from mdeq.engine.app import register_configs  # noqa: E402
from mdeq.engine.checkpoint import CheckpointError, CheckpointWriteError  # noqa: E402
from mdeq.engine.distributed import DistEnv, broadcast_object, init_distributed, shutdown_distributed  # noqa: E402
from mdeq.engine.legacy import check_overrides  # noqa: E402
from mdeq.engine.model_config import check_kwargs_overrides, without_needless_plus  # noqa: E402

__all__ = ["hydra_tool", "exit_code_main", "reported_errors", "add_job_flags", "run_distributed", "output_folder",
           "add_solver_flags", "solver_changes"]

T = TypeVar("T")


def hydra_tool(config_name: str, job: Callable[[Any], Any]) -> Callable[[], None]:
    """The ``main`` of a Hydra training program: ``job(cfg)`` on ``mdeq/configs/<config_name>.yaml`` and the
    command line. An old setting name on the command line fails with its new name (not Hydra's generic
    "not in struct"); the config groups whose defaults live in the code are registered first."""
    register_configs()

    @hydra.main(version_base="1.3", config_path="../configs", config_name=config_name)
    def app(cfg) -> Any:
        with reported_errors():
            return job(cfg)

    def main() -> None:
        check_overrides(sys.argv[1:])
        sys.argv[1:] = without_needless_plus(sys.argv[1:])  # +model.kwargs.dropout=... as before model_base
        problems = check_kwargs_overrides(sys.argv[1:])
        if problems:
            raise SystemExit("; ".join(problems))
        app()

    return main


def exit_code_main(run: Callable[[Optional[Sequence[str]]], Any]) -> Callable[..., int]:
    """The ``main(argv) -> 0`` (a console script's entry) of a program whose ``run(argv)`` returns its results."""

    def main(argv: Optional[Sequence[str]] = None) -> int:
        with reported_errors():
            run(argv)
        return 0

    return main


@contextmanager
def reported_errors() -> Iterator[None]:
    """End the program with a short message, not a traceback, for what the user fixes outside the code: a file
    that is not usable weights or a checkpoint (it names the file, says what it is and lists the formats
    accepted), a checkpoint that does not fit the job (another architecture or task), or one that could not be
    written (full disk, read-only folder: it names both)."""
    try:
        yield
    except (CheckpointError, CheckpointWriteError) as e:  # WeightsFileError is a CheckpointError
        raise SystemExit(f"error: {e}") from None


def add_job_flags(parser: argparse.ArgumentParser, tool: str, writes: str) -> None:
    """``--workers``, ``--device``, ``--output`` (default ``outputs/<tool>/<time>``, for ``writes``) and
    ``--no-progress``: the flags of every job that loads data, may run under torchrun and writes a folder."""
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", help=f"folder for {writes} (default: outputs/{tool}/<time>)")
    parser.add_argument("--no-progress", action="store_true")


def run_distributed(device: str, job: Callable[[DistEnv], T]) -> T:
    """``job(env)`` in this process's torchrun group (or alone on ``device``); the group is shut down after."""
    env = init_distributed(device)
    try:
        return job(env)
    finally:
        shutdown_distributed()


def output_folder(tool: str, given: Optional[str], env: DistEnv) -> Path:
    """``given``, or ``outputs/<tool>/<time>``; the same folder on every rank."""
    return Path(broadcast_object(given or str(Path("outputs") / tool / time.strftime("%Y-%m-%d_%H-%M-%S")), env))

_RENAMED = {"f_thres": "--max-iter"}  # old flag (dest) -> new flag


def add_solver_flags(parser: argparse.ArgumentParser) -> None:
    """``--solver``, ``--max-iter``, ``--tol``, ``--stop-mode``; the old ``--f-thres`` is refused with its new
    name (``solver_changes``)."""
    g = parser.add_argument_group("solver settings (default: the checkpoint's evaluation settings, or the model's)")
    g.add_argument("--solver", choices=list_solvers(), help="forward solver")
    g.add_argument("--max-iter", type=int, help="f-evaluations at most (deq.max_iter)")
    g.add_argument("--tol", type=float, help="residual at which a sample stops (deq.tol)")
    g.add_argument("--stop-mode", choices=["abs", "rel"], help="residual compared with --tol (deq.stop_mode)")
    g.add_argument("--f-thres", type=int, help=argparse.SUPPRESS)


def solver_changes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, Any]:
    """The DEQ settings given on the command line (``configure_deq`` keywords)."""
    for old, new in _RENAMED.items():
        if getattr(args, old, None) is not None:
            parser.error(f"--{old.replace('_', '-')} is now {new} (deq.{new[2:].replace('-', '_')}: the same name "
                         f"in every tool and config)")
    changes = dict(solver=args.solver, max_iter=args.max_iter, tol=args.tol, stop_mode=args.stop_mode)
    return {k: v for k, v in changes.items() if v is not None}
