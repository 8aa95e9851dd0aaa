"""Per-frame J (region IoU) and F (boundary F-measure) and their statistics, DAVIS-2017 exact.

The numbers are those of the official DAVIS 2017 semi-supervised evaluation
(``davisvideochallenge/davis2017-evaluation``); the golden fixtures in
``shared/fixtures/metrics`` pin them down bit for bit.

* **J** of one object in one frame is ``|G & P| / |G | P|``; 1 when both masks are empty.
* **F** compares one-pixel boundary maps (:func:`boundary_map`) of the two masks. Each map is
  dilated by a disk of radius :func:`boundary_tolerance` pixels (0.8 % of the image diagonal,
  rounded up); precision is the share of predicted boundary pixels that fall inside the dilated
  ground-truth boundary, recall the reverse, and F their harmonic mean. An empty boundary on one
  side only gives 0, empty boundaries on both sides give 1.
* :func:`statistics` turns per-frame values into Mean, Recall (share of frames strictly above
  0.5) and Decay (mean of the first quarter of the frames minus mean of the last quarter).

:func:`jaccard` and :func:`f_measure` follow the definition on whole images and are the
reference. :func:`frame_scores` gives the same numbers for every object of a labelled frame at
once, much faster: it works in a crop around each object, which is exact because boundary pixels
and their dilation never leave the object's bounding box grown by the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

__all__ = [
    "BOUND_TH",
    "RECALL_THRESHOLD",
    "Statistics",
    "boundary_map",
    "boundary_tolerance",
    "decay_cut_points",
    "disk",
    "f_measure",
    "frame_scores",
    "jaccard",
    "statistics",
]

BOUND_TH = 0.008
"""Boundary tolerance of the official tools: below 1 it is a fraction of the image diagonal."""

RECALL_THRESHOLD = 0.5
"""Recall counts the frames whose value is strictly greater than this."""


# --------------------------------------------------------------------------------------------
# Building blocks


def boundary_tolerance(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """The dilation radius in pixels: ``ceil(bound_th * sqrt(H^2 + W^2))``, or ``bound_th``
    itself when it is 1 or more (then it is already a number of pixels)."""
    if bound_th >= 1:
        return int(math.ceil(bound_th))
    return int(math.ceil(bound_th * math.sqrt(float(height) ** 2 + float(width) ** 2)))


@lru_cache(maxsize=32)
def _disk_cached(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    out = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius).astype(np.uint8)
    out.flags.writeable = False
    return out


def disk(radius: int) -> np.ndarray:
    """The disk structuring element of scikit-image: ``(y, x)`` is in it when ``y²+x² <= r²``.

    Radius 1 is a 3x3 cross, 2 has 13 pixels, 8 has 197. Returned as a read-only uint8 array.
    """
    if radius < 0:
        raise ValueError(f"disk radius must be >= 0, got {radius}")
    return _disk_cached(int(radius))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary map of a binary mask, as DAVIS's ``seg2bmap`` computes it.

    A pixel is on the boundary when its value differs from its right, lower or lower-right
    neighbour. In the last row only the right neighbour counts, in the last column only the
    lower one, and the bottom-right pixel is never on the boundary: edges that lie on the image
    border give no boundary pixels, and an all-ones mask has an empty boundary map.
    """
    seg = np.asarray(mask).astype(bool, copy=False)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map expects a 2-D mask, got shape {seg.shape}")
    b = np.zeros(seg.shape, dtype=bool)
    if seg.size == 0:
        return b
    np.not_equal(seg[:, :-1], seg[:, 1:], out=b[:, :-1])  # right neighbour
    b[:-1, :] |= seg[:-1, :] != seg[1:, :]  # lower neighbour (not in the last row)
    b[:-1, :-1] |= seg[:-1, :-1] != seg[1:, 1:]  # lower-right neighbour
    return b


# --------------------------------------------------------------------------------------------
# Reference per-frame measures (whole images, one object)


def jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """Region similarity J: IoU of two binary masks; 1.0 when both are empty."""
    g = np.asarray(gt).astype(bool, copy=False)
    p = np.asarray(pred).astype(bool, copy=False)
    if g.shape != p.shape:
        raise ValueError(f"mask shapes differ: ground truth {g.shape}, prediction {p.shape}")
    union = int(np.count_nonzero(g | p))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(g & p)) / union


def _f_from_counts(n_pred: int, n_gt: int, pred_match: int, gt_match: int) -> float:
    """F from boundary pixel counts, with DAVIS's handling of empty boundary maps."""
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = pred_match / float(n_pred)
        recall = gt_match / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _dilate(bmap: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(bmap.view(np.uint8), disk(radius)).view(bool)


def f_measure(
    gt: np.ndarray,
    pred: np.ndarray,
    bound_th: float = BOUND_TH,
    bound_pix: int | None = None,
) -> float:
    """Boundary measure F of two binary masks (whole-image reference implementation).

    ``bound_pix`` overrides the tolerance derived from ``bound_th`` and the image size.
    """
    g = np.asarray(gt).astype(bool, copy=False)
    p = np.asarray(pred).astype(bool, copy=False)
    if g.shape != p.shape:
        raise ValueError(f"mask shapes differ: ground truth {g.shape}, prediction {p.shape}")
    if bound_pix is None:
        bound_pix = boundary_tolerance(g.shape[0], g.shape[1], bound_th)
    gb = boundary_map(g)
    pb = boundary_map(p)
    n_gt = int(np.count_nonzero(gb))
    n_pred = int(np.count_nonzero(pb))
    pred_match = gt_match = 0
    if n_gt and n_pred:
        pred_match = int(np.count_nonzero(pb & _dilate(gb, bound_pix)))
        gt_match = int(np.count_nonzero(gb & _dilate(pb, bound_pix)))
    return _f_from_counts(n_pred, n_gt, pred_match, gt_match)


# --------------------------------------------------------------------------------------------
# Fast per-frame scores of every object of a labelled frame


def _bbox(mask_u8: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end-exclusive, of the non-zero pixels; None when there are none."""
    x, y, w, h = cv2.boundingRect(mask_u8)
    if w == 0 or h == 0:
        return None
    return y, y + h, x, x + w


def frame_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    object_ids: int | np.ndarray | list[int] | tuple[int, ...],
    bound_pix: int | None = None,
    bound_th: float = BOUND_TH,
) -> tuple[np.ndarray, np.ndarray]:
    """J and F of each object of one frame, from two label maps (pixel value = object id).

    ``object_ids`` is either a count N (ids 1..N) or the ids themselves. The mask of object k is
    ``labels == k``, so an id absent from a map is an empty mask. Returns two float64 arrays
    aligned with the ids. Identical to :func:`jaccard` and :func:`f_measure` per object.
    """
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"label maps must be 2-D and equal in shape: {gt.shape} vs {pred.shape}")
    ids = (
        np.arange(1, int(object_ids) + 1)
        if np.isscalar(object_ids)
        else np.asarray(object_ids, dtype=np.int64)
    )
    height, width = gt.shape
    radius = boundary_tolerance(height, width, bound_th) if bound_pix is None else int(bound_pix)
    kernel = disk(radius)
    j_out = np.ones(len(ids), dtype=np.float64)
    f_out = np.ones(len(ids), dtype=np.float64)
    for i, k in enumerate(ids):
        g_full = np.equal(gt, k).view(np.uint8)
        p_full = np.equal(pred, k).view(np.uint8)
        gbox = _bbox(g_full)
        pbox = _bbox(p_full)
        if gbox is None and pbox is None:
            continue  # absent from both: J = F = 1
        if gbox is None or pbox is None:
            j_out[i] = 0.0
        boxes = [b for b in (gbox, pbox) if b is not None]
        y0 = min(b[0] for b in boxes)
        y1 = max(b[1] for b in boxes)
        x0 = min(b[2] for b in boxes)
        x1 = max(b[3] for b in boxes)
        # Boundary pixels lie in rows y0-1 .. y1-1 and columns x0-1 .. x1-1 (the outside pixel
        # on upper/left edges). One more background row/column below/right keeps the crop's
        # last row/column from being taken for the image border, and `radius` more on each
        # side holds every dilation that can reach a boundary pixel of the other mask.
        pad = radius + 1
        cy0, cy1 = max(0, y0 - pad), min(height, y1 + pad)
        cx0, cx1 = max(0, x0 - pad), min(width, x1 + pad)
        g = g_full[cy0:cy1, cx0:cx1].view(bool)
        p = p_full[cy0:cy1, cx0:cx1].view(bool)
        if gbox is not None and pbox is not None:
            union = int(np.count_nonzero(g | p))
            j_out[i] = int(np.count_nonzero(g & p)) / union
        gb = boundary_map(g)
        pb = boundary_map(p)
        n_gt = int(np.count_nonzero(gb))
        n_pred = int(np.count_nonzero(pb))
        pred_match = gt_match = 0
        if n_gt and n_gt == n_pred and np.array_equal(gb, pb):
            pred_match = gt_match = n_gt  # identical boundaries: P = R = 1
        elif n_gt and n_pred:
            g_dil = cv2.dilate(gb.view(np.uint8), kernel).view(bool)
            p_dil = cv2.dilate(pb.view(np.uint8), kernel).view(bool)
            pred_match = int(np.count_nonzero(pb & g_dil))
            gt_match = int(np.count_nonzero(gb & p_dil))
        f_out[i] = _f_from_counts(n_pred, n_gt, pred_match, gt_match)
    return j_out, f_out


# --------------------------------------------------------------------------------------------
# Statistics over frames


@dataclass(frozen=True)
class Statistics:
    """Mean, Recall and Decay of one object's per-frame values (NaN when undefined)."""

    mean: float
    recall: float
    decay: float


def decay_cut_points(n: int, *, uint8_wrap: bool = False) -> np.ndarray:
    """The five cut points of the decay bins for ``n`` values: ``linspace(1, n, 5)`` rounded
    (exact halves up) minus one. Bin b holds positions ``c[b] .. c[b+1]``, both ends included.

    The official code casts them to uint8, which wraps around for long sequences (n >= 256
    under NumPy 2) and makes the decay NaN. ``uint8_wrap=True`` reproduces that; the default
    keeps the cut points the official code intends, which are the same for every n < 256.
    """
    ids = np.round(np.linspace(1, n, 5) + 1e-10) - 1
    return ids.astype(np.uint8) if uint8_wrap else ids.astype(np.int64)


def _nanmean(values: np.ndarray) -> float:
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return float("nan")
    return float(np.nanmean(values))


def statistics(values: np.ndarray | list[float], *, uint8_wrap: bool = False) -> Statistics:
    """Mean, Recall and Decay of per-frame values, as DAVIS's ``db_statistics``.

    NaN values are ignored by Mean and Decay; Recall is the share of frames strictly above 0.5.
    ``uint8_wrap`` reproduces the official decay overflow for n >= 256 (see
    :func:`decay_cut_points`).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if n == 0:
        nan = float("nan")
        return Statistics(nan, nan, nan)
    mean = _nanmean(v)
    recall = float(np.mean(v > RECALL_THRESHOLD))
    cuts = decay_cut_points(n, uint8_wrap=uint8_wrap)
    with np.errstate(over="ignore"):
        # For the uint8 cut points, `cuts[i + 1] + 1` is uint8 arithmetic, as in the original.
        bins = [v[cuts[i] : cuts[i + 1] + 1] for i in range(4)]
    decay = _nanmean(bins[0]) - _nanmean(bins[3])
    return Statistics(mean, recall, decay)
