"""Mixed precision for training and evaluation: the autocast dtypes a config or flag may name."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["AMP_DTYPES", "amp_dtype", "autocast_context"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def amp_dtype(enabled: bool, name: Optional[str], what: str = "train.amp_dtype") -> Optional[torch.dtype]:
    """The autocast dtype, or None when AMP is off; ``name`` must be one of ``AMP_DTYPES``."""
    if not enabled:
        return None
    name = str(name or "bfloat16")
    if name not in AMP_DTYPES:
        raise ValueError(f"{what} must be one of {sorted(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[name]


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` with ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
