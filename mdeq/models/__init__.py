"""MDEQ architectures: config presets, the cell, the timm-registered classifiers, segmentation, conversion."""
from .config import CLS_PRESETS, SEG_PRESETS, MDEQConfig
from .convert import (StateDictMismatch, convert_official_state_dict, infer_preset, is_official_state_dict,
                      load_converted, to_official_state_dict)
from .layers import MDEQCell
from .mdeq import MDEQBackbone, MDEQNet, MDEQStage
from .segmentation import MDEQSegNet, create_segmentation_model, list_segmentation_models

__all__ = [
    "MDEQConfig", "CLS_PRESETS", "SEG_PRESETS", "MDEQCell", "MDEQStage", "MDEQBackbone", "MDEQNet", "MDEQSegNet",
    "create_segmentation_model", "list_segmentation_models", "convert_official_state_dict",
    "to_official_state_dict", "is_official_state_dict", "infer_preset", "load_converted", "StateDictMismatch",
]
