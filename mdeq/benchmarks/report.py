"""Writing a benchmark result as JSON (for tools) and Markdown (for people) side by side."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict


def save_report(result: Dict, out_dir: Path, name: str, to_markdown: Callable[[Dict], str]) -> Dict[str, Path]:
    """``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(to_markdown(result))
    return paths


def run_in_subprocess(module: str, args: Dict) -> Dict:
    """``<module>.run_one(**args)`` in a fresh Python process (so a memory peak is its own), returning its row."""
    code = (f"import json,sys; from {module} import run_one; "
            "print('RESULT ' + json.dumps(run_one(**json.loads(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark configuration {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
