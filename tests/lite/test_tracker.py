"""LiteTracker: the engine's Tracker API (multi-object, objects added mid-video, deletion,
re-annotation) on the judo example, and the window/aggregation building blocks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from s3cli.lite import LiteFeatures, LiteModel, LiteOptions, LiteTracker, load_lite_model
from s3cli.lite.propagation import (
    TileGrid,
    pad_cells,
    propagate_labels,
    query_tiles,
    untile,
    window_index,
)
from tests.conftest import SHARED, require_shared

JUDO_IMAGES = SHARED / "examples" / "images" / "judo"
JUDO_MASKS = SHARED / "examples" / "masks" / "judo"
SIZE = 240  # internal size for speed; the API does not depend on it


@pytest.fixture(scope="module")
def model() -> LiteModel:
    return load_lite_model("cpu")


@pytest.fixture(scope="module")
def judo() -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """Frames (H, W, 3) and the given masks by frame index, resized to the frame (the frame-5
    mask is one pixel narrower, as ``s3 segment --resize-mask`` would fix)."""
    require_shared(JUDO_IMAGES)
    frames = [np.array(Image.open(p).convert("RGB")) for p in sorted(JUDO_IMAGES.glob("*.jpg"))]
    h, w = frames[0].shape[:2]
    masks = {}
    for p in sorted(require_shared(JUDO_MASKS).glob("*.png")):
        m = np.array(Image.open(p))
        if m.shape != (h, w):
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
        masks[int(p.stem)] = m
    return frames, masks


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_objects_added_mid_video(model: LiteModel, judo) -> None:
    frames, masks = judo
    assert sorted(masks) == [0, 5, 8, 13]
    tracker = LiteTracker(model, max_internal_size=SIZE)
    expected: list[int] = []
    seen: dict[int, list[int]] = {}
    for i, frame in enumerate(frames):
        mask = masks.get(i)
        if mask is not None:
            expected += [int(v) for v in np.unique(mask) if v and v not in expected]
        prob = tracker.step(frame, mask, end=i == len(frames) - 1)
        assert tracker.object_ids == expected, i
        assert prob.dtype == torch.float32 and prob.shape == (1 + len(expected), *frame.shape[:2])
        torch.testing.assert_close(prob.sum(0), torch.ones(frame.shape[:2]), atol=1e-4, rtol=0)
        index = tracker.to_index_mask(prob).numpy()
        for obj in expected:
            seen.setdefault(obj, []).append(int((index == obj).sum()))
        if mask is not None:
            for obj in np.unique(mask):
                if obj:  # the given objects take their given masks
                    assert _iou(index == obj, mask == obj) > 0.9, (i, obj)
    assert expected == [1, 2, 3, 4]
    # Each object, once given, keeps being tracked: present on every later frame.
    first = {1: 0, 2: 5, 3: 8, 4: 13}
    for obj, counts in seen.items():
        assert len(counts) == len(frames) - first[obj]
        assert all(c > 0 for c in counts), (obj, counts)


def test_tracks_objects_between_annotations(model: LiteModel, judo) -> None:
    """Object 1 from frame 0 still overlaps where frame 5's annotation puts nothing else, and
    objects are one pixel-wise partition (no pixel in two objects)."""
    frames, masks = judo
    tracker = LiteTracker(model, max_internal_size=SIZE)
    tracker.step(frames[0], masks[0])
    for frame in frames[1:5]:
        prob = tracker.step(frame)
    index = tracker.to_index_mask(prob).numpy()
    # The frame-0 mask of object 1, four frames later: largely the same region.
    assert _iou(index == 1, masks[0] == 1) > 0.5
    binary = tracker.to_binary_masks(prob)
    assert list(binary) == [1]


def test_multi_object_first_frame_and_deletion(model: LiteModel, judo) -> None:
    frames, masks = judo
    both = masks[0].copy()
    both[masks[8] == 3] = 3
    tracker = LiteTracker(model, max_internal_size=SIZE)
    prob = tracker.step(frames[0], both)
    assert tracker.object_ids == [1, 3]
    prob = tracker.step(frames[1])
    assert prob.shape[0] == 3
    tracker.delete_objects([1, 99])  # unknown ids are ignored
    assert tracker.object_ids == [3]
    prob = tracker.step(frames[2])
    assert prob.shape[0] == 2
    assert (tracker.to_index_mask(prob) == 3).any()


def test_objects_argument_and_reannotation(model: LiteModel, judo) -> None:
    frames, masks = judo
    tracker = LiteTracker(model, max_internal_size=SIZE)
    two = masks[0].copy()
    two[masks[13] == 4] = 4
    tracker.step(frames[0], two, objects=[4])  # only id 4 is defined by this mask
    assert tracker.object_ids == [4]
    tracker.step(frames[1], masks[0])  # adds object 1, object 4 keeps being tracked
    assert tracker.object_ids == [4, 1]
    # Re-annotate object 4 with an empty-elsewhere mask: it takes the given mask.
    prob = tracker.step(frames[2], np.where(masks[13] == 4, 4, 0).astype(np.uint8))
    index = tracker.to_index_mask(prob).numpy()
    assert _iou(index == 4, masks[13] == 4) > 0.9
    assert (index == 1).any()  # object 1 kept, zeroed only under object 4


def test_inputs(model: LiteModel, judo) -> None:
    frames, masks = judo
    tracker = LiteTracker(model, max_internal_size=SIZE)
    empty = tracker.step(frames[0])  # nothing to track yet
    assert empty.shape == (1, *frames[0].shape[:2]) and bool((empty == 1).all())
    image = torch.from_numpy(frames[1]).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    prob = tracker.step(image, torch.from_numpy(masks[0].astype(np.int64)))
    assert tracker.object_ids == [1] and prob.shape[0] == 2
    with pytest.raises(ValueError, match="frame size changed"):
        tracker.step(frames[2][:100])
    with pytest.raises(ValueError, match="without a mask"):
        tracker.step(frames[2], objects=[1])
    with pytest.raises(TypeError, match="unknown lite option"):
        LiteTracker(model, no_such_option=1)
    with pytest.raises(ValueError):
        LiteOptions(top_k=-1)


def test_memory_is_bounded(model: LiteModel) -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:60] = 1
    tracker = LiteTracker(model, mem_every=2, num_recent=3, num_previous=2, max_permanent=2)
    for i in range(40):
        tracker.step(frame, mask if i % 10 == 0 else None)
        state = tracker.state
        assert len(state.recent) <= 3 and len(state.previous) <= 2
        assert len(state.permanent) <= 2
        assert len(state.frames()) <= 7
    assert state.permanent[0].index == 0  # the first annotation is never dropped


def test_window_index_matches_brute_force() -> None:
    h, w, t, pad = 11, 13, 4, 2
    grid = TileGrid(h, w, t)
    cells = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w, 1)
    padded = pad_cells(cells, grid, pad)  # zero outside the grid
    stacked = torch.cat([padded.flatten(0, 1), 100 * padded.flatten(0, 1)])  # two frames
    tiles = torch.arange(grid.num_tiles)
    index = window_index(grid, pad, [1, 2], tiles)  # frame 0 reach 1, frame 1 reach 2
    assert index.shape == (grid.num_tiles, 9 * t * t + 25 * t * t)
    for tile in tiles.tolist():
        ty, tx = divmod(tile, grid.tiles_x)
        got = stacked[index[tile], 0]
        for frame, reach, scale in ((0, 1, 1), (1, 2, 100)):
            ys = range((ty - reach) * t, (ty + reach + 1) * t)
            xs = range((tx - reach) * t, (tx + reach + 1) * t)
            ref = sorted(
                scale * (y * w + x + 1) if 0 <= y < h and 0 <= x < w else 0 for y in ys for x in xs
            )
            part = got[: 9 * t * t] if frame == 0 else got[9 * t * t :]
            assert sorted(part.tolist()) == ref, (tile, frame)
    back = untile(query_tiles(cells, grid), grid)
    torch.testing.assert_close(back.permute(1, 2, 0), cells)
    with pytest.raises(ValueError, match="exceeds the padding"):
        window_index(grid, 1, [2], tiles)


def test_propagation_top_k_and_validity() -> None:
    queries = torch.tensor([[[1.0, 0.0]]])  # (A=1, Q=1, C=2)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, 0.0]])  # 2 frames x 2 cells
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    index = torch.tensor([[0, 1, 2, 3]])
    # Top-1: the exact match, label 1.
    out = propagate_labels(queries, keys, values, index, top_k=1, temperature=0.05)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]]]))
    # Soft: the 0.9 match in frame 1 says background with weight exp(-2).
    out = propagate_labels(queries, keys, values, index, top_k=2, temperature=0.05)
    torch.testing.assert_close(out[0, 0, 0], torch.sigmoid(torch.tensor(-2.0)))
    # Frame 1 knows no channel: only frame 0 counts.
    valid = torch.tensor([[True, True], [False, False]])
    for top_k in (3, 0):
        out = propagate_labels(
            queries, keys, values, index, top_k, 0.05, valid=valid, frame_cells=2
        )
        assert float(out[0, 0, 1]) > 0.99


def test_no_state_in_the_model(model: LiteModel, judo) -> None:
    """One model serves two trackers; stepping one does not change the other's result."""
    frames, masks = judo
    a = LiteTracker(model, max_internal_size=SIZE)
    b = LiteTracker(model, max_internal_size=SIZE)
    a.step(frames[0], masks[0])
    b.step(frames[0], masks[0])
    pa = a.step(frames[1])
    for frame in frames[2:4]:
        a.step(frame)
    pb = b.step(frames[1])
    torch.testing.assert_close(pa, pb)


