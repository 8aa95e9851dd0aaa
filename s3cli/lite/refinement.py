"""Edge-aware refinement of the ``lite`` tracker's labels on the stride-4 grid.

Labels are propagated on the stride-8 grid with keys that also carry the (blurrier) stride-16
features, so a prediction upsampled from them is soft and too wide at the object's edges (a
halo on the side the object leaves, a bite on the side it enters). The refinement re-estimates
every stride-4 cell near an edge as the affinity-weighted mean of the labels of the cells within
``radius`` cells of it in the *current* frame, with affinities from low-level cues that do see
the edge: the backbone's stride-4 features and the cell's mean colour
(:func:`refinement_features`). A cell whose neighbours look like it takes their labels, so the
labels snap to the image's edges (a joint-bilateral filter whose range term is a feature
affinity). ``iterations`` passes spread the labels further along similar cells.

The work is done on tiles of ``tile x tile`` cells, only near the edges between labels (where
the most probable label can change); each tile compares its cells with the ``(tile + 2
radius)^2`` cells of its tile and halo in one batched product, masked to the square window.

Shapes: K label channels, C feature channels, (h, w) the stride-4 grid, A refined tiles,
Q = tile^2 cells per tile, R = (tile + 2 radius)^2 halo cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["refine_labels", "refinement_features"]


def refinement_features(f4: torch.Tensor, image: torch.Tensor, colour: float) -> torch.Tensor:
    """Unit-norm cell features (h, w, C) on the stride-4 grid: the stride-4 backbone features
    ``f4`` (1, C4, h, w), centred on their frame mean and unit-normalised, beside the cells'
    mean colour (from ``image`` (1, 3, 4h, 4w) in [0, 1], centred, times ``colour``)."""
    g = f4[0].float()  # (C4, h, w)
    g = F.normalize(g - g.mean(dim=(1, 2), keepdim=True), dim=0)
    rgb = F.avg_pool2d(image.float(), 4)[0]  # (3, h, w)
    rgb = rgb - rgb.mean(dim=(1, 2), keepdim=True)
    x = F.normalize(torch.cat([g, colour * rgb]), dim=0)  # (C, h, w)
    return x.permute(1, 2, 0).contiguous()


def _window_mask(tile: int, radius: int, device: torch.device) -> torch.Tensor:
    """(Q, R) bool: halo cell within ``radius`` cells (per axis) of the tile cell."""
    span = tile + 2 * radius
    cy, cx = torch.meshgrid(
        torch.arange(tile, device=device), torch.arange(tile, device=device), indexing="ij"
    )
    hy, hx = torch.meshgrid(
        torch.arange(span, device=device), torch.arange(span, device=device), indexing="ij"
    )
    dy = (hy.reshape(1, -1) - radius) - cy.reshape(-1, 1)
    dx = (hx.reshape(1, -1) - radius) - cx.reshape(-1, 1)
    return (dy.abs() <= radius) & (dx.abs() <= radius)


def refine_labels(
    prob: torch.Tensor,
    features: torch.Tensor,
    radius: int = 4,
    temperature: float = 0.1,
    iterations: int = 2,
    tile: int = 4,
) -> torch.Tensor:
    """Refined labels (K, h, w) from labels ``prob`` (K, h, w) (summing to 1 over K) and cell
    features (h, w, C) of :func:`refinement_features`: each pass replaces every cell of a
    refined tile by ``sum_j w_ij p_j / sum_j w_ij`` over the cells j within ``radius`` of it,
    ``w_ij = exp((f_i . f_j - 1) / temperature)``. Only tiles within ``iterations * radius``
    cells of a change of the most probable label are computed; elsewhere the labels are
    returned as they are (their most probable label is what the full computation gives)."""
    k, h, w = prob.shape
    if iterations <= 0 or h == 0 or w == 0:
        return prob
    ty, tx = -(-h // tile), -(-w // tile)
    # Refine where the most probable label changes between neighbouring cells: a weighted mean
    # of labels that all favour one label favours it too, so elsewhere no cell's most probable
    # label can change (after ``iterations`` passes, farther than ``iterations * radius``).
    best = prob.argmax(dim=0)  # (h, w)
    edge = torch.zeros_like(best, dtype=torch.bool)
    edge[:, 1:] |= best[:, 1:] != best[:, :-1]
    edge[1:, :] |= best[1:, :] != best[:-1, :]
    per_tile = F.pad(edge, (0, tx * tile - w, 0, ty * tile - h))
    per_tile = per_tile.reshape(ty, tile, tx, tile).any(dim=3).any(dim=1)  # (Ty, Tx)
    reach = -(-(iterations * radius + 1) // tile)
    near = F.max_pool2d(per_tile[None, None].float(), 2 * reach + 1, stride=1, padding=reach)
    near = near[0, 0] > 0
    tiles = near.flatten().nonzero()[:, 0]  # (A,)
    if tiles.numel() == 0:
        return prob
    device = prob.device
    # Padded cell-major maps: ``radius`` cells of border, then whole tiles.
    height, width = ty * tile + 2 * radius, tx * tile + 2 * radius
    r = radius

    def padded(x: torch.Tensor) -> torch.Tensor:  # (h, w, D) -> (height * width, D)
        out = x.new_zeros(height, width, x.shape[-1])
        out[r : r + h, r : r + w] = x
        return out.reshape(height * width, -1)

    span = tile + 2 * r
    top = torch.div(tiles, tx, rounding_mode="floor") * tile  # (A,) first row, padded coords
    left = (tiles % tx) * tile
    base = top * width + left  # (A,) top-left halo cell
    rows = torch.arange(span, device=device)
    halo = base[:, None] + (rows[:, None] * width + rows[None, :]).flatten()[None]  # (A, R)
    inner = torch.arange(tile, device=device) + r
    centre = base[:, None] + (inner[:, None] * width + inner[None, :]).flatten()[None]  # (A, Q)

    feats = padded(features.float())  # (N, C)
    a, c = tiles.numel(), feats.shape[-1]
    halo_feats = feats.index_select(0, halo.flatten()).view(a, -1, c)  # (A, R, C)
    centre_feats = feats.index_select(0, centre.flatten()).view(a, -1, c) / temperature
    # Logits (f_i . f_j - 1) / temperature inside the window, -inf outside: one batched
    # product with the window as its bias, then exp in place (weights (A, Q, R)).
    bias = torch.full((1, tile * tile, span * span), -math.inf, device=device)
    bias.masked_fill_(_window_mask(tile, r, device)[None], -1 / temperature)
    weights = torch.baddbmm(bias, centre_feats, halo_feats.transpose(1, 2)).exp_()
    # Labels with an extra channel that is 1 inside the image: one product gives each cell's
    # weighted label sums and, in that channel, the sum of its weights over real cells.
    inside = features.new_ones(h, w, 1, dtype=torch.float32)
    labels = padded(torch.cat([prob.float().permute(1, 2, 0), inside], dim=-1))  # (N, K + 1)
    rows = centre.flatten()  # (A Q,)
    real = labels.index_select(0, rows)[:, k:]  # (A Q, 1): 0 for cells past the image's edge
    for _ in range(iterations):
        halo_labels = labels.index_select(0, halo.flatten()).view(a, -1, k + 1)  # (A, R, K+1)
        sums = torch.bmm(weights, halo_labels)  # (A, Q, K + 1)
        updated = sums[..., :k] / sums[..., k:].clamp_min(1e-30)
        labels[rows, :k] = updated.reshape(-1, k) * real
    out = labels.view(height, width, k + 1)[r : r + h, r : r + w, :k]  # (h, w, K)
    return out.permute(2, 0, 1).to(prob.dtype).contiguous()
