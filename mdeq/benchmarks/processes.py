"""Running a measurement in a fresh Python process (so that a memory peak is its own) and reading memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

__all__ = ["package_env", "run_in_subprocess", "rss_mb", "peak_rss_mb"]


def package_env(threads: Optional[int] = None) -> Dict[str, str]:
    """The environment of a subprocess that imports this very ``mdeq`` (an installed package or a checkout)."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_in_subprocess(module: str, args: Dict) -> Dict:
    """``<module>.run_one(**args)`` in a fresh Python process (so a memory peak is its own), returning its row."""
    code = (f"import json,sys; from {module} import run_one; "
            "print('RESULT ' + json.dumps(run_one(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          env=package_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark configuration {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike ``ru_maxrss`` it starts afresh at exec, so a large parent that
    launched the measurement does not set a floor under it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
