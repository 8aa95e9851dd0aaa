"""2-D sine positional encoding (normalised coordinates, x-code then y-code channels)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinePositionalEncoding"]


class SinePositionalEncoding(nn.Module):
    """Sine/cosine code of normalised pixel coordinates, channel-last.

    For ``dim`` channels, ``dim // 2`` encode x (interleaved sin, cos) and ``dim // 2`` encode y.
    Coordinates run 0..``scale`` across the grid. ``inv_freq`` is a persistent buffer (it is in
    the official checkpoints). Returns (H, W, dim).
    """

    def __init__(self, dim: int, scale: float = 2 * math.pi, temperature: float = 10000) -> None:
        super().__init__()
        half = int(math.ceil(dim / 4) * 2)
        self.half = half
        self.scale = scale
        inv_freq = 1.0 / (temperature ** (torch.arange(0, half, 2).float() / half))
        self.register_buffer("inv_freq", inv_freq)

    def _axis(self, n: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=self.inv_freq.dtype)
        pos = pos / (pos[-1] + 1e-6) * self.scale
        arg = torch.einsum("i,j->ij", pos, self.inv_freq)  # (n, half/2)
        return torch.stack((arg.sin(), arg.cos()), dim=-1).flatten(-2)  # (n, half)

    def forward(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        emb = torch.empty((h, w, self.half * 2), device=device, dtype=dtype)
        emb[:, :, : self.half] = self._axis(w, device)
        emb[:, :, self.half :] = self._axis(h, device).unsqueeze(1)
        return emb  # (H, W, C)
