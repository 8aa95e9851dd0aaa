"""Layers that act on per-object ("group") features.

Naming legend (Cutie's): ``x`` is a feature shared by all objects, (B, C, H, W); ``g`` is a
per-object feature with an extra object axis, (B, N, C, H, W). A trailing number is the stride.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.conv_bn import conv_bn

__all__ = [
    "GConv2d",
    "CAResBlock",
    "GroupResBlock",
    "GroupFeatureFusionBlock",
    "resize_groups",
]


def resize_groups(g: torch.Tensor, ratio: float, mode: str) -> torch.Tensor:
    """Rescale (B, N, C, H, W) by ``ratio`` (bilinear without corner alignment, or area)."""
    b, n = g.shape[:2]
    align = False if mode == "bilinear" else None
    out = F.interpolate(g.flatten(0, 1), scale_factor=ratio, mode=mode, align_corners=align)
    return out.view(b, n, *out.shape[1:])


class GConv2d(nn.Conv2d):
    """A 2-D convolution applied to every object of a (B, N, C, H, W) tensor."""

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        b, n = g.shape[:2]
        out = super().forward(g.flatten(0, 1))
        return out.view(b, n, *out.shape[1:])


class CAResBlock(nn.Module):
    """Residual block of two 3x3 convs (pre-activation) with ECA-style channel attention."""

    def __init__(self, in_dim: int, out_dim: int, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1)
        t = int((abs(math.log2(out_dim)) + 1) // 2)
        k = t if t % 2 else t + 1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        if residual:
            self.downsample: nn.Module = (
                nn.Identity() if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, kernel_size=1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x
        x = self.conv2(conv_bn(self.conv1, None, F.relu(x), relu=True))
        b, c = x.shape[:2]
        w = self.pool(x).view(b, 1, c)
        w = self.conv(w).transpose(-1, -2).unsqueeze(-1).sigmoid()  # (B, C, 1, 1)
        if self.residual:
            return x * w + self.downsample(r)
        return x * w


class GroupResBlock(nn.Module):
    """Pre-activation residual block on (B, N, C, H, W); 1x1 skip when channels change."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.downsample: nn.Module = (
            nn.Identity() if in_dim == out_dim else GConv2d(in_dim, out_dim, kernel_size=1)
        )
        self.conv1 = GConv2d(in_dim, out_dim, kernel_size=3, padding=1)
        self.conv2 = GConv2d(out_dim, out_dim, kernel_size=3, padding=1)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        b, n = g.shape[:2]
        skip = self.downsample(g).flatten(0, 1)
        out = conv_bn(self.conv1, None, F.relu(g.flatten(0, 1)), relu=True)
        out = conv_bn(self.conv2, None, out, residual=skip)
        return out.view(b, n, *out.shape[1:])


class _AddDistributor(nn.Module):
    """Project a shared feature and per-object features, then add them per object."""

    def __init__(self, x_in_dim: int, g_in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.x_transform = nn.Conv2d(x_in_dim, out_dim, kernel_size=1)
        self.g_transform = GConv2d(g_in_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.x_transform(x).unsqueeze(1) + self.g_transform(g)  # (B, N, C, H, W)


class GroupFeatureFusionBlock(nn.Module):
    """Fuse the shared pixel feature into per-object features: add, then two CA res-blocks."""

    def __init__(self, x_in_dim: int, g_in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.distributor = _AddDistributor(x_in_dim, g_in_dim, out_dim)
        self.block1 = CAResBlock(out_dim, out_dim)
        self.block2 = CAResBlock(out_dim, out_dim)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        b, n = g.shape[:2]
        g = self.distributor(x, g).flatten(0, 1)  # (B*N, C, H, W)
        g = self.block2(self.block1(g))
        return g.view(b, n, *g.shape[1:])
