"""Object summarizer: per-object mask value -> Q weighted summaries (object memory entries)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.positional_encoding import SinePositionalEncoding

__all__ = ["ObjectSummarizer"]


class ObjectSummarizer(nn.Module):
    """Half of the summaries pool inside the object mask, half outside.

    Shapes: masks (B, N, H, W); value (B, N, Cv, h, w) -> summaries (B, N, Q, C + 1) whose last
    channel is the accumulated weight (area); logits (B, N, h, w, Q) when ``need_weights``.
    """

    def __init__(
        self,
        value_dim: int,
        embed_dim: int,
        num_summaries: int,
        pe_scale: float,
        pe_temperature: float,
    ) -> None:
        super().__init__()
        self.num_summaries = num_summaries
        self.pos_enc = SinePositionalEncoding(embed_dim, scale=pe_scale, temperature=pe_temperature)
        self.input_proj = nn.Linear(value_dim, embed_dim)
        self.feature_pred = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, embed_dim)
        )
        self.weights_pred = nn.Sequential(
            nn.Linear(embed_dim, embed_dim),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dim, num_summaries),
        )

    def forward(
        self, masks: torch.Tensor, value: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, w = value.shape[-2:]
        half = self.num_summaries // 2
        masks = F.interpolate(masks, size=(h, w), mode="area").unsqueeze(-1)  # (B, N, h, w, 1)
        allowed = torch.cat(
            [masks.expand(-1, -1, -1, -1, half), (1 - masks).expand(-1, -1, -1, -1, half)], dim=-1
        )  # (B, N, h, w, Q)
        x = self.input_proj(value.permute(0, 1, 3, 4, 2))  # (B, N, h, w, C)
        x = x + self.pos_enc(h, w, x.dtype, x.device)
        # The summaries are float32 also under autocast (as in the official code, which turns
        # CUDA autocast off here): the weights and pooled sums are precision-sensitive.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            feature = self.feature_pred(x)
            logits = self.weights_pred(x)
            weights = logits.sigmoid() * allowed  # (B, N, h, w, Q)
            sums = torch.einsum("bkhwq,bkhwc->bkqc", weights, feature)  # (B, N, Q, C)
            area = weights.flatten(2, 3).sum(2).unsqueeze(-1)  # (B, N, Q, 1)
        summaries = torch.cat([sums, area], dim=-1)
        return summaries, (logits if need_weights else None)
