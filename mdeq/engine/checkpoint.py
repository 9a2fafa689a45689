"""Training checkpoints: plain dicts written atomically, loaded with ``weights_only=True``, plus RNG states.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the
target, so a run killed at any moment leaves either the previous checkpoint or the new one, never a torn file.
``load_checkpoint`` returns it in the current format (``legacy.upgrade_checkpoint`` rewrites older ones).
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch

from .legacy import upgrade_checkpoint
from .weight_files import CHECKPOINT_FORMATS, CheckpointError, describe_content, read_weights_file, weights_file_error

__all__ = ["save_atomic", "load_checkpoint", "capture_rng_state", "restore_rng_state", "CheckpointError",
           "CheckpointWriteError", "plain_data"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder); the previous file at that path is kept."""

    def __str__(self) -> str:  # the message alone (OSError would prefix "[Errno N]")
        return str(self.strerror)


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to ``path`` via a temp file + fsync + ``os.replace`` (atomic on POSIX and Windows).

    If the write fails (a full disk, a read-only folder) the temp file is removed, the previous file at ``path``
    stays as it was, and ``CheckpointWriteError`` names the file, the folder and its free space."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if _is_write_failure(e):
            raise _write_error(path, e) from e
        raise  # not the disk's fault (e.g. an object that cannot be pickled): as it came
    return path


def _is_write_failure(e: BaseException) -> bool:
    """An OSError, or torch.save's zip writer failing to write (how a full disk shows: "[enforce fail at
    inline_container.cc:672] . unexpected pos 704 vs 598", or "PytorchStreamWriter failed writing file")."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
        marker in str(e) for marker in ("inline_container", "PytorchStreamWriter", "file write failed")))


def _write_error(path: Path, e: BaseException) -> CheckpointWriteError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.1f} MB free there"
    except OSError:
        free = "its free space unknown"
    kept = "the previous one is kept" if path.exists() else "there was none before"
    err = getattr(e, "errno", None)
    return CheckpointWriteError(
        err or errno.EIO,
        f"cannot write {path} ({type(e).__name__}: {e}; {free}); {kept} and nothing half-written was left. Free "
        f"some space in {path.parent} (or make it writable) and resume from the last checkpoint, or set the run's "
        "output folder elsewhere")


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a training checkpoint (safe unpickling: tensors, plain containers and numbers only). A file that is not
    one raises ``WeightsFileError`` (a ``CheckpointError``) saying what it is (``weight_files.read_weights_file``)."""
    ckpt = read_weights_file(path, "checkpoint", CHECKPOINT_FORMATS, map_location)
    if not isinstance(ckpt, dict):
        raise weights_file_error(path, f"it does not hold a checkpoint dict: it is {describe_content(ckpt)}",
                                 "checkpoint", CHECKPOINT_FORMATS)
    return upgrade_checkpoint(ckpt)


def plain_data(obj: Any) -> Any:
    """Containers of str/int/float/bool/None only (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(obj, Mapping):
        return {str(k): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return str(obj)


def capture_rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), Python ``random`` and numpy states, as tensors and plain data."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Inverse of ``capture_rng_state``."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    random.setstate(_from_plain(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(py_state: tuple) -> list:
    version, internal, gauss = py_state
    return [version, list(internal), gauss]


def _from_plain(plain: list) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)
