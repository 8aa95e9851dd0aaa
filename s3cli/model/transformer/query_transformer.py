"""The object (query) transformer: object queries read the pixel readout and write back.

Cutie's blocks read pixels with masked cross-attention; S3's with the discriminative query.
"""

from __future__ import annotations

import torch
from torch import nn

from s3cli.model.layers.aggregate import aggregate
from s3cli.model.layers.group import GConv2d
from s3cli.model.layers.positional_encoding import SinePositionalEncoding
from s3cli.model.transformer.attention import FFN, CrossAttention, PixelFFN, SelfAttention
from s3cli.model.transformer.discriminative_query import DiscriminativeQueryAttention

__all__ = ["QueryTransformerBlock", "QueryTransformer"]


class QueryTransformerBlock(nn.Module):
    """Queries read pixels, self-attend, FFN; pixels read the queries; pixel FFN."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, discriminative: bool) -> None:
        super().__init__()
        self.read_from_pixel: nn.Module = (
            DiscriminativeQueryAttention(dim, num_heads)
            if discriminative
            else CrossAttention(dim, num_heads)
        )
        self.self_attn = SelfAttention(dim, num_heads)
        self.ffn = FFN(dim, ff_dim)
        self.read_from_query = CrossAttention(dim, num_heads, norm=False)
        self.pixel_ffn = PixelFFN(dim)

    def forward(
        self,
        x: torch.Tensor,
        pixel: torch.Tensor,
        query_pe: torch.Tensor,
        pixel_pe: torch.Tensor,
        attn_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapes: x (B*N, Q, C); pixel (B, N, C, h, w); query_pe (B*N, Q, C);
        pixel_pe (B*N, h*w, C); attn_mask (B*N*heads, Q, h*w)."""
        pixel_flat = pixel.flatten(3, 4).flatten(0, 1).transpose(1, 2).contiguous()  # (BN, HW, C)
        x, _ = self.read_from_pixel(x, pixel_flat, query_pe, pixel_pe, attn_mask=attn_mask)
        x = self.ffn(self.self_attn(x, query_pe))
        pixel_flat, _ = self.read_from_query(pixel_flat, x, pixel_pe, query_pe)
        return x, self.pixel_ffn(pixel, pixel_flat)


class QueryTransformer(nn.Module):
    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_queries: int,
        num_blocks: int,
        ff_dim: int,
        pe_scale: float,
        pe_temperature: float,
        discriminative: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.query_init = nn.Embedding(num_queries, embed_dim)
        self.query_emb = nn.Embedding(num_queries, embed_dim)
        self.summary_to_query_init = nn.Linear(embed_dim, embed_dim)
        self.summary_to_query_emb = nn.Linear(embed_dim, embed_dim)
        self.pixel_init_proj = GConv2d(embed_dim, embed_dim, kernel_size=1)
        self.pixel_emb_proj = GConv2d(embed_dim, embed_dim, kernel_size=1)
        self.spatial_pe = SinePositionalEncoding(
            embed_dim, scale=pe_scale, temperature=pe_temperature
        )
        self.blocks = nn.ModuleList(
            QueryTransformerBlock(embed_dim, num_heads, ff_dim, discriminative)
            for _ in range(num_blocks)
        )
        self.mask_pred = nn.ModuleList(
            nn.Sequential(nn.ReLU(), GConv2d(embed_dim, 1, kernel_size=1))
            for _ in range(num_blocks + 1)
        )

    def forward(
        self,
        pixel: torch.Tensor,
        obj_summaries: torch.Tensor,
        selector: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Shapes: pixel (B, N, C, h, w); obj_summaries (B, N, T, Q, C + 1) (T = 1 at inference,
        the memory keeps running sums) -> readout (B, N, C, h, w) and the aux logits
        (B, N, h, w) before the first block and after each block."""
        b, n, _, h, w = pixel.shape
        t = obj_summaries.shape[2]
        summaries = obj_summaries.view(b * n, t, self.num_queries, self.embed_dim + 1)
        obj_sums = summaries[:, :, :, :-1].sum(dim=1)
        obj_area = summaries[:, :, :, -1:].sum(dim=1)
        obj_values = obj_sums / (obj_area + 1e-4)  # (BN, Q, C)
        query = self.query_init.weight.unsqueeze(0) + self.summary_to_query_init(obj_values)
        query_emb = self.query_emb.weight.unsqueeze(0) + self.summary_to_query_emb(obj_values)

        pixel_init = self.pixel_init_proj(pixel)
        pixel_emb = self.pixel_emb_proj(pixel)
        pe = self.spatial_pe(h, w, pixel.dtype, pixel.device).flatten(0, 1)  # (HW, C)
        pixel_emb = pixel_emb.flatten(3, 4).flatten(0, 1).transpose(1, 2)  # (BN, HW, C)
        pixel_pe = pe.unsqueeze(0) + pixel_emb

        pixel = pixel_init
        aux_logits = [self.mask_pred[0](pixel).squeeze(2)]
        attn_mask = self._attention_mask(aux_logits[0], selector)
        for i, block in enumerate(self.blocks):
            query, pixel = block(query, pixel, query_emb, pixel_pe, attn_mask)
            aux_logits.append(self.mask_pred[i + 1](pixel).squeeze(2))
            attn_mask = self._attention_mask(aux_logits[-1], selector)
        return pixel, {"logits": aux_logits}

    def _attention_mask(self, logits: torch.Tensor, selector: torch.Tensor | None) -> torch.Tensor:
        """Foreground queries see only pixels their object wins; background queries the rest.

        Shapes: logits (B, N, h, w) -> (B*N*heads, Q, h*w), True = blocked. A query row that
        would be fully blocked is unblocked entirely.
        """
        prob = logits.sigmoid()
        if selector is not None:
            prob = prob * selector
        agg = aggregate(prob, dim=1)
        is_fg = (agg[:, 1:] >= agg.max(dim=1, keepdim=True)[0]).flatten(2)  # (B, N, HW)
        half = self.num_queries // 2
        fg_block = (~is_fg)[:, :, None, None, :].expand(-1, -1, self.num_heads, half, -1)
        bg_block = is_fg[:, :, None, None, :].expand(-1, -1, self.num_heads, half, -1)
        mask = torch.cat([fg_block, bg_block], dim=3).flatten(0, 2)  # (BNH, Q, HW)
        mask = mask.clone()
        mask[mask.all(dim=-1)] = False
        return mask
