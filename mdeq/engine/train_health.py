"""Telling the user, once, that a training run is going wrong: its loss grows far above where it started, or its
validation score stays at chance level once the model is past its warm-up (pre-training, warmup): two validations
in a row, or the last one; or that it is held back: the model waited for data more than a fifth of an epoch's
training time (the loader is the bottleneck, not the model).

A run with ``optim.lr=1e4`` used to end "successfully" at chance with a loss 100x its start and no word. The
checks here are cheap (a few floats per log point and per validation), never stop the run, warn in the log once each
and land in ``metrics.json`` (``warnings``), naming the settings that usually cause them.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["TrainingHealth", "LOSS_GROWTH", "CHANCE_MARGIN", "DATA_WAIT_FRACTION"]

_log = logging.getLogger("mdeq.train")

LOSS_GROWTH = 4.0     # a window's mean loss above this multiple of the first window's (and 1 above it) is "growing"
CHANCE_MARGIN = 0.02  # a validation accuracy within 2 points of always predicting the most frequent class is chance
DATA_WAIT_FRACTION = 0.2  # an epoch whose training waited this share of its time (or more) for the next batch


class TrainingHealth:
    """Watches the training loss without the DEQ terms (``begin``: the first step's, the reference; ``loss``: each log
    window's mean) and the validation score (``validated``: after each validation); ``warnings`` lists what it warned
    about. ``settings`` names the run's likely culprits (the learning rate, warmup, the Jacobian penalty) in the
    messages. Its state goes into the run's checkpoints (``state_dict``), so a resumed run keeps the reference and
    what it has said; a checkpoint without it takes the first step after resuming as the reference."""

    def __init__(self, settings: str):
        self.settings = settings
        self.start: Optional[float] = None
        self.warnings: List[str] = []
        self._said: set = set()
        self._at_chance = 0

    def _warn(self, kind: str, message: str) -> None:
        if kind in self._said:
            return
        self._said.add(kind)
        self.warnings.append(message)
        _log.warning("%s (warned once)", message)

    def state_dict(self) -> Dict[str, Any]:
        return dict(start=self.start, warnings=list(self.warnings), said=sorted(self._said), at_chance=self._at_chance)

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """What a checkpoint saved (nothing to restore from one written before the checks existed)."""
        if not state:
            return
        self.start = state.get("start")
        self.warnings = list(state.get("warnings") or [])
        self._said = set(state.get("said") or [])
        self._at_chance = int(state.get("at_chance") or 0)

    def begin(self, value: float) -> None:
        """The loss of a step; the first one (before any update moved the weights) is the reference."""
        if self.start is None and math.isfinite(value):
            self.start = value

    def loss(self, value: float, step: int) -> None:
        """The mean training loss of a log window ending at ``step``."""
        if self.start is None or not math.isfinite(value):
            return
        if value > LOSS_GROWTH * self.start and value > self.start + 1.0:
            self._warn("loss", f"the training loss grows: {value:.4g} at step {step}, {value / self.start:.0f}x its "
                               f"start ({self.start:.4g}); the run is likely diverging. Check {self.settings}")

    def data_wait(self, waited: float, total: float, epoch: int, workers: int) -> None:
        """An epoch's training spent ``waited`` of ``total`` seconds waiting for the next batch (the first batch, the
        loader's start, not counted); more than ``DATA_WAIT_FRACTION`` is worth saying."""
        if total <= 0 or waited / total < DATA_WAIT_FRACTION:
            return
        self._warn("data", f"the model waited for data {100 * waited / total:.0f}% of epoch {epoch}'s training time "
                           f"({waited:.1f} of {total:.1f} s): loading and augmenting the images limits this run, not "
                           f"the model. Raise data.workers (now {workers}), keep the data on faster storage, or "
                           f"lighten the augmentation; `python tools/benchmark.py train` times the pipeline alone")

    def validated(self, accuracy: Optional[float], chance: Optional[float], train_loss: Optional[float],
                  past_warmup: bool, epoch: int, final: bool = False) -> None:
        """A validation accuracy (percent) in ``epoch`` (counted from 1) against ``chance`` (percent: always predicting
        the most frequent class), judged only ``past_warmup`` (after pre-training and the lr warmup): a warning when it
        is at chance two validations in a row, or in the ``final`` one."""
        if accuracy is None or chance is None or not past_warmup:
            return
        if accuracy > chance + 100.0 * CHANCE_MARGIN:
            self._at_chance = 0
            return
        self._at_chance += 1
        if self._at_chance < 2 and not final:
            return
        low_loss = train_loss is not None and self.start is not None and train_loss < 0.5 * self.start
        why = (f"while the training loss fell to {train_loss:.3g} (from {self.start:.3g}): the model fits its "
               "training batches but not the validation images, which points at BatchNorm statistics that lag "
               "(train.precise_bn_batches=20), train/val preprocessing that differ, or overfitting"
               if low_loss else f"and the training loss is not falling; check {self.settings}")
        self._warn("chance", f"validation top-1 {accuracy:.2f}% in epoch {epoch} is chance level ({chance:.2f}%: "
                             f"always the most frequent class) {why}")
