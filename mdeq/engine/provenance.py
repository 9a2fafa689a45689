"""Where a result came from: the command, the commit of the code, the date and the machine. Written into every
results file (a training run's ``metrics.json``, a benchmark's JSON), so a figure quoted in the docs names the run
that produced it (``python tools/benchmark.py docs`` prints it under each generated table)."""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

__all__ = ["provenance", "git_commit"]

_PACKAGE = Path(__file__).resolve().parents[1]


def git_commit(path: Path = _PACKAGE) -> Optional[str]:
    """The checkout's commit (short hash, ``+dirty`` when tracked files differ from it), None outside a checkout."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=10", "HEAD")
    if commit is None:
        return None
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance(command: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """{command, commit, date (UTC), torch, device, threads} of this process; ``command`` defaults to its argv."""
    if command is None:
        script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
        if script is not None and script.is_relative_to(_PACKAGE):  # python -m mdeq.cli.<tool>
            how = ["-m", ".".join(script.relative_to(_PACKAGE.parent).with_suffix("").parts)]
        elif script is not None and script.is_relative_to(_PACKAGE.parent):  # a tool of this checkout
            how = [str(script.relative_to(_PACKAGE.parent))]
        else:
            how = sys.argv[:1]
        command = ["python", *how, *sys.argv[1:]]
    argv = list(command)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return dict(command=shlex.join(argv), commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, device=device, threads=torch.get_num_threads())
