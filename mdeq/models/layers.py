"""The MDEQ cell f_theta(z, x): per-branch residual blocks, multiscale fusion, post-fuse layers.

Operation for operation (and name for name, so converted checkpoints load) the ``fullstage`` of the original
MDEQ (locuslab/mdeq, locuslab/deq MDEQ-Vision):

    block_i(z, u) = GN3(relu(GN2(drop(conv2(relu(GN1(conv1(z))))) + u) + z))     u = x for branch 0, else 0
    z_i <- GN_{G/2}(conv1x1(relu(sum_j fuse_ij(block_j(z_j, u_j)))))

Fusion j > i: conv1x1 -> GN -> nearest upsample x2^(j-i); j < i: (conv3x3 s2 -> GN -> ReLU)* without the last
ReLU. Weight norm on conv1, conv2 and the post-fuse conv (torch parametrizations; the original's g, v).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

import torch
from torch import nn

from mdeq.core import VariationalDropout, apply_weight_norm
from mdeq.core.state import is_channels_last

from .config import MDEQConfig

__all__ = ["BasicBlock", "BranchNet", "UpsampleModule", "DownsampleModule", "MDEQCell", "propagate_nonfinite"]


class BasicBlock(nn.Module):
    """The MDEQ residual block with its injection u (added after conv2, before GN2)."""

    def __init__(self, ch: int, expansion: float, groups: int, dropout: float, affine: bool, device=None,
                 dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        inner = int(expansion * ch)
        self.conv1 = nn.Conv2d(ch, inner, 3, padding=1, bias=False, **dd)
        self.gn1 = nn.GroupNorm(groups, inner, affine=affine, **dd)
        self.conv2 = nn.Conv2d(inner, ch, 3, padding=1, bias=False, **dd)
        self.gn2 = nn.GroupNorm(groups, ch, affine=affine, **dd)
        self.gn3 = nn.GroupNorm(groups, ch, affine=affine, **dd)
        self.drop = VariationalDropout(dropout)
        self.relu = nn.ReLU(inplace=True)  # on fresh GN / sum outputs, whose backward never needs them

    def forward(self, z: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.relu(self.gn1(self.conv1(z)))
        out = self.drop(self.conv2(out))
        if u is not None:
            out = out + u
        out = self.gn2(out) + z
        return self.gn3(self.relu(out))


class BranchNet(nn.Module):
    """One resolution stream: ``blocks.0`` takes the injection (the original allows more blocks; all use one)."""

    def __init__(self, block: BasicBlock):
        super().__init__()
        self.blocks = nn.ModuleList([block])

    def forward(self, z: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.blocks[0](z, u)


class UpsampleModule(nn.Module):
    """Fusion from a lower resolution: conv1x1 -> GN -> nearest upsampling."""

    def __init__(self, in_ch: int, out_ch: int, levels: int, groups: int, affine: bool, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.net = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, 1, bias=False, **dd),
            gnorm=nn.GroupNorm(groups, out_ch, affine=affine, **dd),
            upsample=nn.Upsample(scale_factor=2 ** levels, mode="nearest"),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DownsampleModule(nn.Module):
    """Fusion from a higher resolution: (conv3x3 s2 -> GN -> ReLU) per level, no ReLU after the last."""

    def __init__(self, in_ch: int, out_ch: int, levels: int, groups: int, affine: bool, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        steps = []
        for k in range(levels):
            last = k == levels - 1
            ch = out_ch if last else in_ch
            layers = OrderedDict(
                conv=nn.Conv2d(in_ch, ch, 3, stride=2, padding=1, bias=False, **dd),
                gnorm=nn.GroupNorm(groups, ch, affine=affine, **dd),
            )
            if not last:
                layers["relu"] = nn.ReLU(inplace=True)
            steps.append(nn.Sequential(layers))
        self.net = nn.Sequential(*steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MDEQCell(nn.Module):
    """f_theta: list of branch states (+ injection into branch 0) -> list of branch states."""

    def __init__(self, cfg: MDEQConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        n, chs, g = cfg.num_branches, cfg.num_channels, cfg.num_groups
        self.num_branches = n
        self.branches = nn.ModuleList([
            BranchNet(BasicBlock(chs[i], cfg.expansion_factor, g, cfg.dropout, cfg.block_gn_affine, **dd))
            for i in range(n)
        ])
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(UpsampleModule(chs[j], chs[i], j - i, g, cfg.fuse_gn_affine, **dd))
                elif j < i:
                    row.append(DownsampleModule(chs[j], chs[i], i - j, g, cfg.fuse_gn_affine, **dd))
                else:
                    row.append(nn.Identity())
            self.fuse_layers.append(row)
        self.post_fuse_layers = nn.ModuleList([
            nn.Sequential(OrderedDict(
                relu=nn.ReLU(inplace=True),  # on the fused sum, a fresh tensor (or, with one branch, block 0's)
                conv=nn.Conv2d(chs[i], chs[i], 1, bias=False, **dd),
                gnorm=nn.GroupNorm(g // 2, chs[i], affine=cfg.post_gn_affine, **dd),
            ))
            for i in range(n)
        ])
        if cfg.wnorm:
            apply_weight_norm(self, lambda name, m: name.endswith(("conv1", "conv2")) or
                              (name.startswith("post_fuse_layers") and name.endswith("conv")))

    def forward(self, z: List[torch.Tensor], injection: torch.Tensor) -> List[torch.Tensor]:
        n = self.num_branches
        b = [self.branches[i](z[i], injection if i == 0 else None) for i in range(n)]
        out = []
        for i in range(n):
            total = b[0] if i == 0 else self.fuse_layers[i][0](b[0])
            for j in range(1, n):  # summed in the original's order, j = 0..n-1
                term = b[j] if i == j else self.fuse_layers[i][j](b[j])
                # in place once total is a fresh sum: b[0] itself is shared by the other rows
                total = total + term if i == 0 and j == 1 else total.add_(term)
            out.append(self.post_fuse_layers[i](total))
        return out


def propagate_nonfinite(states: List[torch.Tensor], injection: torch.Tensor) -> List[torch.Tensor]:
    """The branch states with every sample whose injection is not finite set to NaN.

    A solver stops a sample whose f is not finite and returns its best finite iterate, so without this a NaN or
    inf image would give confident finite logits; like any timm model, non-finite input must give non-finite
    output (the solver's no-NaN guarantee is for divergence from finite input). Static (no data-dependent
    branching), so traced and exported graphs keep it.
    """
    bad = ~torch.isfinite(injection).flatten(1).all(dim=1)
    out = []
    for t in states:
        u = t.masked_fill(bad.view(-1, *([1] * (t.dim() - 1))), float("nan"))
        if is_channels_last(t) and not is_channels_last(u):  # keep a channels-last state so
            u = u.contiguous(memory_format=torch.channels_last)             # (masked_fill of a strided view: NCHW)
        out.append(u)
    return out
