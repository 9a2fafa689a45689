"""Reading a weights or checkpoint file safely, and saying what a file is when it is not one.

``read_weights_file`` is the one reader behind every tool that takes weights (eval, export, fine-tuning,
segmentation training, conversion, publishing, distillation, benchmarks, resuming). It tells the format from the
file's first bytes, not its name: safetensors loads with ``safetensors``, a ``torch.save`` file (zip or the old
pickle format) with ``torch.load(weights_only=True)``, so no code from the file runs. Anything else fails with a
``WeightsFileError`` whose message names the file, says what it is (a text file, an HTML page, empty, truncated,
a zip archive that is not a torch checkpoint, ...) and lists the formats accepted. ``describe_content`` says what
a loaded file holds when it is the wrong kind (e.g. an optimizer state without model weights).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

__all__ = ["CheckpointError", "WeightsFileError", "WEIGHTS_FORMATS", "CHECKPOINT_FORMATS", "WEIGHT_SUFFIXES",
           "read_weights_file", "names_a_file", "looks_like", "describe_content", "weights_file_error"]

WEIGHTS_FORMATS = ("safetensors (.safetensors); a state dict or a training checkpoint of mdeq-zoo saved with "
                   "torch.save (.pth, .pt, .bin); a released official MDEQ checkpoint (.pkl)")
CHECKPOINT_FORMATS = ("a training checkpoint of mdeq-zoo (checkpoints/last.pth or best.pth of a train_cls, train_seg "
                      "or distill run)")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".pkl", ".bin", ".tar", ".ckpt")

_HEAD = 4096  # bytes read to tell the format
# torch.save's old (non-zip) format starts with a protocol-2 pickle of this magic number
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to a different run setup (the message says which)."""


class WeightsFileError(CheckpointError, ValueError):
    """A file given as weights or a checkpoint cannot be used: the message names it, says what it is and lists the
    formats accepted (the tools print it as it is, without a traceback)."""


def weights_file_error(path: Union[str, Path], problem: str, what: str = "weights file",
                       accepted: str = WEIGHTS_FORMATS) -> WeightsFileError:
    """The error for ``path``: ``problem`` (a clause such as "it is a text file") and the formats accepted."""
    return WeightsFileError(f"cannot read {what} {path}: {problem}\naccepted: {accepted}")


def names_a_file(source: str) -> bool:
    """Whether a tool's weights argument names a file (one that exists, or by a weights suffix or a folder in
    it) rather than a timm name with a tag, so that a missing or wrong file gets ``read_weights_file``'s message."""
    return Path(source).exists() or Path(source).suffix in WEIGHT_SUFFIXES or "/" in source or os.sep in source


def read_weights_file(path: Union[str, Path], what: str = "weights file", accepted: str = WEIGHTS_FORMATS,
                      map_location: Any = "cpu") -> Any:
    """The content of a weights or checkpoint file: a dict of tensors (safetensors) or what ``torch.save`` stored
    (read with ``weights_only=True``). Raises ``WeightsFileError`` (naming ``what``, the file, what it is and
    ``accepted``) for a missing file, a folder, an empty, truncated or damaged file, or one in another format."""
    path = Path(path)

    def fail(problem: str) -> WeightsFileError:
        return weights_file_error(path, problem, what, accepted)

    problem = _unusable_path(path)
    if problem:
        raise fail(problem)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    except OSError as e:
        raise fail(f"it cannot be opened ({e.strerror or e})") from None
    kind = _format(head)
    if kind == "safetensors":
        return _read_safetensors(path, head, size, fail)
    if kind == "zip":
        _check_torch_zip(path, head, size, fail)
    if kind in ("zip", "torch legacy"):
        return _torch_load(path, map_location, fail)
    desc = looks_like(head, size)
    if path.suffix == ".safetensors" and size:
        desc += ", not safetensors"
    raise fail(f"it is {desc}")


def looks_like(head: bytes, size: Optional[int] = None) -> str:
    """What a file is, from its first bytes (``head``) and size: "empty (0 bytes)", "a text file (it begins ...)",
    "an HTML page ...", "a gzip-compressed file", ... (a noun phrase)."""
    if size == 0 or not head:
        return "empty (0 bytes)"
    text = _as_text(head)
    if text is not None:
        start = text.lstrip().lower()
        if start.startswith(("<!doctype html", "<html")) or "<html" in start[:1000]:
            return ("an HTML page (a web page saved in place of the file: a sign-in, consent or error page of the "
                    "site it came from?)")
        if start.startswith("version https://git-lfs"):
            return "a Git LFS pointer, not the file itself (fetch it: git lfs pull)"
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        return f"a text file (it begins {first[:60]!r})" if first else "a text file of blank lines"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file (decompress it first)"
    if head[257:262] == b"ustar":
        return "a tar archive (extract the weights file from it)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy array file (.npy)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (Keras or TensorFlow weights?)"
    if head.startswith(b"PK"):
        return "a zip archive"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"a Python pickle that is not a torch checkpoint (pickle protocol {head[1]})"
    return f"binary data of no known format (it begins {head[:8].hex(' ')})"


