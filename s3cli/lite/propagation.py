"""Label propagation by feature affinity inside spatial windows, with top-k soft aggregation.

A query cell's label is the softmax-weighted (temperature ``tau``) mean of the labels of its
``k`` most similar memory cells. Similarity is the dot product of unit-norm feature vectors.

Windows work on tiles of ``t x t`` grid cells: every query tile is compared with the
``(2 reach + 1)^2`` memory tiles around it (its own tile and ``reach`` tiles on each side), so
affinities exist only inside that window and are one batched matrix product per memory frame.
A memory frame's window tensors are built once (:func:`windows`) and reused for every query
frame while it stays in memory.

Layouts are cell-major, ``(H, W, D)``, so that building windows copies whole feature vectors.
Shapes: C feature channels, K label channels (background + objects), (H, W) the feature grid,
T tiles, Q = t * t cells per tile, R = (2 reach + 1)^2 Q window cells, M memory frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "TileGrid",
    "active_tiles",
    "aggregate_labels",
    "query_tiles",
    "tile_cells",
    "untile",
    "windows",
]


@dataclass(frozen=True)
class TileGrid:
    """A feature grid of ``height x width`` cells cut into ``tile x tile`` tiles (padded)."""

    height: int
    width: int
    tile: int

    @property
    def tiles_y(self) -> int:
        return math.ceil(self.height / self.tile)

    @property
    def tiles_x(self) -> int:
        return math.ceil(self.width / self.tile)

    @property
    def num_tiles(self) -> int:
        return self.tiles_y * self.tiles_x

    def pad(self, x: torch.Tensor, extra_tiles: int = 0) -> torch.Tensor:
        """Zero-pad (H, W, D) to whole tiles plus ``extra_tiles`` tiles on every side."""
        e = extra_tiles * self.tile
        bottom = self.tiles_y * self.tile - self.height + e
        right = self.tiles_x * self.tile - self.width + e
        if e == bottom == right == 0:
            return x
        return F.pad(x, (0, 0, e, right, e, bottom))


def query_tiles(x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(H, W, D) cells -> (T, Q, D) tiles."""
    t = grid.tile
    d = x.shape[-1]
    y = grid.pad(x).reshape(grid.tiles_y, t, grid.tiles_x, t, d)
    return y.permute(0, 2, 1, 3, 4).reshape(grid.num_tiles, t * t, d)  # (T, Q, D)


