"""Label propagation by feature affinity inside spatial windows.

Similarity is the dot product of unit-norm feature vectors. Two ways to turn a query cell's
affinities into labels: :func:`propagate_labels`, the softmax-weighted (temperature ``tau``)
mean of the labels of its ``k`` most similar memory cells, and :func:`classify_labels`, which
scores every label by the mean of the ``k`` best affinities among that label's cells and takes
softmax(score / tau) (class-balanced: how many cells a label has does not matter).

Windows work on tiles of ``t x t`` grid cells: every query tile is compared with the
``(2 reach + 1)^2`` memory tiles around it (its own tile and ``reach`` tiles on each side), so
affinities exist only inside that window: the window cells of all memory frames are gathered
(:func:`window_index`) and compared with the tile's cells in one batched matrix product.

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
    "tiles_near",
    "classify_labels",
    "pad_cells",
    "propagate_labels",
    "query_tiles",
    "untile",
    "window_affinity",
    "window_index",
    "window_topk",
]

CHUNK_ELEMENTS = 1 << 19
"""Affinities computed at once by :func:`window_topk` (2 MiB of float32): a chunk of query
tiles is gathered, matched and ranked while it is still in cache, instead of writing and
re-reading the whole (A, Q, R) affinity tensor (memory-bound: about 40% slower at 480p)."""


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


def pad_cells(x: torch.Tensor, grid: TileGrid, pad_tiles: int) -> torch.Tensor:
    """(H, W, D) cells -> ((Ty + 2 P) t, (Tx + 2 P) t, D): whole tiles, with ``P`` tiles of
    zeros on every side (outside cells have zero affinity and no label mass)."""
    t = grid.tile
    e = pad_tiles * t
    h, w = (grid.tiles_y + 2 * pad_tiles) * t, (grid.tiles_x + 2 * pad_tiles) * t
    out = x.new_zeros(h, w, x.shape[-1])
    out[e : e + grid.height, e : e + grid.width] = x
    return out


def window_index(
    grid: TileGrid,
    pad_tiles: int,
    reaches: Sequence[int],
    tiles: torch.Tensor,
    frames: Sequence[int] | None = None,
    shifts: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """(A, R) flat indices, into stacked frames of :func:`pad_cells` (``pad_tiles`` P), of
    the window cells of each query tile in ``tiles``: window w holds the tiles within
    ``reaches[w]`` of the query tile in frame ``frames[w]`` (default: frame w), centred on
    the query tile moved back by ``shifts[w]`` = (dy, dx) tiles (clamped to the grid; default
    (0, 0)), so that a frame where the objects stood elsewhere is searched where they were.
    R is the sum over windows of ``(2 reach + 1)^2 t^2``."""
    t = grid.tile
    width = (grid.tiles_x + 2 * pad_tiles) * t
    frame_cells = (grid.tiles_y + 2 * pad_tiles) * t * width
    device = tiles.device
    ty = torch.div(tiles, grid.tiles_x, rounding_mode="floor")  # (A,)
    tx = tiles - ty * grid.tiles_x
    parts = []
    for w, reach in enumerate(reaches):
        if reach > pad_tiles:
            raise ValueError(f"reach {reach} exceeds the padding of {pad_tiles} tiles")
        m = frames[w] if frames is not None else w
        dy, dx = shifts[w] if shifts is not None else (0, 0)
        cy = (ty - dy).clamp(0, grid.tiles_y - 1) if dy else ty
        cx = (tx - dx).clamp(0, grid.tiles_x - 1) if dx else tx
        base = (cy + pad_tiles) * t * width + (cx + pad_tiles) * t  # top-left cell of the tile
        span = torch.arange(-reach * t, (reach + 1) * t, device=device)  # cell offsets
        rel = (m * frame_cells + span[:, None] * width + span[None, :]).flatten()
        parts.append(base[:, None] + rel[None, :])
    return torch.cat(parts, dim=1)  # (A, R)


def tiles_near(cells: torch.Tensor, grid: TileGrid, reach: int) -> torch.Tensor:
    """(T,) bool: tiles within ``reach`` tiles (per axis) of a tile holding a True cell of
    ``cells`` (H, W) bool."""
    t = grid.tile
    padded = grid.pad(cells[..., None])[..., 0]  # (Ty t, Tx t)
    per_tile = padded.reshape(grid.tiles_y, t, grid.tiles_x, t).any(dim=3).any(dim=1)
    if reach > 0:
        k = 2 * reach + 1
        per_tile = F.max_pool2d(per_tile[None, None].float(), k, stride=1, padding=reach)[0, 0] > 0
    return per_tile.flatten()


def active_tiles(value: torch.Tensor, grid: TileGrid, reach: int, eps: float) -> torch.Tensor:
    """(T,) bool: tiles whose window, in a frame with labels (H, W, K), holds more than
    ``eps`` of some object (channels 1..K-1). Elsewhere that frame can only give background."""
    if value.shape[-1] < 2:
        return torch.zeros(grid.num_tiles, dtype=torch.bool, device=value.device)
    return tiles_near(value[..., 1:].amax(dim=-1) > eps, grid, reach)


def window_affinity(queries: torch.Tensor, keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Affinities (A, Q, R) of query tiles (A, Q, C) with their window cells: rows ``index``
    (A, R) of the stacked memory keys (N, C)."""
    a, r = index.shape
    window_keys = keys.index_select(0, index.flatten()).reshape(a, r, -1)  # (A, R, C)
    return torch.bmm(queries, window_keys.transpose(1, 2))


