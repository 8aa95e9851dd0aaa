"""Attention layers of the object transformer (Cutie's, after PyTorch's nn.Transformer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.group import CAResBlock

__all__ = ["SelfAttention", "CrossAttention", "FFN", "PixelFFN", "multihead_attention"]


def multihead_attention(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mha(query, key, value, attn_mask=attn_mask, need_weights=False)[0]`` for a
    ``batch_first`` module: ``(B, L, E)`` inputs, ``(B, Lq, E)`` output.

    The module computes sequence-first; it transposes batch-first inputs to ``(L, B, E)``
    views, and its input projections then meet a non-contiguous 3-d input, which
    ``torch.matmul`` runs as a batched product against the weight expanded over ``L``. In bf16
    under CPU autocast that expanded weight is materialised, ``L x E x E`` (202 MiB for the
    1620 pixels of a 480p frame and E = 256) on every call: with three objects, 1.8 GiB of
    fresh memory per frame and most of cutie-base's time. Here the sequence-first inputs are
    made contiguous first (a copy of each input), so each projection is one 2-d product; the
    computation is the module's own (``F.multi_head_attention_forward`` with its parameters).
    """
    if not mha.batch_first or not mha._qkv_same_embed_dim or query.dim() != 3:
        return mha(query, key, value, attn_mask=attn_mask, need_weights=False)[0]
    q = query.transpose(0, 1).contiguous()
    k = q if key is query else key.transpose(0, 1).contiguous()
    v = k if value is key else value.transpose(0, 1).contiguous()
    out, _ = F.multi_head_attention_forward(
        q,
        k,
        v,
        mha.embed_dim,
        mha.num_heads,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        mha.dropout,
        mha.out_proj.weight,
        mha.out_proj.bias,
        training=mha.training,
        need_weights=False,
        attn_mask=attn_mask,
    )
    return out.transpose(0, 1)


class SelfAttention(nn.Module):
    """Pre-LN self-attention; q = k = LN(x) + pe, v = LN(x); the residual is LN(x)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        qk = x + pe
        return x + multihead_attention(self.self_attn, qk, qk, x)


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
        out = multihead_attention(self.cross_attn, x + x_pe, mem + mem_pe, mem, attn_mask)
        return x + out, None


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
