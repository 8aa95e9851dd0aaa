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

from s3cli.lite.propagation import TileGrid, pad_cells, tiles_near

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
    cells = torch.arange(tile, device=device)
    halo = torch.arange(tile + 2 * radius, device=device) - radius  # in tile coordinates
    near = (halo[None, :] - cells[:, None]).abs() <= radius  # (tile, span), one axis
    return (near[:, None, :, None] & near[None, :, None, :]).flatten(2).flatten(0, 1)


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
    grid = TileGrid(h, w, tile)
    # Refine where the most probable label changes between neighbouring cells: a weighted mean
    # of labels that all favour one label favours it too, so elsewhere no cell's most probable
    # label can change (after ``iterations`` passes, farther than ``iterations * radius``).
    best = prob.argmax(dim=0)  # (h, w)
    edge = torch.zeros_like(best, dtype=torch.bool)
    edge[:, 1:] |= best[:, 1:] != best[:, :-1]
    edge[1:, :] |= best[1:, :] != best[:-1, :]
    tiles = tiles_near(edge, grid, -(-(iterations * radius + 1) // tile)).nonzero()[:, 0]  # (A,)
    if tiles.numel() == 0:
        return prob
    device = prob.device
    # Cell-major maps padded by whole tiles (at least ``radius`` cells) on every side.
    pad = -(-radius // tile)
    border = pad * tile
    width = (grid.tiles_x + 2 * pad) * tile
    span = tile + 2 * radius
    top = torch.div(tiles, grid.tiles_x, rounding_mode="floor") * tile + border - radius
    left = (tiles % grid.tiles_x) * tile + border - radius
    base = top * width + left  # (A,) top-left halo cell
    offsets = torch.arange(span, device=device)
    halo = base[:, None] + (offsets[:, None] * width + offsets[None, :]).flatten()[None]  # (A, R)
    inner = torch.arange(tile, device=device) + radius
    centre = base[:, None] + (inner[:, None] * width + inner[None, :]).flatten()[None]  # (A, Q)

    feats = pad_cells(features.float(), grid, pad).flatten(0, 1)  # (N, C)
    a, c = tiles.numel(), feats.shape[-1]
    halo_feats = feats.index_select(0, halo.flatten()).view(a, -1, c)  # (A, R, C)
    centre_feats = feats.index_select(0, centre.flatten()).view(a, -1, c) / temperature
    # Logits (f_i . f_j - 1) / temperature inside the window, -inf outside: one batched
    # product with the window as its bias, then exp in place (weights (A, Q, R)).
    bias = torch.full((1, tile * tile, span * span), -math.inf, device=device)
    bias.masked_fill_(_window_mask(tile, radius, device)[None], -1 / temperature)
    weights = torch.baddbmm(bias, centre_feats, halo_feats.transpose(1, 2)).exp_()
    # Labels with an extra channel that is 1 inside the image: one product gives each cell's
    # weighted label sums and, in that channel, the sum of its weights over real cells.
    inside = features.new_ones(h, w, 1, dtype=torch.float32)
    grid_labels = pad_cells(torch.cat([prob.float().permute(1, 2, 0), inside], dim=-1), grid, pad)
    labels = grid_labels.flatten(0, 1)  # (N, K + 1), a view of the padded map
    rows = centre.flatten()  # (A Q,)
    real = labels.index_select(0, rows)[:, k:]  # (A Q, 1): 0 for cells past the image's edge
    for _ in range(iterations):
        halo_labels = labels.index_select(0, halo.flatten()).view(a, -1, k + 1)  # (A, R, K+1)
        sums = torch.bmm(weights, halo_labels)  # (A, Q, K + 1)
        updated = sums[..., :k] / sums[..., k:].clamp_min(1e-30)
        labels[rows, :k] = updated.reshape(-1, k) * real
    out = grid_labels[border : border + h, border : border + w, :k]  # (h, w, K)
    return out.permute(2, 0, 1).to(prob.dtype).contiguous()