def window_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    index: torch.Tensor,
    n: int,
    exclude: torch.Tensor | None = None,
    sorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` best affinities (A, Q, n) of query tiles (A, Q, C) with their window cells
    (``index`` (A, R) rows of ``keys`` (N, C)) and their positions (A, Q, n) in the window,
    computed a few tiles at a time (:data:`CHUNK_ELEMENTS`): the picks of
    ``torch.topk(window_affinity(queries, keys, index), n)`` (bit-identical on the davis16
    sequences; the matrix product may round differently for another batch size).
    ``exclude`` (N,) bool: cells that must not be picked (their affinity counts as -2, below
    any real one)."""
    a, q, _ = queries.shape
    r = index.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, q * r))
    tops, positions = [], []
    for s in range(0, a, chunk):
        rows = index[s : s + chunk]  # (a', R)
        affinity = window_affinity(queries[s : s + chunk], keys, rows)  # (a', Q, R)
        if exclude is not None:
            hidden = exclude.index_select(0, rows.flatten()).reshape(-1, 1, r)
            affinity.masked_fill_(hidden, -2.0)
        top, pos = torch.topk(affinity, n, dim=-1, sorted=sorted)
        tops.append(top)
        positions.append(pos)
    if len(tops) == 1:
        return tops[0], positions[0]
    return torch.cat(tops), torch.cat(positions)


def propagate_labels(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    top_k: int,
    temperature: float,
    valid: torch.Tensor | None = None,
    frame_cells: int = 0,
) -> torch.Tensor:
    """Soft labels (A, Q, K) of query tiles (A, Q, C) from memory cells.

    ``keys`` (N, C) and ``values`` (N, K) are the stacked memory cells, ``index`` (A, R) the
    cells each query tile may match (its windows). Each query takes the softmax(affinity /
    temperature)-weighted mean of the labels of its ``top_k`` best matches (``top_k`` 0: of
    all R). ``valid`` (M, K) bool says which label channels each memory frame knows (an object
    added later is unknown in older frames; frame m holds cells ``m * frame_cells`` onwards);
    each channel is then averaged over the matches that know it. The result sums to 1 over K
    (background where no label mass was found at all).
    """
    a, q, _ = queries.shape
    r = index.shape[1]
    kk = values.shape[-1]
    if 0 < top_k < r:
        top, pos = window_topk(queries, keys, index, top_k, sorted=False)  # (A, Q, k)
        cells = torch.gather(index, 1, pos.reshape(a, q * top_k))  # (A, Q k)
    else:
        top = window_affinity(queries, keys, index)  # (A, Q, R)
        cells = index[:, None, :].expand(a, q, r).reshape(a, -1)
    n = top.shape[-1]
    weights = torch.softmax(top / temperature, dim=-1)  # (A, Q, n)
    picked = values.index_select(0, cells.flatten()).reshape(a, q, n, kk)  # (A, Q, n, K)
    num = torch.einsum("aqn,aqnk->aqk", weights, picked)  # (A, Q, K)
    if valid is not None and not bool(valid.all()):
        known = valid.to(values.dtype)[torch.div(cells, frame_cells, rounding_mode="floor")]
        known = known.reshape(a, q, n, kk)  # (A, Q, n, K)
        num = torch.einsum("aqn,aqnk->aqk", weights, picked * known)
        num = num / torch.einsum("aqn,aqnk->aqk", weights, known).clamp_min(1e-6)
    total = num.sum(dim=-1, keepdim=True)  # (A, Q, 1)
    out = num / total.clamp_min(1e-6)
    out[..., :1] = torch.where(total <= 1e-6, torch.ones_like(total), out[..., :1])
    return out


def classify_labels(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    top_k: int,
    temperature: float,
    valid: torch.Tensor | None = None,
    frame_cells: int = 0,
    pool: int = 0,
) -> torch.Tensor:
    """Class-balanced matching: soft labels (A, Q, K) of query tiles (A, Q, C).

    Every window cell counts for its strongest label (cells without label mass, the padding,
    for none). A query's score for label c is the mean of its ``top_k`` best affinities among
    the cells of label c, and the labels are softmax(score / temperature). Unlike
    :func:`propagate_labels` the answer does not depend on how many cells each label has in
    the window, so a small object in memory is not outvoted by background.

    Only the ``pool`` best cells of the whole window are ranked (default ``4 top_k``): a label
    with fewer than ``top_k`` cells among them has its missing affinities set to the lowest
    pooled one (an upper bound), one with none among them gets that bound as its score.
    Unlabelled cells (padding) take pool places but count for no label.
    """
    a, q, _ = queries.shape
    r = index.shape[1]
    kk = values.shape[-1]
    # Cells without label mass (padding) or whose label their frame does not know: label -1.
    labels = values.argmax(dim=-1)  # (N,)
    filled = values.sum(dim=-1) > 0  # (N,)
    if valid is not None and not bool(valid.all()):
        frame = torch.arange(len(labels), device=labels.device) // frame_cells
        filled = filled & valid[frame, labels]
    labels = labels.masked_fill(~filled, -1)
    # Keep cells of unknown labels out of the pool (padding, with zero affinity, rarely gets
    # in: not worth a pass over the affinities in the common case).
    unknown = ~filled if valid is not None and not bool(valid.all()) else None
    k = min(max(top_k, 1), r)
    n = min(max(pool, 4 * k), r)
    top, pos = window_topk(queries, keys, index, n, exclude=unknown)  # (A, Q, n), descending
    cells = torch.gather(index, 1, pos.reshape(a, q * n))  # (A, Q n)
    picked = labels.index_select(0, cells.flatten()).reshape(a, q, n)  # (A, Q, n)
    floor = top[..., -1:]  # (A, Q, 1) the lowest pooled affinity
    scores = []
    for c in range(kk):
        member = picked == c  # (A, Q, n)
        # Rank of every member among the members: keep the first k.
        rank = member.cumsum(dim=-1)
        take = member & (rank <= k)
        count = take.sum(dim=-1)  # (A, Q)
        total = (top * take).sum(dim=-1) + (k - count) * floor[..., 0]
        scores.append(total / k)
    score = torch.stack(scores, dim=-1)  # (A, Q, K)
    return torch.softmax(score / temperature, dim=-1)
