"""mdeq-zoo: multiscale deep equilibrium (MDEQ) vision backbones for timm, on one shared DEQ core."""
__version__ = "0.1.0"

from . import core  # noqa: F401
