"""Writing a benchmark result as JSON (for tools) and Markdown (for people) side by side."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from ..engine.provenance import provenance

__all__ = ["save_report", "with_provenance", "fmt_number", "markdown_table"]


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


def fmt_number(value: Optional[float], digits: int = 1) -> str:
    """``value`` with ``digits`` decimals; "-" for a figure that was not measured (None or NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header: Iterable[str], aligns: str, rows: Iterable[Iterable[str]]) -> str:
    """A Markdown table; ``aligns`` one character per column: ``l`` left, ``r`` right."""
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in aligns) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", sep] + ["| " + " | ".join(r) + " |" for r in rows])
