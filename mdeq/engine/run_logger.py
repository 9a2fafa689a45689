"""Run logging on rank 0: TensorBoard scalars + hparams, a per-epoch CSV, and ``metrics.json``.

On other ranks every method is a no-op, so training code can log unconditionally. A resumed run passes the
step it resumes from: TensorBoard discards events logged after it (``purge_step``) and the CSV drops rows of
epochs that were not finished, so the logs read as if the run had never stopped.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

__all__ = ["RunLogger", "write_json_atomic", "flatten_config"]


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, with values TensorBoard's hparams accept (numbers, bools, strings)."""
    flat: Dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            flat[key] = v
        elif v is None:
            flat[key] = "None"
        else:
            flat[key] = str(v)
    return flat


class RunLogger:
    """TensorBoard writer under ``<out>/tensorboard`` and ``<out>/metrics.csv`` (one row per epoch)."""

    def __init__(self, output_dir: Path, enabled: bool = True, resume_step: Optional[int] = None,
                 resume_epoch: Optional[int] = None):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.csv_path = self.output_dir / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=resume_step)
        if resume_epoch is not None and self.csv_path.is_file():
            self._truncate_csv(resume_epoch)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """An (H, W, 3) uint8 RGB image (e.g. a prediction next to its ground truth)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The run's config as TensorBoard hparams with its final metrics (HPARAMS tab)."""
        if self.writer is None:
            return
        self.writer.add_hparams(flatten_config(config), {f"hparam/{k}": float(v) for k, v in metrics.items()},
                                run_name="hparams")

    def epoch_row(self, row: Mapping[str, Any]) -> None:
        """Append one epoch's numbers to the CSV (the header is written with the first row)."""
        if not self.enabled:
            return
        new = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
        if not new:
            with self.csv_path.open(newline="") as f:
                header = next(csv.reader(f), None)
            if header is not None and header != list(row):
                raise ValueError(f"{self.csv_path} has columns {header}, this run logs {list(row)}")
        with self.csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow({k: _fmt(v) for k, v in row.items()})

    def _truncate_csv(self, resume_epoch: int) -> None:
        with self.csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
            fields = list(rows[0]) if rows else None
        if fields is None:
            return
        keep = [r for r in rows if int(r["epoch"]) < resume_epoch]
        tmp = self.csv_path.with_name(".metrics.csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(keep)
        os.replace(tmp, self.csv_path)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v