def describe_content(obj: Any) -> str:
    """What a loaded file holds, as a noun phrase: "a state dict of 80 tensors", "a torch checkpoint without model
    weights (keys: optimizer)", "a torch file holding a list", ..."""
    if isinstance(obj, Mapping):
        if not obj:
            return "a torch file holding an empty dict"
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a state dict of {len(obj)} tensors (weights alone, without a run's identity and config)"
        keys = [str(k) for k in list(obj)[:8]]
        more = f", ... ({len(obj)} in all)" if len(obj) > len(keys) else ""
        return f"a torch checkpoint without model weights (keys: {', '.join(keys)}{more})"
    if isinstance(obj, torch.Tensor):
        return f"a torch file holding a single tensor of shape {tuple(obj.shape)}"
    return f"a torch file holding a {type(obj).__name__}"


# ---------------------------------------------------------------------------------------------- the parts
def _unusable_path(path: Path) -> str:
    """Why ``path`` cannot be opened as a file ('' when it can)."""
    if not path.exists():
        return "it does not exist" + (" (a broken link)" if path.is_symlink() else "")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        hint = f" (it holds {', '.join(inside[:4])}: pass one of them)" if inside else ""
        return f"it is a folder, not a file{hint}"
    if not path.is_file():
        return "it is not a regular file"
    if not os.access(path, os.R_OK):
        return "it cannot be read (no read permission)"
    return ""


def _format(head: bytes) -> str:
    """'safetensors', 'zip', 'torch legacy', or '' (another kind of file) from the first bytes."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(_TORCH_LEGACY):
        return "torch legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= _SAFETENSORS_MAX_HEADER:
        return "safetensors"
    return ""


def _as_text(head: bytes) -> Optional[str]:
    """``head`` decoded, if it is text (UTF-8 without NUL or other control bytes; a cut last character is fine)."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return None
        text = head[:e.start].decode("utf-8")
    controls = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f")
    return text if controls <= len(text) // 100 else None


def _read_safetensors(path: Path, head: bytes, size: int, fail) -> dict:
    n = struct.unpack("<Q", head[:8])[0]
    if 8 + n > size:
        raise fail(f"it is a truncated safetensors file ({size} bytes; its header alone needs {8 + n})")
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(n)
    try:
        meta = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise fail("it is a safetensors file with a corrupt header (not the JSON table of its tensors)") from None
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise fail(f"it is a truncated safetensors file ({size} of its {need} bytes)")
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise fail(f"it is a damaged safetensors file ({_reason(e)})") from None


def _check_torch_zip(path: Path, head: bytes, size: int, fail) -> None:
    """A zip file must be a whole torch checkpoint: its table of contents readable, a ``<name>/data.pkl`` inside."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        name_len = struct.unpack("<H", head[26:28])[0] if len(head) >= 30 else 0
        first = head[30:30 + name_len].decode("utf-8", "replace")
        if first.endswith("data.pkl"):
            raise fail(f"it is a truncated torch checkpoint ({size} bytes, the end of its zip archive is missing: an "
                       f"interrupted download or copy?)") from None
        raise fail("it is a truncated or damaged zip archive (its table of contents at the end is missing)") from None
    if not any(n.endswith("data.pkl") for n in names):
        listed = ", ".join(names[:4]) + (f", ... ({len(names)} files)" if len(names) > 4 else "")
        raise fail(f"it is a zip archive that is not a torch checkpoint (it holds {listed or 'nothing'})")


def _torch_load(path: Path, map_location: Any, fail) -> Any:
    try:
        # a file object: torch.load would hand a path named .safetensors to safetensors; torch's notes on pickle
        # protocols would follow the tool's message
        with warnings.catch_warnings(), open(path, "rb") as f:
            warnings.simplefilter("ignore")
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise fail(f"it is a torch checkpoint holding Python objects ({unsafe.group(1)}) besides tensors and plain "
                       f"data, which are not loaded because unpickling them could run code from the file; save the "
                       f"weights alone: torch.save(model.state_dict(), path)") from None
        if "truncated" in str(e):
            raise fail("it is a truncated torch checkpoint (an interrupted download or copy?)") from None
        raise fail(f"it is a damaged torch checkpoint ({_reason(e)})") from None
    except EOFError:
        raise fail("it is a truncated torch checkpoint (an interrupted download or copy?)") from None
    except Exception as e:
        raise fail(f"it is a damaged torch checkpoint ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """The exception's type and first line, without torch's advice on loading unsafely."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "weights_only" in line:
        line = ""
    return f"{type(e).__name__}: {line[:160]}" if line else type(e).__name__
