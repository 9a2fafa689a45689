"""Running a measurement in a fresh Python process (so that a memory peak is its own) and reading memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["package_env", "run_in_subprocess", "launch", "rss_mb", "peak_rss_mb"]


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


def launch(cmd: List[str], log: Path, threads: Optional[int] = None) -> Dict:
    """Run ``cmd`` to the end, its output in ``log``; its exit code, wall time and the peak RSS of that child
    (``os.wait4``), in MB.

    Linux carries the forked copy's high-water mark over the exec into ``ru_maxrss``, so the peak is at least
    this process's RSS at the launch (``parent_rss_mb``, recorded too); a training's own peak is far above it.
    """
    env = package_env(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    parent_rss = rss_mb()
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    return dict(returncode=proc.returncode, wall_s=round(time.perf_counter() - t0, 1),
                peak_mb=round(usage.ru_maxrss / 1024, 1), parent_rss_mb=round(parent_rss, 1))  # ru_maxrss: KiB


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
