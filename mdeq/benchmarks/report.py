"""Writing a benchmark result as JSON (for tools) and Markdown (for people) side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict

from ..engine.provenance import provenance

__all__ = ["save_report", "with_provenance"]


def with_provenance(result: Dict) -> Dict:
    """``result`` with ``provenance`` (command, commit, date, machine) added unless it has one."""
    return result if "provenance" in result else {**result, "provenance": provenance()}


def save_report(result: Dict, out_dir: Path, name: str, to_markdown: Callable[[Dict], str]) -> Dict[str, Path]:
    """``<out_dir>/<name>.json`` (with the result's ``provenance``) and ``<out_dir>/<name>.md``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(with_provenance(result), indent=2))
    paths["markdown"].write_text(to_markdown(result))
    return paths
