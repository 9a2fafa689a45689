"""Multiscale Deep Equilibrium Models (MDEQ) for timm.

Paper: "Multiscale Deep Equilibrium Models", Shaojie Bai, Vladlen Koltun, J. Zico Kolter, NeurIPS 2020
(arXiv:2006.08656); configurations and checkpoints of locuslab/mdeq and locuslab/deq (MDEQ-Vision).

Numerically the same network as the original (stem, ``stage0`` injection transform, the multiscale cell
``fullstage``, HRNet-style classification head with non-affine bottleneck BNs), with the same state-dict names
except weight norm, which lives in torch parametrizations (``convert_official_state_dict`` maps the released
checkpoints). What differs:

* the equilibrium is found by the shared ``mdeq.core.DEQ`` (per-sample stopping; the original stops on batch
  norms), in any of its solvers and gradients; ``configure_deq(solver='unroll', max_iter=num_layers)`` is the
  original pre-training mode;
* an input size that the multiscale state cannot represent raises a ValueError naming valid sizes;
* the timm model API: ``features_only`` (stem tap + branch states), ``forward_intermediates``, pretrained cfgs.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_device_dtype
from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function,
                         register_notrace_module)
from timm.models._features import feature_take_indices

from mdeq.core import DEQ, ConsistencyFunction, SolverStats, StatePacker, forward_scope
from mdeq.core.norm import has_weight_norm
from mdeq.core.state import is_channels_last

from .cheap_inference import MultiscaleGenerator, MultiscaleInitializer
from .config import CLS_PRESETS, MDEQConfig, config_field_names, resolve_config
from .convert import convert_official_state_dict, is_official_state_dict
from .features import MDEQFeatures
from .identify import register_preset_builder
from .layers import MDEQCell, propagate_nonfinite
from .pretrained import catalog_cfgs, general_use, resolve_catalog_weights

__all__ = ["MDEQNet", "MDEQBackbone", "MDEQStage", "Bottleneck"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@register_notrace_module
class MDEQStage(MDEQCell):
    """The cell ``f`` (inherited, as ``cell``) plus its equilibrium solve; a leaf for FX tracing.

    ``forward(injection)`` returns the list of branch equilibria; ``stats`` holds the last ``SolverStats``.
    The architecture's add-ons live here too: ``initializer`` (Skip DEQ's predictor of z*, ``cfg.skip_init``)
    and ``student`` (C-DEQ's student, ``cfg.student``); the DEQ settings may use them but never create them.
    """

    def __init__(self, cfg: MDEQConfig, device=None, dtype=None):
        super().__init__(cfg, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.initializer = MultiscaleInitializer(cfg.num_channels[0], cfg.num_channels, cfg.num_groups, **dd) \
            if cfg.skip_init else None
        self.student = ConsistencyFunction(MultiscaleGenerator(cfg.num_channels, kernel_size=cfg.student_kernel_size,
                                                               **dd)) if cfg.student else None
        provides = [name for name, part in (("predictor", self.initializer), ("student", self.student)) if part]
        self.deq = DEQ(provides=provides, missing_hint="build the model with skip_init=True for the Skip DEQ "
                       "predictor, student=True for the C-DEQ student (tools/distill.py trains it)",
                       **cfg.deq_settings())
        self.jac_probes = 0
        self.num_layers = cfg.num_layers  # the original's unrolled depth (NUM_LAYERS: pre-training's solver='unroll')
        # what the image must be for the model around this stage: a multiple of input_divisor a side, and
        # input_stride image pixels per pixel of the finest branch (its stem's stride)
        self.input_divisor = cfg.size_divisor
        self.input_stride = 2 ** cfg.downsample_times
        self.stats: Optional[SolverStats] = None
        self.compile_options: Optional[Dict[str, Any]] = None  # set by compile_cell; None: the eager cell
        self._compiled_cell = None

    def addons(self) -> Dict[str, nn.Module]:
        """The parts trained apart from the MDEQ weights that this model has: {'initializer': ..., 'student': ...}.
        Weights without them (a plain MDEQ checkpoint) load with these left at their init."""
        return {name: part for name, part in (("initializer", self.initializer), ("student", self.student))
                if part is not None}

    def __getstate__(self):
        # the last forward's stats may hold autograd graphs (jac_loss): not part of a copy (ModelEmaV3, deepcopy)
        state = dict(self.__dict__)
        state["stats"] = None
        state["_compiled_cell"] = None  # a copy compiles its own cell on first use
        return state

    def compile_cell(self, enable: bool = True, **compile_kwargs: Any) -> None:
        """Evaluate the cell through ``torch.compile(**compile_kwargs)`` (the solver loop stays eager), or go back
        to the eager cell. Compiled once per input shape, mode (train / eval) and grad mode, not per iteration;
        weight norm and the variational-dropout masks (drawn eagerly, so the same seed gives the same masks)
        work as in eager mode. No weights change: state dicts are the same either way."""
        self.compile_options = dict(compile_kwargs) if enable else None
        self._compiled_cell = None

    def cell(self, z: List[torch.Tensor], injection: torch.Tensor) -> List[torch.Tensor]:
        if self.compile_options is None:
            return MDEQCell.forward(self, z, injection)
        if self._compiled_cell is None:
            self._compiled_cell = torch.compile(partial(MDEQCell.forward, self), **self.compile_options)
        return self._compiled_cell(z, injection)

    def initial_state(self, injection: torch.Tensor) -> List[torch.Tensor]:
        """The zero state: one (B, C_i, H / 2^i, W / 2^i) tensor per branch, in the injection's memory format
        (channels-last when the model and its input are, ``model.to(memory_format=torch.channels_last)``)."""
        b, _, h, w = injection.shape
        fmt = torch.channels_last if is_channels_last(injection) else torch.contiguous_format
        return [injection.new_zeros(b, self.branches[i].blocks[0].conv2.out_channels, h >> i, w >> i)
                .contiguous(memory_format=fmt) for i in range(self.num_branches)]

    def forward(self, injection: torch.Tensor, z0: Optional[List[torch.Tensor]] = None,  # type: ignore[override]
                warm: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Branch equilibria; ``z0`` is a warm start (e.g. the previous frame's equilibrium), zeros by default.
        ``warm`` (B,) bool: the samples that start from ``z0`` instead of the Skip DEQ prediction (``init='skip'``);
        see ``mdeq.stream``."""
        zeros = self.initial_state(injection)
        if z0 is None:
            z0 = zeros
        elif len(z0) != len(zeros) or any(a.shape != b.shape for a, b in zip(z0, zeros)):
            raise ValueError(f"z0 must be {len(zeros)} tensors of shapes {[tuple(t.shape) for t in zeros]}, got "
                             f"{[tuple(t.shape) for t in z0]}")
        predictor = (lambda: self.initializer(injection)) if self.initializer is not None else None
        inputs = {}
        if self.student is not None:
            self.student.generator.packer = StatePacker(z0)
            inputs["student"] = self.student
        with forward_scope(self):
            jac = self.jac_probes if torch.is_grad_enabled() else 0
            z, self.stats = self.deq(lambda zs: self.cell(zs, injection), z0, jac_probes=jac, predictor=predictor,
                                     warm=warm, **inputs)
        return propagate_nonfinite(z, injection)


@register_notrace_function
def mdeq_check_input_size(x: torch.Tensor, in_chans: int, k: int) -> None:
    """Raise a ValueError naming valid sizes (a public name: FX only autowraps functions without a leading _)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % k or w % k:
        def near(s: int) -> str:
            below, above = s // k * k, s // k * k + k
            return f"{above}" if below == 0 else f"{below} or {above}"

        raise ValueError(
            f"input size {h}x{w} is not supported: H and W must be multiples of {k} (2^(downsample_times + "
            f"num_branches - 1)) so every branch halves the previous one; nearest valid: H {near(h)}, W {near(w)}"
        )


class Bottleneck(nn.Module):
    """HRNet's bottleneck as MDEQ uses it in the head: the three inner BNs are not affine."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, bn_momentum: float, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        out = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(ch, momentum=bn_momentum, affine=False, **dd)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(ch, momentum=bn_momentum, affine=False, **dd)
        self.conv3 = nn.Conv2d(ch, out, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out, momentum=bn_momentum, affine=False, **dd)
        self.relu = nn.ReLU()
        self.downsample = nn.Sequential(
            nn.Conv2d(in_ch, out, 1, bias=False, **dd), nn.BatchNorm2d(out, momentum=bn_momentum, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class MDEQBackbone(nn.Module):
    """Stem (``downsample``), injection transform (``stage0``) and equilibrium stage (``fullstage``)."""

    def __init__(self, cfg: MDEQConfig, in_chans: int = 3, bn_momentum: float = 0.1, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.in_chans = in_chans
        self.num_branches = cfg.num_branches
        c0, d = cfg.num_channels[0], cfg.downsample_times
        stem = OrderedDict()
        stem["0"] = nn.Conv2d(in_chans, c0, 3, stride=2 if d >= 1 else 1, padding=1, bias=False, **dd)
        stem["1"] = nn.BatchNorm2d(c0, momentum=bn_momentum, **dd)
        stem["2"] = nn.ReLU()
        stem["3"] = nn.Conv2d(c0, c0, 3, stride=2 if d >= 2 else 1, padding=1, bias=False, **dd)
        stem["4"] = nn.BatchNorm2d(c0, momentum=bn_momentum, **dd)
        stem["5"] = nn.ReLU()
        for i in range(3, d + 1):  # v2's extra stride-2 stem stages
            stem[f"DS{i}"] = nn.Conv2d(c0, c0, 3, stride=2, padding=1, bias=False, **dd)
            stem[f"DS{i}-BN"] = nn.BatchNorm2d(c0, momentum=bn_momentum, **dd)
            stem[f"DS{i}-RELU"] = nn.ReLU()
        self.downsample = nn.Sequential(stem)
        self.stage0 = nn.Sequential(
            nn.Conv2d(c0, c0, 1, bias=False, **dd), nn.BatchNorm2d(c0, momentum=bn_momentum, **dd), nn.ReLU(),
        ) if cfg.has_stage0 else None
        self.fullstage = MDEQStage(cfg, **dd)
        self.feature_info = [dict(num_chs=c0, reduction=2 if d >= 1 else 1, module="downsample.2")] + [
            dict(num_chs=c, reduction=2 ** (d + i), module=f"fullstage.branches.{i}")
            for i, c in enumerate(cfg.num_channels)
        ]

    # ------------------------------------------------------------------ DEQ control
    def configure_deq(self, **options: Any) -> DEQ:
        """Change the solver settings at run time (``mdeq.core.DEQ`` options, validated; never changes modules)."""
        return self.fullstage.deq.configure(**options)

    def compile_cell(self, enable: bool = True, **compile_kwargs: Any) -> None:
        """``torch.compile`` the equilibrium cell (not the solver loop); see ``MDEQStage.compile_cell``."""
        self.fullstage.compile_cell(enable, **compile_kwargs)

    def addon_prefixes(self) -> Tuple[str, ...]:
        """State-dict prefixes of the add-ons this model has (``MDEQStage.addons``): the Skip DEQ predictor and
        the C-DEQ student, which weights of a plain MDEQ lack."""
        if self.fullstage is None:
            return ()
        names = {id(m): n for n, m in self.named_modules()}
        return tuple(f"{names[id(part)]}." for part in self.fullstage.addons().values())

    @property
    def deq(self) -> DEQ:
        return self.fullstage.deq

    @property
    def deq_stats(self) -> Optional[SolverStats]:
        """``SolverStats`` of the last forward (with ``.backward`` once its backward ran)."""
        return self.fullstage.stats if self.fullstage is not None else None

    @property
    def jac_probes(self) -> int:
        """Hutchinson probes for the Jacobian penalty in training forwards (0 = off); see ``deq_stats.jac_loss``."""
        return self.fullstage.jac_probes

    @jac_probes.setter
    def jac_probes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"jac_probes must be an integer >= 0, got {value!r}")
        self.fullstage.jac_probes = value

    # ------------------------------------------------------------------ forward pieces
    def check_input_size(self, x: torch.Tensor) -> None:
        """ValueError unless x is (B, in_chans, H, W) with H, W multiples of ``cfg.size_divisor``."""
        mdeq_check_input_size(x, self.in_chans, self.cfg.size_divisor)

    def forward_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(stride-2 stem tap, injection)."""
        self.check_input_size(x)
        tap = x
        for i, layer in enumerate(self.downsample):  # tap after the first conv-BN-ReLU
            x = layer(x)
            if i == 2:
                tap = x
        if self.stage0 is not None:
            x = self.stage0(x)
        return tap, x

    def forward_equilibrium(self, x: torch.Tensor, z0: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Image -> the list of branch equilibria (highest resolution first); ``z0``: a warm start."""
        _, inj = self.forward_stem(x)
        zs = self.fullstage(inj, z0)
        return [zs[i] for i in range(self.num_branches)]  # static indexing (FX)

    def _init_weights(self) -> None:
        """The original's init: N(0, 0.01) for convs that are not weight-normed; BN 1/0; GN, Linear default.

        The Skip DEQ predictor and the C-DEQ student keep their own init (zero last layers: an untrained one
        predicts zeros / is one teacher step)."""
        stage = getattr(self, "fullstage", None)
        own = {id(m) for part in (stage.addons().values() if stage is not None else ()) for m in part.modules()}
        for m in self.modules():
            if id(m) in own:
                continue
            if isinstance(m, nn.Conv2d) and not has_weight_norm(m):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.01)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class MDEQNet(MDEQBackbone):
    """MDEQ classifier: backbone + HRNet-style head (incre / downsamp / final_layer) + pooling + classifier."""

    def __init__(
        self,
        cfg: MDEQConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__(cfg, in_chans=in_chans, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        if not cfg.head_channels:
            raise ValueError("a classification MDEQ needs head_channels (one per branch)")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        heads = cfg.head_channels
        self.incre_modules = nn.ModuleList([
            nn.Sequential(Bottleneck(c, h, 0.1, **dd)) for c, h in zip(cfg.num_channels, heads)
        ])
        self.downsamp_modules = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(heads[i] * 4, heads[i + 1] * 4, 3, stride=2, padding=1, bias=True, **dd),
                nn.BatchNorm2d(heads[i + 1] * 4, momentum=0.1, **dd),
                nn.ReLU(),
            )
            for i in range(len(heads) - 1)
        ])
        self.final_layer = nn.Sequential(
            nn.Conv2d(heads[-1] * 4, cfg.final_chansize, 1, bias=True, **dd),
            nn.BatchNorm2d(cfg.final_chansize, momentum=0.1, **dd),
            nn.ReLU(),
        )
        self.num_features = self.head_hidden_size = cfg.final_chansize
        self.global_pool, self.head_drop, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self._init_weights()

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^downsample|^stage0",
            blocks=[
                (r"^fullstage", (0,)),
                (r"^incre_modules\.(\d+)", (1,)) if coarse else (r"^incre_modules\.(\d+)", None),
                (r"^downsamp_modules\.(\d+)", (99,)) if coarse else (r"^downsamp_modules\.(\d+)", None),
                (r"^final_layer", (100,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self):
        # the weight-norm magnitudes g: decaying them shrinks the cell's output scale, not its weights
        return {"fullstage.*.parametrizations.weight.original0"} if self.cfg.wnorm else set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise RuntimeError(
                "MDEQ does not support gradient checkpointing: its equilibrium is differentiated implicitly, "
                "so training memory already does not grow with solver depth (configure_deq(backward=...))"
            )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = getattr(self.global_pool, "pool_type", "avg")
        self.global_pool, self.head_drop, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        for m in (self.global_pool, self.head_drop, self.classifier):
            m.train(self.training)

    def _aggregate(self, zs: List[torch.Tensor]) -> torch.Tensor:
        """HRNet-style head: incre modules, stride-2 aggregation, final 1x1 layer."""
        y = self.incre_modules[0](zs[0])
        for i in range(len(self.downsamp_modules)):
            y = self.incre_modules[i + 1](zs[i + 1]) + self.downsamp_modules[i](y)
        return self.final_layer(y)

    def forward_features(self, x: torch.Tensor, z0: Optional[List[torch.Tensor]] = None
                         ) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.fullstage is None:  # pruned to the stem tap
            return self.forward_stem(x)[0]
        zs = self.forward_equilibrium(x, z0)
        if self.final_layer is None:  # aggregation head pruned
            return zs
        return self._aggregate(zs)

    def forward_states(self, zs: List[torch.Tensor]) -> torch.Tensor:
        """What ``forward`` returns, from the branch equilibria (the head after the solve; streaming export)."""
        return self.forward_head(self._aggregate(zs))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor, z0: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        logits = self.forward_head(self.forward_features(x, z0))
        stats = self.deq_stats
        if stats is not None and stats.corrections and self.final_layer is not None:
            # fixed-point correction (training): the head's outputs at the recorded trajectory states
            stats.aux_outputs = [self.forward_head(self._aggregate(c)) for c in stats.corrections]
        return logits

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Index 0 is the stem output after its first conv (stride 2 for ImageNet presets); indices 1..n are the
        branch equilibria (strides 2^downsample_times ... ). ``norm`` is unused (no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        tap, inj = self.forward_stem(x)
        intermediates = [tap] if 0 in take_indices else []
        if max_index == 0 and (stop_early or self.fullstage is None):
            return intermediates if intermediates_only else (tap, intermediates)
        zs = self.fullstage(inj)
        zs = [zs[i] for i in range(self.num_branches)]
        intermediates += [zs[i - 1] for i in take_indices if i > 0]
        if intermediates_only:
            return intermediates
        final = zs if self.final_layer is None else self._aggregate(zs)
        return final, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop what the kept taps do not need. The branches are solved jointly, so the stage goes only as a
        whole (when just the stem tap is kept); the aggregation head needs every branch."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index == 0:
            self.downsample = self.downsample[:3]  # the rest of the stem only feeds the stage
            self.stage0 = None
            self.fullstage = None
            self.num_features = self.head_hidden_size = self.feature_info[0]["num_chs"]
        if prune_head or max_index < self.num_branches:
            self.incre_modules = None
            self.downsamp_modules = None
            self.final_layer = None
            self.num_classes = 0
            self.global_pool = nn.Identity()
            self.head_drop = nn.Identity()
            self.classifier = nn.Identity()
        return take_indices


# ---------------------------------------------------------------------------------------------- builders
def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept official checkpoints (v1/v2, weight_g/weight_v) as well as this package's state dicts."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    return convert_official_state_dict(state_dict) if is_official_state_dict(state_dict) else state_dict


def _create_mdeq(variant: str, pretrained: bool = False, **kwargs) -> MDEQNet:
    cfg_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in config_field_names()}
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not any(overlay.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
        published = resolve_catalog_weights(variant, kwargs.get("pretrained_cfg"), dict(_NATIVE_CFGS[variant]))
        if published is not None:  # a published weight set: downloaded and verified by the zoo
            kwargs["pretrained_cfg"], model_args = published
            for key, value in model_args.items():  # its architecture, and the solver its metrics were measured with
                cfg_overrides.setdefault(key, value)
        elif kwargs.get("pretrained_cfg") is None:
            _refuse_missing_default(variant)
    cfg = resolve_config(CLS_PRESETS[variant], cfg_overrides)
    return build_model_with_cfg(
        MDEQNet, variant, pretrained, model_cfg=cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls=MDEQFeatures, out_indices=tuple(range(cfg.num_branches + 1))),
        **kwargs,
    )


def _refuse_missing_default(variant: str) -> None:
    """``pretrained=True`` without a tag on an architecture whose default tag has no weights: say which tags do
    (timm's own message only says there are none)."""
    from timm.models import get_pretrained_cfg

    if get_pretrained_cfg(variant).has_weights:
        return
    native = _NATIVE_CFGS[variant]["input_size"]
    tags = [f"{name} ({'x'.join(map(str, cfg['input_size'][1:]))})" for name, cfg in _published(variant).items()]
    raise RuntimeError(
        f"{variant} has no default pretrained weights: none published at its native input size "
        f"{native[1]}x{native[2]} for general use. "
        + (f"Name one by its tag, e.g. timm.create_model('{tags[0].split(' ')[0]}', pretrained=True); published: "
           f"{', '.join(tags)}. " if tags else "")
        + "Or use pretrained=False for random init.")


register_preset_builder("cls", lambda name, num_classes, device: timm.create_model(name, num_classes=num_classes,
                                                                                 device=device))


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample.0", "classifier": "classifier", "license": "mit",
        "paper_ids": "arXiv:2006.08656", "paper_name": "Multiscale Deep Equilibrium Models",
        "origin_url": "https://github.com/locuslab/deq", **kwargs,
    }


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(**{**dict(num_classes=10, input_size=(3, 32, 32), pool_size=(16, 16), crop_pct=1.0,
                          mean=CIFAR_MEAN, std=CIFAR_STD), **kwargs})


_NATIVE_CFGS = {  # each architecture's own data config: what an untrained model and its default tag use
    "mdeq_tiny": _cifar_cfg(),
    "mdeq_cifar_large": _cifar_cfg(pool_size=(4, 4)),
    "mdeq_small": _cfg(),
    "mdeq_large": _cfg(),
    "mdeq_xl": _cfg(),
}


def _published(arch: str) -> Dict[str, Dict[str, Any]]:
    """The catalog's weights of ``arch`` as timm cfgs (the native cfg with each entry's data config)."""
    return {name: dict(_NATIVE_CFGS[arch], **cfg) for name, cfg in catalog_cfgs().items()
            if name.split(".", 1)[0] == arch}


def _arch_cfgs(arch: str) -> Dict[str, Any]:
    """``arch``'s tags; the default (timm's first tag) is a published weight of general use at the native size
    (``pretrained.general_use``) if there is one, else ``untrained`` with the native cfg. Every other weight (the
    16x16 digits) is reached by its tag."""
    native = _NATIVE_CFGS[arch]
    published = _published(arch)
    general = {name: cfg for name, cfg in published.items() if general_use(cfg, native)}
    others = {name: cfg for name, cfg in published.items() if name not in general}
    if general:
        return {**general, f"{arch}.untrained": dict(native), **others}
    # '*' marks timm's default tag explicitly; it must come after the tags with weights, which timm would
    # otherwise move to the front
    return {**others, f"{arch}.untrained*": dict(native)}


default_cfgs = generate_default_cfgs({k: v for arch in _NATIVE_CFGS for k, v in _arch_cfgs(arch).items()})


@register_model
def mdeq_tiny(pretrained: bool = False, **kwargs) -> MDEQNet:
    """MDEQ-Tiny (CIFAR-10 TINY config: 2 branches of 24 channels, 32x32 input, no stem downsampling)."""
    return _create_mdeq("mdeq_tiny", pretrained, **kwargs)


@register_model
def mdeq_cifar_large(pretrained: bool = False, **kwargs) -> MDEQNet:
    """MDEQ-Large for CIFAR-10 (4 branches 32..256, 32x32 input)."""
    return _create_mdeq("mdeq_cifar_large", pretrained, **kwargs)


@register_model
def mdeq_small(pretrained: bool = False, **kwargs) -> MDEQNet:
    """MDEQ-Small for ImageNet (4 branches 32..256, E=5)."""
    return _create_mdeq("mdeq_small", pretrained, **kwargs)


@register_model
def mdeq_large(pretrained: bool = False, **kwargs) -> MDEQNet:
    """MDEQ-Large for ImageNet (4 branches 80..640, E=5)."""
    return _create_mdeq("mdeq_large", pretrained, **kwargs)


@register_model
def mdeq_xl(pretrained: bool = False, **kwargs) -> MDEQNet:
    """MDEQ-XL for ImageNet (4 branches 88..704, E=6)."""
    return _create_mdeq("mdeq_xl", pretrained, **kwargs)
