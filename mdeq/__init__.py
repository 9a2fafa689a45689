"""mdeq-zoo: multiscale deep equilibrium (MDEQ) vision backbones for timm, on one shared DEQ core.

Importing ``mdeq`` registers the ``mdeq_*`` models with timm.
"""
__version__ = "0.1.0"

from . import core
from . import models  # registers the timm models
from .models import configure_deq, create_segmentation_model, deq_stats, find_mdeqs, stream

__all__ = ["core", "models", "create_segmentation_model", "configure_deq", "deq_stats", "find_mdeqs", "stream"]
