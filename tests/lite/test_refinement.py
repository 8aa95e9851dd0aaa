"""Edge-aware refinement of the lite tracker's labels (s3cli/lite/refinement.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s3cli.lite import LiteTracker
from s3cli.lite.refinement import refine_labels, refinement_features


def dense_refinement(
    prob: torch.Tensor, feats: torch.Tensor, radius: int, temperature: float, iterations: int
) -> torch.Tensor:
    """Every cell, every pass: the weighted mean over its (2r+1)^2 window's cells that lie in
    the grid, written with unfold (no tiles, no skipped cells)."""
    k, h, w = prob.shape
    size = 2 * radius + 1
    x = feats.permute(2, 0, 1)[None]  # (1, C, h, w)
    c = x.shape[1]
    windows = F.unfold(x, size, padding=radius).view(c, size * size, h, w)
    inside = F.unfold(torch.ones(1, 1, h, w), size, padding=radius).view(size * size, h, w)
    weights = torch.exp(((windows * x[0][:, None]).sum(0) - 1) / temperature) * inside
    for _ in range(iterations):
        labels = F.unfold(prob[None], size, padding=radius).view(k, size * size, h, w)
        prob = (labels * weights).sum(1) / weights.sum(0)
    return prob


def random_case(h: int, w: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(h, w, 6, generator=g), dim=-1)
    prob = torch.softmax(3 * torch.randn(k, h, w, generator=g), dim=0)
    return prob, feats


@pytest.mark.parametrize(("h", "w", "tile"), [(13, 18, 4), (16, 16, 4), (9, 23, 8), (5, 7, 4)])
def test_refinement_equals_the_dense_computation(h: int, w: int, tile: int) -> None:
    # Random labels change everywhere, so every tile is refined: the whole result must equal
    # the plain computation, grid edges (partial tiles) included.
    prob, feats = random_case(h, w, 3, seed=h * w)
    expected = dense_refinement(prob, feats, radius=2, temperature=0.3, iterations=2)
    out = refine_labels(prob, feats, radius=2, temperature=0.3, iterations=2, tile=tile)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sum(0), torch.ones(h, w))


def test_refinement_skips_cells_far_from_label_edges() -> None:
    # One vertical label edge in a wide grid: cells beyond iterations * radius of it keep their
    # labels as given, and every cell's most probable label is the full computation's.
    h, w = 12, 64
    prob, feats = random_case(h, w, 2, seed=3)
    fg = torch.zeros(h, w)
    fg[:, 20:] = 0.9
    fg[:, :20] = 0.2
    prob = torch.stack([1 - fg, fg]) * 0.9 + 0.05 * prob  # soft, argmax edge at column 20
    expected = dense_refinement(prob, feats, radius=3, temperature=0.2, iterations=2)
    out = refine_labels(prob, feats, radius=3, temperature=0.2, iterations=2, tile=4)
    assert torch.equal(out[:, :, 40:], prob[:, :, 40:])  # far from the edge: untouched
    # Refined tiles span columns 12-31 (two tiles around the edge's); a cell whose window also
    # reads unrefined cells in the second pass is close but not equal, so compare the middle.
    torch.testing.assert_close(out[:, :, 16:28], expected[:, :, 16:28], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax(0), expected.argmax(0))


def test_labels_snap_to_the_colour_edge() -> None:
    # A red/blue image split at column 37 (stride-4 cells); the labels spill the object (blue,
    # right) two cells into the red background with a soft ramp, as stride-8 labels do. With
    # colour as the cue the spilled red cells take their red neighbours' label: the refined
    # edge moves onto the image's.
    h, w = 20, 64
    image = torch.zeros(1, 3, 4 * h, 4 * w)
    image[:, 0, :, : 4 * 37] = 0.9
    image[:, 2, :, 4 * 37 :] = 0.8
    f4 = torch.zeros(1, 24, h, w)  # no backbone cue: colour alone
    feats = refinement_features(f4, image, colour=3.0)
    cols = torch.arange(w, dtype=torch.float32)
    fg = torch.sigmoid((cols - 34.5) / 1.5).expand(h, w)  # object on the right from column 35
    prob = torch.stack([1 - fg, fg])
    before = prob.argmax(0)[0]
    out = refine_labels(prob, feats, radius=4, temperature=0.1, iterations=2)
    after = out.argmax(0)
    assert int(before.nonzero()[0]) == 35  # first object column before
    assert (after == after[:1]).all()  # the same in every row
    assert int(after[0].nonzero()[0]) == 37  # snapped onto the colour edge


def test_refinement_features_are_unit_norm_and_weigh_colour() -> None:
    g = torch.Generator().manual_seed(0)
    f4 = torch.randn(1, 24, 6, 10, generator=g)
    image = torch.rand(1, 3, 24, 40, generator=g)
    feats = refinement_features(f4, image, colour=3.0)
    assert feats.shape == (6, 10, 27) and feats.is_contiguous()
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(6, 10))
    plain = refinement_features(f4, image, colour=0.0)
    assert torch.count_nonzero(plain[..., 24:]) == 0


def test_tracker_refines_only_what_it_shows() -> None:
    # refine=False is the stride-8 prediction upsampled; with refinement the shown labels
    # differ near edges, memory (what later frames are matched against) does not.
    from s3cli.lite import load_lite_model

    model = load_lite_model("cpu")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    frames = [np.clip(f // 4 + 40 * (np.arange(128)[None, :, None] > 60 + 4 * i), 0, 255)
              .astype(np.uint8) for i, f in enumerate(frames)]  # fmt: skip
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[:, 62:] = 1
    runs = {}
    for refine in (False, True):
        tracker = LiteTracker(model, refine=refine, max_internal_size=-1)
        out = [tracker.step(f, mask if i == 0 else None) for i, f in enumerate(frames)]
        runs[refine] = (out, [m.value.clone() for m in tracker.state.frames()])
    (plain, plain_memory), (refined, refined_memory) = runs[False], runs[True]
    torch.testing.assert_close(refined[0], plain[0])  # the annotated frame: the mask
    assert not torch.equal(refined[1], plain[1])
    torch.testing.assert_close(refined[1].sum(0), torch.ones(96, 128))
    assert len(plain_memory) == len(refined_memory)
    for a, b in zip(plain_memory, refined_memory, strict=True):
        assert torch.equal(a, b)


def test_refinement_options_are_checked() -> None:
    from s3cli.lite.tracker import LiteOptions

    with pytest.raises(ValueError, match="refine_temperature"):
        LiteOptions(refine_temperature=0)
    with pytest.raises(ValueError, match="refine_radius"):
        LiteOptions(refine_radius=-1)
    with pytest.raises(ValueError, match="refine_colour"):
        LiteOptions(refine_colour=-1.0)


def test_refinement_never_takes_away_most_of_a_small_object() -> None:
    # A 20 x 20 square on noise, at 64 x 96 (the square is 2.5 x 2.5 stride-8 cells): the
    # stride-8 labels hold only part of it, and the mean over the square's similar cells would
    # give it to the background. Where refining would halve an object or worse, the frame is
    # shown unrefined.
    from s3cli.lite import load_lite_model

    model = load_lite_model("cpu")
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    frames = []
    for t in range(3):
        img = background.copy()
        img[20:40, 10 + 5 * t : 30 + 5 * t] = (250, 30, 30)
        frames.append(img)
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[20:40, 20:40] = 1
    areas = {}
    for refine in (False, True):
        tracker = LiteTracker(model, refine=refine, max_internal_size=64)
        areas[refine] = []
        for i, t in enumerate((2, 1, 0)):
            prob = tracker.step(frames[t], mask if i == 0 else None)
            areas[refine].append(int(tracker.to_index_mask(prob).sum()))
    assert all(a > 0 for a in areas[False])
    for shown, plain in zip(areas[True], areas[False], strict=True):
        assert 2 * shown > plain, (areas[True], areas[False])
