"""The ``features_only`` wrapper of the MDEQ models: timm's ``FeatureGetterNet`` with the model's DEQ control.

``timm.create_model('mdeq_small', features_only=True)`` returns an ``MDEQFeatures``, so the solver is set and read
on the feature extractor as on the model (``configure_deq(**options)``, ``deq_stats``), including inside
segmentation_models_pytorch's ``tu-mdeq_*`` encoders; ``mdeq.configure_deq(module, ...)`` reaches it from any
enclosing module.
"""
from __future__ import annotations

from typing import Any, Optional

from timm.models._features import FeatureGetterNet

from mdeq.core import DEQ, SolverStats

from .control import configure_deq

__all__ = ["MDEQFeatures"]


class MDEQFeatures(FeatureGetterNet):
    """``FeatureGetterNet`` (features from ``forward_intermediates``) plus the wrapped model's solver control."""

    def configure_deq(self, **options: Any) -> DEQ:
        """Change the solver settings at run time, as the model's ``configure_deq`` (same options, same checks).
        ValueError when the equilibrium stage was pruned (``out_indices=(0,)`` keeps only the stem tap)."""
        (deq,) = configure_deq(self, **options).values()
        return deq

    @property
    def deq_stats(self) -> Optional[SolverStats]:
        """``SolverStats`` of the last forward (with ``.backward`` once its backward ran); None before the first
        forward or when the equilibrium stage was pruned."""
        return self.model.deq_stats
