"""Plain ViT in the DINOv2 layout: the frozen backbone of S3's image encoder.

A 16x16 stride-16 patch embedding, a CLS token, a learned position table for a square grid (DINOv2
style: resized bicubically with scale factors ``(n + 0.1) / grid`` for other input sizes), and
pre-LayerNorm blocks with LayerScale on both residual branches. Parameter names follow DINOv2
(``patch_embed.proj``, ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...). The final ``norm`` and
``mask_token`` exist for state_dict compatibility; the adapter never uses them.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "VisionTransformer"]


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution: ``(B, 3, H, W) -> (B, h*w, C)``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.proj(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), h, w  # (B, h*w, C)


ATTENTION_SCORES = 1 << 22
"""Most attention scores :func:`blocked_attention` holds at once (8 MiB in bf16)."""


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    max_scores: int = ATTENTION_SCORES,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` (the explicit formulation), one head at a time.

    Shapes: q (B, heads, N, D), k and v (B, heads, M, D) -> (B, heads, N, D). Each head's
    queries go in blocks of at most ``max_scores // M`` rows (all 1,621 of a 480p frame's
    tokens in one), so the block's ``(rows, M)`` attention map stays in cache and its two
    products run on the matrix kernels, each over one head's whole keys and values. On the
    2-core AMD machine (bf16, one 480p ViT-B layer) the two products take 21-22 ms this way
    against 24-25 ms in the blocks of 128 queries across all heads used before; the softmax
    is the same 11-14 ms either way. Used for bf16/fp16 on the CPU, where PyTorch's flash
    kernel is no faster than in float32 (0.125 s vs 0.072 s here for one 480p ViT-B attention
    on one thread); softmax rows are independent, so blocking changes nothing but memory
    traffic (on a 480p-sized random input the result was bit-identical to the blocks of 128).
    """
    batch, heads, n, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_t = k.transpose(-2, -1).contiguous()  # (B, heads, D, M), once for every block
    v = v.contiguous()
    rows = max(1, min(n, max_scores // k.shape[2]))
    for b, h in itertools.product(range(batch), range(heads)):
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            attn = torch.matmul(q[b, h, start:stop] * scale, k_t[b, h]).softmax(dim=-1)
            torch.matmul(attn, v[b, h], out=out[b, h, start:stop])
    return out


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    ``fused`` runs ``scaled_dot_product_attention`` (a flash kernel on CPU and CUDA: the
    ``(N, N)`` attention map is never written out, 3-4x faster at 480p on CPU); otherwise the
    explicit ``softmax(q k^T / sqrt(d)) v`` of DINOv2, which is what the official code runs.
    Both give the same result to float32 rounding (checked against the fixtures in the tests).
    In bf16/fp16 on the CPU the fused path runs :func:`blocked_attention` instead.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C/heads)
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv.unbind(0)
        if self.fused and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            x = blocked_attention(q, k, v, self.scale)  # (B, heads, N, C/heads)
        elif self.fused:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, N, C/heads)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        eps: float = 1e-6,
        qkv_bias: bool = True,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused=fused_attention)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """DINOv2-style ViT: patch embedding, CLS token, resizable position table, blocks.

    ``pos_grid`` is the side of the square position grid the table was trained for (37 for
    592x592 inputs with patch 16); the table has ``1 + pos_grid**2`` rows, the CLS row first.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden: int = 3072,
        patch_size: int = 16,
        pos_grid: int = 37,
        eps: float = 1e-6,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused (DINOv2 training)
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_hidden, eps=eps, fused_attention=fused_attention)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)  # unused by the adapter
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position table for an ``h x w`` patch grid, ``(1, 1 + h*w, C)``.

        DINOv2's rule: the grid is resized bicubically with scale factors ``(h + 0.1) / grid`` and
        ``(w + 0.1) / grid`` (not to a target size: the +0.1 moves the sampling positions), and
        the table is used as is for the square training grid.
        """
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        g = math.sqrt(n)
        patch_pos = pos[:, 1:].reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic"
        )  # (1, C, h, w)
        if patch_pos.shape[-2:] != (h, w):
            raise RuntimeError(
                f"position table resized to {tuple(patch_pos.shape[-2:])}, not {h}x{w}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((pos[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Image ``(B, 3, H, W)`` to ``[cls, patches] + pos``: ``(B, 1 + h*w, C)``, h, w."""
        tokens, h, w = self.patch_embed(x)  # (B, h*w, C)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(h, w), h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All blocks on the image's tokens, then the final norm: ``(B, 1 + h*w, C)``."""
        tokens, _, _ = self.prepare_tokens(x)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)
