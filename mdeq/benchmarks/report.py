"""Writing a benchmark result as JSON (for tools) and Markdown (for people) side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict

__all__ = ["save_report"]


def save_report(result: Dict, out_dir: Path, name: str, to_markdown: Callable[[Dict], str]) -> Dict[str, Path]:
    """``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(to_markdown(result))
    return paths
