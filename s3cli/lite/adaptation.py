"""Test-time adaptation of the ``lite`` tracker: a linear label classifier fitted on the
annotated frames.

Label propagation decides every cell by its nearest memory cells, so a cell whose feature
sits closer to some background (a dark sleeve beside a dark crowd) flips and the error then
travels through short-term memory. The classifier looks at the whole annotated frame instead:
one ridge regression per label channel from the unit-norm keys (C) to that channel's soft
label, with samples weighted so that the label's cells and the others weigh the same (a small
object is not drowned by background). Its outputs are added, scaled, to the propagated
log-probabilities (:func:`adapt_labels`).

Shapes: C key channels, K label channels (background + objects), N cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["adapt_labels", "fit_label_classifier"]


def fit_label_classifier(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    valid: Sequence[torch.Tensor],
    ridge: float = 1.0,
) -> torch.Tensor:
    """(C + 1, K) weights (the last row the bias) of per-channel ridge classifiers.

    ``keys[f]`` (N_f, C) and ``values[f]`` (N_f, K) are the cells and soft labels of annotated
    frame f, ``valid[f]`` (K,) bool which channels that frame knows (an object annotated later
    is unknown in earlier frames). Channel c is fitted on the frames that know it: minimise
    ``sum_i w_i (x_i . a + b - y_ic)^2 + ridge |(a, b)|^2`` with class-balanced weights
    ``w_i = (y_ic / sum(y_c) + (1 - y_ic) / sum(1 - y_c)) n / 2`` (they sum to n). A channel no
    frame knows, or with no cells on one side, gets zero weights (no opinion).
    """
    c = keys[0].shape[-1]
    k = values[0].shape[-1]
    out = keys[0].new_zeros(c + 1, k)
    eye = torch.eye(c + 1, dtype=keys[0].dtype, device=keys[0].device)
    for ch in range(k):
        use = [f for f in range(len(keys)) if bool(valid[f][ch])]
        if not use:
            continue
        x = torch.cat([keys[f] for f in use])  # (n, C)
        y = torch.cat([values[f][:, ch] for f in use])  # (n,)
        pos, neg = y.sum(), (1 - y).sum()
        if pos < 1 or neg < 1:
            continue
        n = x.shape[0]
        w = (y / pos + (1 - y) / neg) * (n / 2)  # (n,)
        x1 = torch.cat([x, x.new_ones(n, 1)], dim=1)  # (n, C + 1)
        gram = x1.t() @ (x1 * w[:, None]) + ridge * eye
        out[:, ch] = torch.linalg.solve(gram, x1.t() @ (w * y))
    return out


def adapt_labels(
    labels: torch.Tensor, keys: torch.Tensor, classifier: torch.Tensor, weight: float
) -> torch.Tensor:
    """Propagated labels (..., K) of cells with keys (..., C), corrected by the classifier
    (C + 1, K): softmax(log labels + ``weight`` * classifier output)."""
    c = keys.shape[-1]
    z = keys @ classifier[:c] + classifier[c]  # (..., K)
    return torch.softmax(torch.log(labels.clamp_min(1e-8)) + weight * z, dim=-1)
