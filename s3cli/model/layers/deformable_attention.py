"""Multi-scale deformable attention (Deformable DETR / Mask2Former ``MSDeformAttn``) in PyTorch.

Each query predicts, per head and feature level, a few sampling offsets around its reference
point and one attention weight per sampled point (softmax over all levels and points of a head).
The sampled values are read from the projected value maps with bilinear interpolation
(``F.grid_sample``, zero padding, ``align_corners=False``) and summed with those weights.

Two samplers compute this:

- ``grid_sample`` (:func:`ms_deform_attn_core`): Mask2Former's ``ms_deform_attn_core_pytorch``,
  the path the official S3 code takes on CPU, with the operations in the same order;
- ``gather`` (:func:`ms_deform_attn_gather`, the default): every sample becomes its four bilinear
  corners, each weighted by (bilinear weight x attention weight), and one weighted
  ``embedding_bag`` sums the corner rows of the value table per (query, head); the table has a
  zero border, so corners outside the map need no mask (21 -> 12 ms per call on the adapter's
  480p shapes, two cores).
  The value table is read in its natural row layout (grid_sample wants ``(N*M, D, H, W)`` and
  reads one channel plane at a time), and the ``(N*M, D, Lq, P)`` sample tensor is never
  written: 7-8x faster on CPU at 480p. Corner positions and bilinear weights are computed as
  grid_sample computes them, so the interpolation is bit-identical; only the order of the final
  weighted sum differs (float32 rounding, ~1e-7 relative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MSDeformAttn",
    "Sampler",
    "ms_deform_attn_core",
    "ms_deform_attn_gather",
    "reference_points_for",
]

Sampler = Literal["gather", "grid_sample"]


def reference_points_for(
    spatial_shapes: Sequence[tuple[int, int]],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cell centres of each grid, normalised to [0, 1]: ``((j + 0.5) / W, (i + 0.5) / H)``.

    Grids are flattened row-major and concatenated in the given order. Returns ``(1, sum HW, 2)``
    with the last axis ordered (x, y), as the deformable attention expects.
    """
    refs = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device),
            indexing="ij",
        )
        refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    return torch.cat(refs, 0)[None]  # (1, Lq, 2)


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample and weight the value maps.

    Args:
        value: ``(N, S, M, D)`` per-head values of all levels, S = sum of H_l * W_l.
        spatial_shapes: ``[(H_l, W_l), ...]`` of the levels, in the order they appear in ``value``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` in [0, 1] (x, y); outside samples read zeros.
        attention_weights: ``(N, Lq, M, L, P)``, normalised over ``L * P``.

    Returns:
        ``(N, Lq, M * D)``.
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1  # grid_sample coordinates in [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (N, HW, M, D) -> (N, HW, M*D) -> (N, M*D, HW) -> (N*M, D, H, W)
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # (N*M, D, Lq, P)
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    stacked = sampled[0] if n_levels == 1 else torch.stack(sampled, dim=-2).flatten(-2)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)  # (N, M*D, Lq)
    return out.transpose(1, 2).contiguous()  # (N, Lq, M*D)


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as :func:`ms_deform_attn_core`, computed as one weighted row gather.

    The value table is laid out head-major, ``(N, M, S', D)``, each level's map with a border of
    zeros two cells wide. Every sample's top-left corner is clamped to [-2, size] per axis
    (before the border offset), so both of its columns and rows land in the bordered map, and a
    corner outside the map reads the zero that grid_sample's zero padding gives it: no corner
    needs a mask, and the indices are int32. The sums take the same terms in the same order as
    grid_sample's bilinear weights times the attention weights (outside corners add zeros).

    Returns ``(N, Lq, M * D)`` in ``value``'s dtype; the sampling itself runs in float32.
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    device = value.device
    sizes = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=device)
    sizes = sizes[:, None, :]  # (L, 1, 2), broadcast over points
    grids = 2 * sampling_locations.float() - 1  # (N, Lq, M, L, P, 2) in [-1, 1]
    # Pixel coordinates with align_corners=False as grid_sample's CPU kernel forms them: one fused
    # multiply-add g * size/2 + (size-1)/2 (a separate multiply and add rounds differently).
    pix = torch.addcmul((sizes - 1) / 2, grids, sizes / 2)
    corner = pix.floor()
    frac = pix - corner  # (..., 2): fractional x, y
    # Head-major bordered table: level l is an (H_l + 4) x (W_l + 4) grid of rows per head.
    tables, starts, total = [], [], 0
    levels = value.split([h * w for h, w in spatial_shapes], 1)
    for level, (h, w) in zip(levels, spatial_shapes, strict=True):
        grid = level.float().reshape(n, h, w, m, d).permute(0, 3, 1, 2, 4)  # (N, M, H, W, D)
        tables.append(F.pad(grid, (0, 0, 2, 2, 2, 2)).flatten(2, 3))  # (N, M, S_l', D)
        starts.append(total)
        total += (h + 4) * (w + 4)
    table = tables[0] if n_levels == 1 else torch.cat(tables, 2)  # (N, M, S', D)
    # Bordered coordinates of the left column and top row: (N, Lq, M, L, P, 2) in [0, size + 2].
    near = corner.clamp_(min=-2).minimum(sizes).add_(2).to(torch.int32)
    far = near + 1
    width = sizes[..., 0].to(torch.int32) + 4  # (L, 1): bordered row length
    # First row of each (batch, head) table and level: (N, 1, M, L, 1).
    bag = torch.arange(n * m, dtype=torch.int32, device=device).view(n, 1, m, 1, 1)
    base = bag * total + torch.tensor(starts, dtype=torch.int32, device=device).view(-1, 1)
    top = base + near[..., 1] * width  # (N, Lq, M, L, P)
    bottom = base + far[..., 1] * width
    left, right = near[..., 0], far[..., 0]
    fx, fy = frac[..., 0], frac[..., 1]
    gx, gy = 1 - fx, 1 - fy
    weights = attention_weights.float()
    # Corners in the order (top, left), (top, right), (bottom, left), (bottom, right).
    rows = torch.empty((n, lq, m, n_levels, n_points, 4), dtype=torch.int32, device=device)
    for k, (row, col) in enumerate(((top, left), (top, right), (bottom, left), (bottom, right))):
        torch.add(row, col, out=rows[..., k])
    pairs = ((gy, gx), (gy, fx), (fy, gx), (fy, fx))  # bilinear weights of the four corners
    if torch.is_grad_enabled() and (weights.requires_grad or frac.requires_grad):
        coeff = torch.stack([wy * wx * weights for wy, wx in pairs], -1)
    else:  # written in place, no stacking copy
        coeff = torch.empty(rows.shape, dtype=torch.float32, device=device)
        for k, (wy, wx) in enumerate(pairs):
            torch.mul(wy * wx, weights, out=coeff[..., k])
    per_bag = n_levels * n_points * 4
    out = F.embedding_bag(
        rows.view(-1, per_bag),
        table.reshape(-1, d),
        per_sample_weights=coeff.view(-1, per_bag),
        mode="sum",
    )  # (N * Lq * M, D): one bag per (batch, query, head)
    return out.view(n, lq, m * d).to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with full-width value and output projections.

    Parameter names follow Mask2Former (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``). The official ViT-adapter passes a ``ratio`` that shrinks
    the value width in other implementations; S3's checkpoints use the full ``d_model`` width, so
    there is no such argument here. ``sampler`` picks the sampling kernel (see the module notes).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        sampler: Sampler = "gather",
    ) -> None:
        super().__init__()
        if sampler not in ("gather", "grid_sample"):
            raise ValueError(f"unknown sampler {sampler!r}")
        self.sampler = sampler
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: offsets start on rays around the reference point."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to the flattened multi-level ``input_flatten``.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N or 1, Lq, L, 2)`` in [0, 1], (x, y), one point per level.
            input_flatten: ``(N, S, C)``, the levels' maps flattened row-major and concatenated.
            spatial_shapes: ``[(H_l, W_l), ...]`` with ``sum H_l * W_l == S``.
            padding_mask: optional ``(N, S)``, True where the input is padding (reads zero).

        Returns:
            ``(N, Lq, C)``.
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(spatial_shapes)}")
        if sum(h * w for h, w in spatial_shapes) != s:
            raise ValueError(f"spatial shapes {list(spatial_shapes)} do not cover {s} inputs")
        m, lv, p = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)  # (N, S, C)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)  # (N, S, M, D)
        if query.is_floating_point() and torch.is_autocast_enabled(query.device.type):
            # Both projections read the query: cast it to the autocast dtype once (what each
            # would do on its own: the same values) instead of twice; at 480p the query is the
            # adapter's 8100 x 768 stride-8/16 tokens.
            query = query.to(torch.get_autocast_dtype(query.device.type))
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lv * p)
        weights = F.softmax(weights, -1).view(n, lq, m, lv, p)
        # Offsets are in units of the level's cells: divide by (W_l, H_l).
        normalizer = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device
        )  # (L, 2)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )  # (N, Lq, M, L, P, 2)
        core = ms_deform_attn_gather if self.sampler == "gather" else ms_deform_attn_core
        out = core(value, spatial_shapes, locations, weights)  # (N, Lq, C)
        return self.output_proj(out)
