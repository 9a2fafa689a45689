"""MDEQ parts of the cheap-equilibrium methods: the Skip DEQ initializer and the C-DEQ generator.

* ``MultiscaleInitializer`` (Skip DEQ, Pal et al.): an explicit prediction g(x) of every branch's equilibrium
  from the injection: a 3x3 conv at the top resolution, then one stride-2 3x3 conv per lower branch, each
  followed by a zero-initialised 1x1 conv to the branch width, so an untrained initializer predicts zeros
  (the plain DEQ's start) and training moves it towards z*.
* ``MultiscaleGenerator`` (C-DEQ, Lin et al.): G(s, t) per resolution, s_i + 1x1(ReLU(kxk(s_i) + e_i(t))) with
  a time embedding e_i(t) of log(t/T) (k = 1 as in the C-DEQ recipe, or 3 for spatial context); the last 1x1
  starts at zero, so an untrained student is one teacher step. The consistency solver hands it the packed (B, D) state: the stage sets ``packer`` to unpack it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..core.state import StatePacker

__all__ = ["MultiscaleInitializer", "MultiscaleGenerator"]


def _groups(channels: int, num_groups: int) -> int:
    g = min(num_groups, channels)
    while channels % g:
        g -= 1
    return g


class MultiscaleInitializer(nn.Module):
    """injection (B, C0, H, W) -> [z0_i (B, C_i, H / 2^i, W / 2^i)] for every branch."""

    def __init__(self, in_channels: int, channels: Sequence[int], num_groups: int = 8, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.trunks = nn.ModuleList()
        self.heads = nn.ModuleList()
        prev = in_channels
        for i, c in enumerate(channels):
            self.trunks.append(nn.Sequential(
                nn.Conv2d(prev, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False, **dd),
                nn.GroupNorm(_groups(c, num_groups), c, **dd), nn.ReLU()))
            head = nn.Conv2d(c, c, 1, **dd)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.heads.append(head)
            prev = c

    def forward(self, injection: torch.Tensor) -> List[torch.Tensor]:
        out, h = [], injection
        for trunk, head in zip(self.trunks, self.heads):
            h = trunk(h)
            out.append(head(h))
        return out


class MultiscaleGenerator(nn.Module):
    """C-DEQ's G for MDEQ states: per-resolution 1x1 convs conditioned on the time (see the module docstring)."""

    def __init__(self, channels: Sequence[int], T: float = 5.0, hidden_factor: int = 1, time_dim: int = 16,
                 kernel_size: int = 1, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if kernel_size not in (1, 3):
            raise ValueError(f"student_kernel_size must be 1 or 3, got {kernel_size}")
        self.T = float(T)
        self.time_mlp = nn.Sequential(nn.Linear(1, time_dim, **dd), nn.SiLU())
        self.inp = nn.ModuleList([nn.Conv2d(c, c * hidden_factor, kernel_size, padding=kernel_size // 2, **dd)
                                  for c in channels])
        self.time = nn.ModuleList([nn.Linear(time_dim, c * hidden_factor, **dd) for c in channels])
        self.out = nn.ModuleList([nn.Conv2d(c * hidden_factor, c, 1, **dd) for c in channels])
        for conv in self.out:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.packer: Optional[StatePacker] = None  # set by the stage before each solve

    def forward(self, s, t: torch.Tensor):
        flat = isinstance(s, torch.Tensor) and s.dim() == 2
        if flat:
            if self.packer is None:
                raise RuntimeError("MultiscaleGenerator got a packed state but no packer was set")
            state = self.packer.unpack(s)
        else:
            state = list(s)
        emb = self.time_mlp((torch.log(t.to(state[0].dtype) / self.T) / 4).view(-1, 1))
        out = [z + o(torch.relu(i(z) + e(emb)[:, :, None, None]))
               for z, i, e, o in zip(state, self.inp, self.time, self.out)]
        return self.packer.pack(out) if flat else out
