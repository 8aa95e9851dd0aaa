"""Pixel feature fuser: memory readout + compressed sensory + last mask + pixel feature."""

from __future__ import annotations

import torch
from torch import nn

from s3cli.model.layers.group import GConv2d, GroupFeatureFusionBlock

__all__ = ["PixelFeatureFuser"]


class PixelFeatureFuser(nn.Module):
    """Shapes: pix_feat (B, Cp, h, w); pixel_memory (B, N, Cv, h, w); sensory (B, N, Cs, h, w);
    last_mask, last_others (B, N, h, w) -> (B, N, C, h, w)."""

    def __init__(
        self,
        pixel_dim: int,
        value_dim: int,
        sensory_dim: int,
        embed_dim: int,
        single_object: bool = False,
    ) -> None:
        super().__init__()
        self.single_object = single_object
        self.fuser = GroupFeatureFusionBlock(pixel_dim, value_dim, embed_dim)
        extra = 1 if single_object else 2
        self.sensory_compress = GConv2d(sensory_dim + extra, value_dim, kernel_size=1)

    def forward(
        self,
        pix_feat: torch.Tensor,
        pixel_memory: torch.Tensor,
        sensory: torch.Tensor,
        last_mask: torch.Tensor,
        last_others: torch.Tensor | None,
        *,
        chunk_size: int = -1,
    ) -> torch.Tensor:
        n = pixel_memory.shape[1]
        if self.single_object or last_others is None:
            masks = last_mask.unsqueeze(2)
        else:
            masks = torch.stack([last_mask, last_others], dim=2)  # (B, N, 2, h, w)
        if chunk_size < 1:
            chunk_size = n
        out: list[torch.Tensor] = []
        for i in range(0, n, chunk_size):
            s = slice(i, i + chunk_size)
            sensory_readout = self.sensory_compress(torch.cat([sensory[:, s], masks[:, s]], 2))
            out.append(self.fuser(pix_feat, pixel_memory[:, s] + sensory_readout))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)
