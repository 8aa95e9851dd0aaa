"""Attention layers of the object transformer (Cutie's, after PyTorch's nn.Transformer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.group import CAResBlock

__all__ = ["SelfAttention", "CrossAttention", "FFN", "PixelFFN"]


class SelfAttention(nn.Module):
    """Pre-LN self-attention; q = k = LN(x) + pe, v = LN(x); the residual is LN(x)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        qk = x + pe
        return x + self.self_attn(qk, qk, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    """x reads mem: q = [LN](x) + x_pe, k = mem + mem_pe, v = mem; residual from [LN](x)."""

    def __init__(self, dim: int, num_heads: int, norm: bool = True) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm: nn.Module = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        mem: torch.Tensor,
        x_pe: torch.Tensor,
        mem_pe: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.norm(x)
        out = self.cross_attn(x + x_pe, mem + mem_pe, mem, attn_mask=attn_mask, need_weights=False)
        return x + out[0], None


class FFN(nn.Module):
    """Pre-LN feed-forward (ReLU) with a residual from the un-normalised input."""

    def __init__(self, dim: int, ff_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear2(F.relu(self.linear1(self.norm(x))))


class PixelFFN(nn.Module):
    """Channel-attention residual conv block on the pixel map that has read the queries.

    Shapes: pixel (B, N, C, h, w) (only its shape is used); pixel_flat (B*N, h*w, C).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv = CAResBlock(dim, dim)

    def forward(self, pixel: torch.Tensor, pixel_flat: torch.Tensor) -> torch.Tensor:
        b, n, _, h, w = pixel.shape
        x = pixel_flat.view(b * n, h, w, self.dim).permute(0, 3, 1, 2).contiguous()
        return self.conv(x).view(b, n, self.dim, h, w)
