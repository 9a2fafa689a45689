"""The methods of the budget benchmark and the command that trains each: a ``train_cls`` recipe (or C-DEQ's
distillation from plain), run as ``python -m mdeq.cli.<tool>``, so it works from an installed package."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ...data.classification import ImageFolderDataset, find_split

__all__ = ["Method", "METHODS", "PRETRAIN_EPOCHS", "split_overrides", "train_command", "distill_command",
           "count_images"]

PRETRAIN_EPOCHS = 2        # the digits recipes' unrolled pre-training: 88 steps = 2 epochs of 44


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    recipe: Optional[str]  # the Hydra experiment (None: distilled from plain)


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("plain", "plain DEQ", "digits_plain"),
    Method("jr", "DEQ + JR", "digits_tiny"),
    Method("phantom", "phantom gradient", "digits_phantom"),
    Method("skip", "Skip DEQ", "digits_skip"),
    Method("skip_reg", "Skip Reg. DEQ", "digits_skip_reg"),
    Method("ode", "continuous DEQ", "digits_ode"),
    Method("stack", "residual stack", "digits_stack"),
    Method("fast", "fast recipe (Skip + JR, one-step)", "digits_fast"),
    Method("cdeq", "C-DEQ (from plain)", None),
)}


def split_overrides(overrides: Sequence[str]) -> Dict[Optional[str], List[str]]:
    """``key=value`` -> every method (key None); ``METHOD:key=value`` -> that method only."""
    out: Dict[Optional[str], List[str]] = {}
    for o in overrides:
        head = o.split("=", 1)[0]
        scope, sep, rest = head.partition(":")
        if sep and scope in METHODS:
            out.setdefault(scope, []).append(rest + o[len(head):])
        elif sep and scope.isidentifier():
            raise ValueError(f"train override {o!r}: {scope!r} is not a method ({', '.join(METHODS)})")
        else:
            out.setdefault(None, []).append(o)
    return out


def _last_value(overrides: Sequence[str], key: str) -> Optional[str]:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return values[-1] if values else None

def count_images(root: Path, split: str = "train") -> int:
    return len(ImageFolderDataset(find_split(root, split)))

def train_command(method: Method, run_dir: Path, epochs: Optional[int], data_root: Optional[Path],
                  overrides: Sequence[str], train_images: Optional[int] = None) -> List[str]:
    """The ``train_cls`` command line of one method (``overrides``: this method's extra Hydra overrides)."""
    cmd = [sys.executable, "-m", "mdeq.cli.train_cls", f"experiment={method.recipe}",
           f"hydra.run.dir={run_dir}", "train.progress=false"]
    if epochs is not None:
        cmd.append(f"train.epochs={epochs}")
    if data_root is not None:
        cmd += ["data=imagefolder", f"data.root={data_root}", "data.aug.scale=[0.85,1.0]", "data.aug.ratio=[0.9,1.1]",
                "data.aug.hflip=0.0", "data.batch_size=32", "data.workers=2", "data.eval_batch_size=128",
                f"recipe=budget-{method.recipe}"]
        if method.name != "stack" and train_images is not None:  # the stack never leaves unrolled mode
            batch = int(_last_value(list(overrides), "data.batch_size") or 32)
            cmd.append(f"schedule.pretrain_steps={PRETRAIN_EPOCHS * max(train_images // batch, 1)}")
    return cmd + list(overrides)


def distill_command(teacher: Path, run_dir: Path, epochs: int, evals: Sequence[int],
                    data_root: Optional[Path], extra: Sequence[str]) -> List[str]:
    cmd = [sys.executable, "-m", "mdeq.cli.distill", str(teacher), "--output", str(run_dir),
           "--epochs", str(epochs), "--eval-iters", *[str(k) for k in evals], "--no-progress"]
    if data_root is not None:
        cmd += ["--data-root", str(data_root)]
    return cmd + list(extra)
