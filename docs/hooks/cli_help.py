"""MkDocs hook: the command-line reference from each tool's own ``--help``, run when the site is built.

A page holding the marker ``<!-- cli-help -->`` gets one section per console script declared in ``setup.py``
(``mdeq-<tool> = mdeq.cli.<tool>:main``) with the output of ``python -m mdeq.cli.<tool> --help``, so the
reference cannot drift from the tools. A tool whose ``--help`` fails fails the build.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

MARKER = "<!-- cli-help -->"
ROOT = Path(__file__).resolve().parents[2]


def console_scripts() -> List[Tuple[str, str]]:
    """(script name, module) of every ``mdeq.cli`` console script in setup.py, in its order."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entry_points = eval(compile(ast.Expression(node.value), "setup.py", "eval"), {})  # literal data
            break
    else:
        raise RuntimeError("setup.py declares no entry_points")
    scripts = []
    for spec in entry_points.get("console_scripts", []):
        name, target = (part.strip() for part in spec.split("=", 1))
        module = target.split(":", 1)[0]
        if module.startswith("mdeq.cli."):
            scripts.append((name, module))
    if not scripts:
        raise RuntimeError("setup.py declares no mdeq.cli console scripts")
    return scripts


def tool_help(module: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", COLUMNS="110", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} --help failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    # the checkout's absolute path (Hydra tools print where their configs are) reads as a relative one
    return proc.stdout.replace(str(ROOT) + os.sep, "").rstrip()


def cli_reference() -> str:
    scripts = console_scripts()
    with ThreadPoolExecutor(max_workers=4) as pool:  # a few seconds each: the imports
        helps = dict(zip((m for _, m in scripts), pool.map(tool_help, [m for _, m in scripts])))
    sections = []
    for name, module in scripts:
        tool = module.rsplit(".", 1)[1]
        sections.append(f"## {name}\n\n`python -m {module}`, `python tools/{tool}.py` from a checkout.\n\n"
                        f"```text\n{helps[module]}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
