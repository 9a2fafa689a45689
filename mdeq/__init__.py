"""mdeq-zoo: multiscale deep equilibrium (MDEQ) vision backbones for timm, on one shared DEQ core.

Importing ``mdeq`` registers the ``mdeq_*`` models with timm.
"""
__version__ = "0.1.0"

from . import core  # noqa: F401
from . import models  # noqa: F401  (registers the timm models)
from .models import create_segmentation_model  # noqa: F401
