"""Sensory memory updates: a GRU-like cell on per-object hidden states."""

from __future__ import annotations

import torch
from torch import nn

from s3cli.model.layers.group import GConv2d, resize_groups

__all__ = ["gru_update", "SensoryUpdater", "SensoryDeepUpdater"]


def gru_update(h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """new = forget * h * (1 - update) + update * tanh(candidate).

    Shapes: h (B, N, C, h, w); values (B, N, 3C, h, w) = [forget, update, candidate] logits.
    """
    c = values.shape[2] // 3
    forget = torch.sigmoid(values[:, :, :c])
    update = torch.sigmoid(values[:, :, c : 2 * c])
    candidate = torch.tanh(values[:, :, 2 * c :])
    return forget * h * (1 - update) + update * candidate


class SensoryDeepUpdater(nn.Module):
    """Sensory update from the mask encoder's value (run on memory frames)."""

    def __init__(self, f_dim: int, sensory_dim: int) -> None:
        super().__init__()
        self.transform = GConv2d(f_dim + sensory_dim, sensory_dim * 3, kernel_size=3, padding=1)

    def forward(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        g, h = g.float(), h.float()
        return gru_update(h, self.transform(torch.cat([g, h], dim=2)))


class SensoryUpdater(nn.Module):
    """Sensory update from the decoder's multi-scale features (run on segmented frames)."""

    def __init__(self, g_dims: tuple[int, int, int], mid_dim: int, sensory_dim: int) -> None:
        super().__init__()
        self.g16_conv = GConv2d(g_dims[0], mid_dim, kernel_size=1)
        self.g8_conv = GConv2d(g_dims[1], mid_dim, kernel_size=1)
        self.g4_conv = GConv2d(g_dims[2], mid_dim, kernel_size=1)
        self.transform = GConv2d(mid_dim + sensory_dim, sensory_dim * 3, kernel_size=3, padding=1)

    def forward(self, g: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """g: [p16, p8, p4] per-object decoder features; h: (B, N, C, h, w) sensory."""
        x = (
            self.g16_conv(g[0])
            + self.g8_conv(resize_groups(g[1], 1 / 2, "area"))
            + self.g4_conv(resize_groups(g[2], 1 / 4, "area"))
        )
        x, h = x.float(), h.float()
        return gru_update(h, self.transform(torch.cat([x, h], dim=2)))
