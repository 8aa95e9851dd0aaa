"""Auxiliary heads used only by training losses (kept so checkpoints load unchanged)."""

from __future__ import annotations

import torch
from torch import nn

from s3cli.model.layers.group import GConv2d

__all__ = ["AuxComputer", "LinearPredictor"]


class LinearPredictor(nn.Module):
    """Per-object linear classifier of the pixel feature, its weights predicted from ``x``."""

    def __init__(self, x_dim: int, pix_dim: int) -> None:
        super().__init__()
        self.projection = GConv2d(x_dim, pix_dim + 1, kernel_size=1)

    def forward(self, pix_feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """pix_feat (B, C, h, w); x (B, N, Cx, h, w) -> logits (B, N, h, w)."""
        x = self.projection(x)
        return (pix_feat.unsqueeze(1) * x[:, :, :-1]).sum(dim=2) + x[:, :, -1]


class AuxComputer(nn.Module):
    def __init__(self, sensory_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.sensory_aux = LinearPredictor(sensory_dim, embed_dim)
