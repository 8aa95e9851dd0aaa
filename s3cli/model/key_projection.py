"""Key projection: stride-16 image feature -> memory key, shrinkage and selection (XMem)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KeyProjection"]


class KeyProjection(nn.Module):
    """Shapes: f16 (B, C16, h, w) -> key (B, CK, h, w), shrinkage (B, 1, h, w) >= 1,
    selection (B, CK, h, w) in (0, 1)."""

    def __init__(self, in_dim: int, mid_dim: int, key_dim: int) -> None:
        super().__init__()
        self.pix_feat_proj = nn.Conv2d(in_dim, mid_dim, kernel_size=1)
        self.key_proj = nn.Conv2d(mid_dim, key_dim, kernel_size=3, padding=1)
        self.d_proj = nn.Conv2d(mid_dim, 1, kernel_size=3, padding=1)  # shrinkage
        self.e_proj = nn.Conv2d(mid_dim, key_dim, kernel_size=3, padding=1)  # selection

    def forward(
        self, f16: torch.Tensor, *, need_s: bool = True, need_e: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = self.pix_feat_proj(f16)
        shrinkage = self.d_proj(x) ** 2 + 1 if need_s else None
        selection = torch.sigmoid(self.e_proj(x)) if need_e else None
        return self.key_proj(x), shrinkage, selection
