"""MDEQ architectures: config presets, the cell, the timm-registered classifiers, segmentation, conversion.

Rooms: ``config`` (``MDEQConfig``, the presets), ``layers`` (the cell f), ``cheap_inference`` (the Skip DEQ
predictor and the C-DEQ student generator), ``mdeq`` (the timm classifiers, ``default_cfgs``,
``@register_model``), ``features`` (their ``features_only`` wrapper), ``control`` (solver settings and stats of
every MDEQ inside any module), ``stream`` (video streams carrying their equilibrium from frame to frame),
``segmentation`` (the segmentation model), ``convert`` (official checkpoint keys ->
this package's), ``identify`` (which preset a state dict is), ``pretrained`` (catalog weights as timm
pretrained cfgs). A new preset is an entry in ``config`` plus its ``@register_model`` function in ``mdeq``.
"""
from .config import CLS_PRESETS, SEG_PRESETS, MDEQConfig, official_solver, official_solver_of, preset_solver
from .control import configure_deq, configured_deq, deq_stats, find_mdeqs, set_jac_probes
from .convert import (StateDictMismatch, convert_official_state_dict, describe_mismatch, is_official_state_dict,
                      load_converted, state_shapes, to_official_state_dict)
from .features import MDEQFeatures
from .identify import build_preset, infer_preset
from .layers import MDEQCell
from .mdeq import MDEQBackbone, MDEQNet, MDEQStage
from .segmentation import MDEQSegNet, create_segmentation_model, list_segmentation_models
from .stream import MDEQStream, stream

__all__ = [
    "MDEQConfig", "CLS_PRESETS", "SEG_PRESETS", "MDEQCell", "MDEQStage", "MDEQBackbone", "MDEQNet", "MDEQSegNet",
    "create_segmentation_model", "list_segmentation_models", "convert_official_state_dict",
    "to_official_state_dict", "is_official_state_dict", "infer_preset", "build_preset", "load_converted",
    "StateDictMismatch", "state_shapes", "describe_mismatch", "official_solver", "official_solver_of",
    "preset_solver", "configure_deq", "configured_deq", "deq_stats", "find_mdeqs", "set_jac_probes", "MDEQFeatures",
    "MDEQStream", "stream",
]
