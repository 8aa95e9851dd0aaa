"""Test-time adaptation of the lite tracker (ridge label classifier on the annotated frames)
and the windows that follow the objects (shifted windows, object displacement)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s3cli.lite.adaptation import adapt_labels, fit_label_classifier
from s3cli.lite.propagation import TileGrid, pad_cells, window_index
from s3cli.lite.tracker import LiteOptions, _object_shift


def _two_clusters(n_small: int, n_big: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm keys (n, 8) of two overlapping clusters and their soft labels (n, 2)."""
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    small = centre[1] + 0.6 * torch.randn(n_small, 8, generator=g)
    big = centre[0] + 0.6 * torch.randn(n_big, 8, generator=g)
    keys = F.normalize(torch.cat([small, big]), dim=-1)
    values = torch.zeros(n_small + n_big, 2)
    values[:n_small, 1] = 1
    values[n_small:, 0] = 1
    return keys, values


def test_classifier_finds_a_small_object() -> None:
    keys, values = _two_clusters(100, 3900)  # the object covers 2.5% of the frame
    known = torch.ones(2, dtype=torch.bool)
    w = fit_label_classifier([keys], [values], [known], ridge=1.0)
    assert w.shape == (9, 2)
    z = keys @ w[:8] + w[8]
    says_object = z[:, 1] > z[:, 0]
    # Class-balanced: most of the object is found although background outnumbers it 39:1.
    assert says_object[:100].float().mean() > 0.8
    assert (~says_object[100:]).float().mean() > 0.8
    # Unweighted least squares would give the object up.
    x1 = torch.cat([keys, torch.ones(len(keys), 1)], dim=1)
    plain = torch.linalg.solve(x1.t() @ x1 + torch.eye(9), x1.t() @ values)
    zp = x1 @ plain
    assert (zp[:100, 1] > zp[:100, 0]).float().mean() < says_object[:100].float().mean()


def test_classifier_uses_only_frames_that_know_a_channel() -> None:
    keys, values = _two_clusters(200, 800, seed=1)
    # A second frame that does not know channel 1 (the object was annotated later) and
    # labels everything background: it must not teach channel 1 anything.
    other = F.normalize(torch.randn(500, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    bg = torch.zeros(500, 2)
    bg[:, 0] = 1
    w_one = fit_label_classifier([keys], [values], [torch.tensor([True, True])])
    w_two = fit_label_classifier(
        [keys, other], [values, bg], [torch.tensor([True, True]), torch.tensor([True, False])]
    )
    torch.testing.assert_close(w_two[:, 1], w_one[:, 1])
    assert not torch.allclose(w_two[:, 0], w_one[:, 0])  # channel 0 learnt from both
    # No cell of the object anywhere: no opinion on it.
    w_none = fit_label_classifier([other], [bg], [torch.tensor([True, True])])
    assert bool((w_none[:, 1] == 0).all())


def test_adapt_labels_shifts_close_calls_only() -> None:
    keys, values = _two_clusters(50, 50, seed=3)
    w = fit_label_classifier([keys], [values], [torch.ones(2, dtype=torch.bool)])
    unsure = torch.full((100, 2), 0.5)
    sure = torch.tensor([[1.0 - 1e-6, 1e-6]]).expand(100, 2)
    fixed = adapt_labels(unsure, keys, w, 0.3)
    torch.testing.assert_close(fixed.sum(dim=-1), torch.ones(100))
    assert (fixed[:50, 1] > 0.5).float().mean() > 0.8  # the classifier decides ties
    kept = adapt_labels(sure, keys, w, 0.3)
    assert bool((kept[:, 0] > 0.99).all())  # ...but not confident propagation
    torch.testing.assert_close(adapt_labels(unsure, keys, w, 0.0), unsure)


def test_shifted_windows_are_the_windows_of_the_moved_tile() -> None:
    h, w, t, pad = 12, 20, 4, 2
    grid = TileGrid(h, w, t)
    cells = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w, 1)
    stacked = torch.cat([pad_cells(cells, grid, pad).flatten(0, 1)] * 2)  # frames 0 and 1
    tiles = torch.arange(grid.num_tiles)
    shift = (1, -2)  # the objects moved one tile down and two left since frame 1
    shifts = [(0, 0), (0, 0), shift]
    index = window_index(grid, pad, [1, 1, 2], tiles, frames=[0, 1, 1], shifts=shifts)
    plain = window_index(grid, pad, [2], tiles)
    frame_cells = stacked.shape[0] // 2
    for tile in tiles.tolist():
        ty, tx = divmod(tile, grid.tiles_x)
        sy = min(max(ty - shift[0], 0), grid.tiles_y - 1)
        sx = min(max(tx - shift[1], 0), grid.tiles_x - 1)
        moved = index[tile, 18 * t * t :] - frame_cells  # the shifted window, in frame 1
        assert bool((index[tile, 18 * t * t :] >= frame_cells).all())
        torch.testing.assert_close(moved, plain[sy * grid.tiles_x + sx])
        torch.testing.assert_close(index[tile, 9 * t * t : 18 * t * t] - frame_cells,
                                   index[tile, : 9 * t * t])  # fmt: skip


def test_object_shift_in_tiles() -> None:
    then = torch.zeros(30, 40, 2)
    then[..., 0] = 1
    now = then.clone()
    then[5:10, 4:12] = torch.tensor([0.0, 1.0])
    now[7:12, 20:28] = torch.tensor([0.0, 1.0])  # 2 cells down, 16 right
    known = torch.tensor([True, True])
    assert _object_shift(then, now, known, tile=8) == (0, 2)
    assert _object_shift(then, now, known, tile=2) == (1, 8)
    assert _object_shift(then, then, known, tile=8) == (0, 0)
    empty = then.clone()
    empty[..., 1] = 0
    assert _object_shift(empty, now, known, tile=8) == (0, 0)  # no object then: no shift
    assert _object_shift(then, now, torch.tensor([True, False]), tile=8) == (0, 0)


def test_adaptation_options_are_checked() -> None:
    with pytest.raises(ValueError, match="classifier_weight"):
        LiteOptions(classifier_weight=-1)
    with pytest.raises(ValueError, match="classifier_ridge"):
        LiteOptions(classifier_ridge=0)