def untile(x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(T, Q, K) per-tile values -> (K, H, W) on the grid (padding dropped)."""
    t = grid.tile
    k = x.shape[-1]
    y = x.reshape(grid.tiles_y, grid.tiles_x, t, t, k).permute(4, 0, 2, 1, 3)
    y = y.reshape(k, grid.tiles_y * t, grid.tiles_x * t)
    return y[:, : grid.height, : grid.width]


def tile_cells(x: torch.Tensor, grid: TileGrid, reach: int) -> torch.Tensor:
    """(H, W, D) cells -> (Ty + 2 reach, Tx + 2 reach, t, t, D) tiles, zero tiles around."""
    t = grid.tile
    d = x.shape[-1]
    e = reach * t
    out = x.new_zeros((grid.tiles_y + 2 * reach) * t, (grid.tiles_x + 2 * reach) * t, d)
    out[e : e + grid.height, e : e + grid.width] = x
    ty, tx = grid.tiles_y + 2 * reach, grid.tiles_x + 2 * reach
    return out.reshape(ty, t, tx, t, d).permute(0, 2, 1, 3, 4)  # (Ty', Tx', t, t, D)


def windows(
    x: torch.Tensor, grid: TileGrid, reach: int, tiles: torch.Tensor | None = None
) -> torch.Tensor:
    """(H, W, D) cells -> (A, R, D): for each of the A tiles (``tiles``: flat indices, default
    all T), the cells of the tiles within ``reach`` of it, row by row.

    Cells outside the grid are zeros: zero affinity for keys, no label mass for values.
    """
    t = grid.tile
    d = x.shape[-1]
    n = 2 * reach + 1
    cells = tile_cells(x, grid, reach)  # (Ty', Tx', t, t, D)
    if tiles is None:
        tiles = torch.arange(grid.num_tiles, device=x.device)
    ty = torch.div(tiles, grid.tiles_x, rounding_mode="floor")  # (A,)
    tx = tiles - ty * grid.tiles_x
    offsets = torch.arange(n, device=x.device)
    rows = (ty[:, None] + offsets[None, :])[:, :, None].expand(-1, n, n)  # (A, n, n)
    cols = (tx[:, None] + offsets[None, :])[:, None, :].expand(-1, n, n)
    out = cells[rows, cols]  # (A, n, n, t, t, D)
    return out.reshape(tiles.shape[0], n * n * t * t, d)  # (A, R, D)


def active_tiles(value: torch.Tensor, grid: TileGrid, reach: int, eps: float) -> torch.Tensor:
    """(T,) bool: tiles whose window, in a frame with labels (H, W, K), holds more than
    ``eps`` of some object (channels 1..K-1). Elsewhere that frame can only give background."""
    t = grid.tile
    fg = value[..., 1:].amax(dim=-1) if value.shape[-1] > 1 else value[..., 0] * 0  # (H, W)
    fg = grid.pad(fg[..., None])[..., 0]  # (Ty t, Tx t)
    per_tile = fg.reshape(grid.tiles_y, t, grid.tiles_x, t).amax(dim=(1, 3)) > eps  # (Ty, Tx)
    if reach > 0:
        k = 2 * reach + 1
        per_tile = F.max_pool2d(per_tile[None, None].float(), k, stride=1, padding=reach)[0, 0] > 0
    return per_tile.flatten()


def aggregate_labels(
    queries: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    top_k: int,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft labels (B, Q, K) of queries (B, Q, C) from M memory frames' keys (B, R_m, C) and
    labels (B, R_m, K): the softmax(affinity / temperature)-weighted mean of the labels of the
    ``top_k`` best matches over all frames together (``top_k`` 0: of all matches).

    ``valid`` (M, K) bool says which label channels each memory frame knows (an object added
    later is unknown in older frames); each channel is then averaged over the matches that know
    it. The result sums to 1 over K (background where no label mass was found at all).
    """
    partial = valid is not None and not bool(valid.all())
    if top_k > 0:
        tops, picks, knowns = [], [], []
        for i, (key, val) in enumerate(zip(keys, values, strict=True)):
            aff = torch.bmm(queries, key.transpose(1, 2))  # (B, Q, R)
            b, q, r = aff.shape
            k = min(top_k, r)
            top, idx = torch.topk(aff, k, dim=-1, sorted=False)  # (B, Q, k)
            kk = val.shape[-1]
            flat = idx.reshape(b, q * k, 1).expand(b, q * k, kk)
            picks.append(torch.gather(val, 1, flat).reshape(b, q, k, kk))  # (B, Q, k, K)
            tops.append(top)
            if partial:
                assert valid is not None
                knowns.append(valid[i].to(val.dtype).expand(b, q, k, kk))
        top = torch.cat(tops, dim=-1) if len(tops) > 1 else tops[0]  # (B, Q, M k)
        picked = torch.cat(picks, dim=2) if len(picks) > 1 else picks[0]  # (B, Q, M k, K)
        known = (torch.cat(knowns, dim=2) if len(knowns) > 1 else knowns[0]) if partial else None
        if top.shape[-1] > top_k:
            top, idx = torch.topk(top, top_k, dim=-1, sorted=False)  # (B, Q, k)
            sel = idx[..., None].expand(*idx.shape, picked.shape[-1])
            picked = torch.gather(picked, 2, sel)
            known = torch.gather(known, 2, sel) if known is not None else None
        weights = torch.softmax(top / temperature, dim=-1)  # (B, Q, k)
        num = torch.einsum("bqn,bqnk->bqk", weights, picked)  # (B, Q, K)
        if known is not None:
            num = torch.einsum("bqn,bqnk->bqk", weights, picked * known)
            num = num / torch.einsum("bqn,bqnk->bqk", weights, known).clamp_min(1e-6)
    else:
        affs = [torch.bmm(queries, key.transpose(1, 2)) for key in keys]  # (B, Q, R_m)
        top = torch.stack([a.amax(dim=-1) for a in affs]).amax(dim=0, keepdim=True)[0]
        num = den = None
        for i, (aff, val) in enumerate(zip(affs, values, strict=True)):
            w = torch.exp((aff - top[..., None]) / temperature)  # (B, Q, R)
            mass = w.sum(dim=-1, keepdim=True)  # (B, Q, 1)
            if partial:
                assert valid is not None
                val = val * valid[i].to(val.dtype)
                mass = mass * valid[i].to(mass.dtype)  # (B, Q, K)
            part = torch.bmm(w, val)  # (B, Q, K)
            num = part if num is None else num + part
            den = mass if den is None else den + mass
        assert num is not None and den is not None
        num = num / den.clamp_min(1e-12)
    total = num.sum(dim=-1, keepdim=True)  # (B, Q, 1)
    out = num / total.clamp_min(1e-6)
    out[..., :1] = torch.where(total <= 1e-6, torch.ones_like(total), out[..., :1])
    return out
