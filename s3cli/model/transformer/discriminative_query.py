"""S3's discriminative query: each query picks its most similar pixel per head (paper eq. 4-6).

Replaces Cutie's masked cross-attention in the query-reads-pixels step. With q the incoming
queries and x the flattened pixels (each plus its positional embedding, L2-normalised over
channels), every head h and query j take the argmax over pixels of the per-head dot product,
masked by the foreground/background attention mask, and gather that pixel's channel slice g.
Output = final(normalize(proj(g * q), over the query axis) * alpha + g) + LN(q).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiscriminativeQueryAttention"]


class DiscriminativeQueryAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.final = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(
        self,
        q: torch.Tensor,
        x: torch.Tensor,
        q_pe: torch.Tensor,
        x_pe: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapes: q (B, Q, C); x (B, HW, C); q_pe like q; x_pe like x; attn_mask
        (B*heads, Q, HW), True = blocked. Returns the new queries (B, Q, C) and the chosen pixel
        per (head, query), (B, heads, Q)."""
        q = self.norm(q)
        residual = q
        b, n, c = x.shape
        num_q, d = q.shape[1], c // self.num_heads
        key = F.normalize(q + q_pe, dim=-1)  # (B, Q, C)
        pix = F.normalize(x + x_pe, dim=-1)  # (B, HW, C)

        pix_h = pix.view(b, n, self.num_heads, d).permute(0, 2, 1, 3)  # (B, heads, HW, d)
        key_h = key.view(b, num_q, self.num_heads, d).permute(0, 2, 1, 3)  # (B, heads, Q, d)
        score = torch.einsum("bhnc,bhqc->bhnq", pix_h, key_h)  # (B, heads, HW, Q)
        if attn_mask is not None:
            blocked = attn_mask.view(b, self.num_heads, num_q, n).transpose(2, 3)
            score = score.masked_fill(blocked, float("-inf"))
        index = score.argmax(dim=2)  # (B, heads, Q)
        gathered = torch.gather(pix_h, 2, index.unsqueeze(-1).expand(-1, -1, -1, d))
        gathered = gathered.permute(0, 2, 1, 3).reshape(b, num_q, c)  # (B, Q, C)

        out = F.normalize(self.proj(gathered * key), dim=1) * self.alpha + gathered
        return self.final(out) + residual, index