def test_bf16_autocast_runs_only_the_backbone_in_bf16(model: LiteModel, judo) -> None:
    """Under CPU bf16 autocast (``--precision bf16``) keys and labels stay float32 and the
    masks match the float32 run's."""
    frames, masks = judo
    runs = []
    for enabled in (False, True):
        tracker = LiteTracker(model, max_internal_size=SIZE)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            for i, frame in enumerate(frames[:5]):
                prob = tracker.step(frame, masks[0] if i == 0 else None)
        assert prob.dtype == torch.float32
        assert all(m.key.dtype == m.value.dtype == torch.float32 for m in tracker.state.frames())
        runs.append(tracker.to_index_mask(prob).numpy())
    assert _iou(runs[0] == 1, runs[1] == 1) > 0.95


def test_classifier_follows_the_objects(model: LiteModel, judo) -> None:
    frames, masks = judo
    tracker = LiteTracker(model, max_internal_size=SIZE)
    tracker.step(frames[0], masks[0])
    w = tracker.state.classifier
    # projected features, the pooled stride-4 features and the colour
    key_channels = tracker.state.basis.shape[1] + model.channels[4] + 3
    assert w is not None and w.shape == (key_channels + 1, 2)
    tracker.step(frames[1])
    assert tracker.state.classifier is w  # predicted frames do not refit it
    tracker.step(frames[5], masks[5])  # object 2 appears: refit with three channels
    assert tracker.state.classifier.shape[1] == 3
    tracker.delete_objects([1])
    assert tracker.state.classifier.shape[1] == 2
    prob = tracker.step(frames[6])
    assert (tracker.to_index_mask(prob) == 2).any()
    off = LiteTracker(model, max_internal_size=SIZE, classifier_weight=0)
    off.step(frames[0], masks[0])
    assert off.state.classifier is None


def _first_frame(model: LiteModel, judo) -> tuple[torch.Tensor, LiteFeatures]:
    """The judo clip's first frame (3, 480, 848) in [0, 1] and its expanded features."""
    img = torch.from_numpy(judo[0][0]).permute(2, 0, 1).float()[:, :480, :848] / 255
    return img, model.features(img[None], expanded=True)


def test_keys_carry_the_cells_colour(model: LiteModel, judo) -> None:
    tracker = LiteTracker(model, key_colour=0.5)
    img, feats = _first_frame(model, judo)
    plain = tracker._feature_keys(feats)  # (60, 106, 88)
    keys = tracker._keys(feats, img)  # (60, 106, 91)
    assert keys.shape == (*plain.shape[:2], plain.shape[-1] + 3)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(keys.shape[:2]))
    # The colour part is the cell's mean colour, centred on the first frame's, times 0.5, and
    # the feature part keeps its direction.
    cells = torch.nn.functional.avg_pool2d(img[None], 8)[0].permute(1, 2, 0)
    colour = (cells - cells.mean(dim=(0, 1))) * 0.5
    scale = torch.sqrt(1 + (colour * colour).sum(-1, keepdim=True))
    torch.testing.assert_close(keys, torch.cat([plain, colour], -1) / scale, atol=1e-5, rtol=1e-5)
    # The centre is the first frame's: a brighter later frame has brighter colour parts.
    later = tracker._keys(feats, (img + 0.1).clamp(max=1))
    assert float(later[..., -3:].mean()) > float(keys[..., -3:].mean())
    # key_colour 0: the feature keys alone.
    off = LiteTracker(model, key_colour=0.0)
    assert torch.equal(off._keys(feats, img), off._feature_keys(feats))
    with pytest.raises(ValueError, match="key_colour"):
        LiteOptions(key_colour=-0.1)


def test_keys_carry_the_stride4_texture(model: LiteModel, judo) -> None:
    tracker = LiteTracker(model, f4_weight=0.8)
    img, feats = _first_frame(model, judo)
    coarse = tracker._coarse_keys(feats)  # (60, 106, 64)
    keys = tracker._feature_keys(feats)  # (60, 106, 88)
    assert keys.shape == (*coarse.shape[:2], coarse.shape[-1] + 24)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(keys.shape[:2]))
    # The fine part is the stride-4 output pooled over each stride-8 cell, centred on the first
    # frame's mean, unit-normalised and weighted 0.8; the coarse part keeps its direction.
    fine = torch.nn.functional.avg_pool2d(feats.f4.float(), 2)[0].permute(1, 2, 0)
    torch.testing.assert_close(tracker.state.mean4, fine.mean(dim=(0, 1)))
    fine = torch.nn.functional.normalize(fine - fine.mean(dim=(0, 1)), dim=-1) * 0.8
    expected = torch.cat([coarse, fine], -1) / (1 + 0.8**2) ** 0.5
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)
    # The centre stays the first frame's.
    later = model.features((img + 0.1).clamp(max=1)[None], expanded=True)
    tracker._feature_keys(later)
    torch.testing.assert_close(tracker.state.mean4, feats.f4.float().mean(dim=(0, 2, 3)))
    # f4_weight 0: the stride-8/16 keys alone.
    off = LiteTracker(model, f4_weight=0.0)
    assert torch.equal(off._feature_keys(feats), off._coarse_keys(feats))
    with pytest.raises(ValueError, match="f4_weight"):
        LiteOptions(f4_weight=-0.1)
