"""Tracker behaviour with a tiny fake network that follows the Protocol.

The fake tracks by colour: keys are stride-16 mean colours, mask values are the stride-16 mask
areas, and the decoder turns the read-out mask back into probabilities. It also records every
call so the per-frame decisions (segment, memorise, sensory update) can be checked.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3cli.inference import InferenceConfig, Tracker
from s3cli.inference.transforms import aggregate

H, W = 40, 72  # padded to 48 x 80 (3 x 5 grid)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeNetwork(nn.Module):
    pad_divisor = 16
    key_dim = 4
    value_dim = 3
    sensory_dim = 2
    pixel_dim = 5

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones((), dtype=dtype))
        self.calls: dict[str, list] = defaultdict(list)

    def encode_image(self, image):
        self.calls["encode_image"].append(tuple(image.shape))
        f16 = F.avg_pool2d(image, 16) * self.gain  # (B, 3, h, w)
        pix = torch.cat([f16, f16[:, :2] ** 2], dim=1)  # (B, 5, h, w)
        return [f16, F.avg_pool2d(image, 8), F.avg_pool2d(image, 4)], pix

    def transform_key(self, f16, need_sk=True, need_ek=True):
        key = torch.cat([f16, f16.mean(1, keepdim=True)], dim=1) * 20  # (B, 4, h, w)
        return key, 1 + f16[:, :1] ** 2, torch.sigmoid(torch.cat([f16, f16[:, :1]], dim=1))

    def encode_mask(
        self,
        image,
        pix_feat,
        sensory,
        masks,
        *,
        deep_update=True,
        chunk_size=-1,
        need_weights=False,
    ):
        self.calls["encode_mask"].append((tuple(image.shape), tuple(masks.shape)))
        bs, n = masks.shape[:2]
        small = F.avg_pool2d(masks, 16)  # (B, N, h, w)
        value = small.unsqueeze(2).repeat(1, 1, self.value_dim, 1, 1)  # (B, N, CV, h, w)
        new_sensory = 0.5 * sensory + 0.5 * small.unsqueeze(2)
        area = small.flatten(2).sum(-1, keepdim=True)  # (B, N, 1)
        summaries = (
            torch.cat([small.flatten(2)[..., :5], area], dim=-1).unsqueeze(2).repeat(1, 1, 2, 1)
        )  # (B, N, Q=2, 6)
        return value, new_sensory, summaries, None

    def pixel_fusion(self, pix_feat, pixel, sensory, last_mask, *, chunk_size=-1):
        self.calls["pixel_fusion"].append(tuple(pixel.shape))
        return pixel + 0.01 * sensory.mean(2, keepdim=True)

    def readout_query(self, pixel_readout, obj_memory, *, selector=None, need_weights=False):
        return pixel_readout, None

    def segment(self, ms_features, readout, sensory, *, chunk_size=-1, update_sensory=True):
        self.calls["segment"].append((tuple(readout.shape), update_sensory))
        logits = (readout[:, :, 0] - 0.3) * 12  # (B, N, h, w)
        prob = torch.sigmoid(F.interpolate(logits, scale_factor=16, mode="nearest"))
        logits = aggregate(prob, dim=1)  # (B, N + 1, H, W)
        new_sensory = 0.9 * sensory + 0.1 * readout[:, :, :2]
        return new_sensory, logits, torch.softmax(logits, dim=1)


def _scene(t: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey frame with a red square (id 7) and a blue square (id 42) that hop between cells
    of the stride-16 grid (the padding puts cell borders at 12, 28, 44, 60)."""
    img = np.full((H, W, 3), 128, dtype=np.uint8)
    mask = np.zeros((H, W), dtype=np.int64)
    x = 12 + 16 * (t % 3)
    img[12:28, x : x + 16] = (230, 20, 20)
    mask[12:28, x : x + 16] = 7
    y = 28 if t % 2 == 0 else 0
    img[y : y + 12, 44:60] = (20, 20, 230)
    mask[y : y + 12, 44:60] = 42
    return img, mask


def _count(net: FakeNetwork, name: str) -> int:
    return len(net.calls[name])


def test_output_shape_order_and_helpers() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, mem_every=2)
    img, mask = _scene(0)
    out = tracker.step(img, mask)  # objects default to the sorted non-zero ids
    assert tracker.object_ids == [7, 42]
    assert out.shape == (3, H, W) and out.dtype == torch.float32
    assert torch.allclose(out.sum(0), torch.ones(H, W), atol=1e-5)
    assert torch.equal(tracker.to_index_mask(out), torch.from_numpy(mask))
    for t in range(1, 4):
        img, mask = _scene(t)
        out = tracker.step(img)
        assert out.shape == (3, H, W)
        index = tracker.to_index_mask(out)
        # the fake follows the coloured squares well enough
        assert (index == torch.from_numpy(mask)).float().mean() > 0.9
    binary = tracker.to_binary_masks(out)
    assert list(binary) == [7, 42] and binary[42].dtype == torch.bool
    assert torch.equal(binary[7], index == 7)


def test_memory_schedule_and_sensory_updates() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, mem_every=3, stagger_updates=5)
    mem_frames, sensory_flags = [], []
    for t in range(9):
        img, mask = _scene(t)
        before = _count(net, "encode_mask")
        seg_before = _count(net, "segment")
        tracker.step(img, mask if t == 0 else None, end=(t == 8))
        if _count(net, "encode_mask") > before:
            mem_frames.append(t)
        if _count(net, "segment") > seg_before:
            sensory_flags.append(net.calls["segment"][-1][1])
    assert mem_frames == [0, 3, 6]
    # distances 1, 2, 3 update; the end frame does not
    assert sensory_flags == [True, True, True, True, True, True, True, False]
    stats = tracker.memory.stats().buckets[0]
    assert stats.work_size == 3 * 15 and stats.work_perm_size == 15


def test_stagger_updates_subset() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, mem_every=5, stagger_updates=2)
    img, mask = _scene(0)
    tracker.step(img, mask)
    for t in range(1, 6):
        tracker.step(_scene(t)[0])
    # stagger offsets: round(linspace(1, 5, 2)) = {1, 5}
    assert [flag for _, flag in net.calls["segment"]] == [True, False, False, False, True]


def test_bounded_memory_over_many_frames() -> None:
    net = FakeNetwork()
    tracker = Tracker(
        net,
        mem_every=1,
        use_long_term=True,
        long_term={
            "max_mem_frames": 4,
            "min_mem_frames": 2,
            "num_prototypes": 5,
            "max_num_tokens": 20,
            "buffer_tokens": 5,
        },
    )
    img, mask = _scene(0)
    tracker.step(img, mask)
    hw = 15
    for t in range(1, 300):
        tracker.step(_scene(t)[0])
        for stats in tracker.memory.stats().buckets.values():
            assert stats.work_size <= hw + 3 * hw
            assert stats.long_size <= 20
    fifo = Tracker(FakeNetwork(), mem_every=1, max_mem_frames=3)
    fifo.step(img, mask)
    for t in range(1, 120):
        fifo.step(_scene(t)[0])
        assert fifo.memory.stats().total_tokens <= 3 * hw


def test_add_object_later_and_delete() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, mem_every=2)
    img, mask = _scene(0)
    tracker.step(img, np.where(mask == 42, 42, 0))
    assert tracker.object_ids == [42]
    tracker.step(_scene(1)[0])
    img, mask = _scene(2)
    out = tracker.step(img, np.where(mask == 7, 7, 0))
    assert tracker.object_ids == [42, 7] and out.shape == (3, H, W)
    assert len(tracker.memory.work.buckets) == 2
    out = tracker.step(_scene(3)[0])
    assert out.shape == (3, H, W)

    tracker.delete_objects([42])
    assert tracker.object_ids == [7]
    stats = tracker.memory.stats()
    assert [b.object_ids for b in stats.buckets.values()] == [(7,)]
    assert stats.num_sensory == 1 and stats.num_object_memories == 1
    out = tracker.step(_scene(4)[0])
    assert out.shape == (2, H, W)
    index = tracker.to_index_mask(out)
    assert ((index == 7) == torch.from_numpy(_scene(4)[1] == 7)).float().mean() > 0.9

    tracker.delete_objects(7)
    out = tracker.step(_scene(5)[0])
    assert out.shape == (1, H, W) and torch.all(out == 1)
    # an id can come back as a new object
    img, mask = _scene(6)
    out = tracker.step(img, mask, [42])
    assert tracker.object_ids == [42] and out.shape == (2, H, W)


def _twin_trackers(**options) -> tuple[Tracker, Tracker, FakeNetwork]:
    """Two trackers with the same history: objects 7 and 42 from frame 0, four frames."""
    net = FakeNetwork()
    a, b = Tracker(net, **options), Tracker(net, **options)
    img, mask = _scene(0)
    for tracker in (a, b):
        tracker.step(img, mask)
        for t in range(1, 4):
            tracker.step(_scene(t)[0])
    return a, b, net


def _expected(pred: torch.Tensor) -> torch.Tensor:
    return torch.softmax(aggregate(pred, dim=0), dim=0)


def test_incomplete_mask_repeating_a_tracked_object() -> None:
    """A mask naming only tracked object 7 (42 is tracked too): segment, then 7 takes its given
    mask and 42 is zeroed under it. (The official merge mishandles this case.)"""
    a, b, net = _twin_trackers(mem_every=5)
    img, _ = _scene(4)
    given = np.zeros((H, W), dtype=np.int64)
    given[0:20, 0:30] = 7  # deliberately unlike the prediction
    segments = _count(net, "segment")
    out = a.step(img, given)
    assert _count(net, "segment") == segments + 1
    assert a.object_ids == [7, 42] and out.shape == (3, H, W)
    pred = b.step(img)  # the plain prediction of the same frame
    merged = pred[1:].clone()
    fg = torch.from_numpy(given == 7)
    merged[:, fg] = 0
    merged[0] = fg.float()
    assert torch.allclose(out, _expected(merged), atol=1e-6)
    assert torch.all(out[1][fg] > 0.99) and torch.all(out[1][~fg] < 1e-5)
    # object 42 keeps its prediction outside the given mask
    assert out[2][~fg].max() > 0.5
    # the given mask was memorised for both objects
    assert a.memory.stats().buckets[0].work_size == 2 * 15


def test_incomplete_mask_with_tracked_and_new_objects() -> None:
    a, b, net = _twin_trackers(mem_every=5)
    img, _ = _scene(4)
    given = np.zeros((H, W), dtype=np.int64)
    given[0:16, 0:16] = 42
    given[30:40, 0:20] = 5
    out = a.step(img, given, [42, 5])
    assert a.object_ids == [7, 42, 5] and out.shape == (4, H, W)
    pred = b.step(img)
    m42, m5 = torch.from_numpy(given == 42).float(), torch.from_numpy(given == 5).float()
    merged = pred[1:].clone()
    merged[:, (m42 + m5) > 0] = 0
    merged[1] = m42
    merged = torch.cat([merged, m5[None]], dim=0)
    assert torch.allclose(out, _expected(merged), atol=1e-6)
    assert [b.object_ids for b in a.memory.stats().buckets.values()] == [(7, 42), (5,)]


def test_new_object_only_matches_official_merge() -> None:
    a, b, _ = _twin_trackers(mem_every=5)
    img, _ = _scene(4)
    given = np.zeros((H, W), dtype=np.int64)
    given[30:40, 0:20] = 9
    out = a.step(img, given)
    pred = b.step(img)
    fg = torch.from_numpy(given == 9)
    merged = pred[1:].clone()
    merged[:, fg] = 0
    merged = torch.cat([merged, fg.float()[None]], dim=0)
    assert a.object_ids == [7, 42, 9]
    assert torch.allclose(out, _expected(merged), atol=1e-6)


def test_complete_mask_replaces_prediction_without_segmenting() -> None:
    a, _, net = _twin_trackers(mem_every=5)
    img, mask = _scene(4)
    mask[0:8, 0:8] = 3  # a new object as well
    segments = _count(net, "segment")
    out = a.step(img, mask, [42, 3, 7])
    assert _count(net, "segment") == segments
    assert a.object_ids == [7, 42, 3]
    assert torch.equal(a.to_index_mask(out), torch.from_numpy(mask))


def test_unlisted_labels_are_ignored_and_empty_masks_mean_no_mask() -> None:
    net = FakeNetwork()
    tracker = Tracker(net)
    img, mask = _scene(0)
    out = tracker.step(img, mask, [7])
    assert tracker.object_ids == [7] and out.shape == (2, H, W)
    out = tracker.step(_scene(1)[0], np.zeros((H, W), dtype=np.int64))
    assert out.shape == (2, H, W)
    with pytest.raises(ValueError):
        tracker.step(img, mask[:10])
    with pytest.raises(ValueError):
        tracker.step(img, None, [7])


def test_nothing_tracked_gives_background() -> None:
    net = FakeNetwork()
    tracker = Tracker(net)
    out = tracker.step(_scene(0)[0])
    assert out.shape == (1, H, W) and torch.all(out == 1)
    assert _count(net, "encode_image") == 0
    img, mask = _scene(1)
    assert tracker.step(img, mask).shape == (3, H, W)


def test_end_frame_does_not_write_memory() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, mem_every=1)
    img, mask = _scene(0)
    tracker.step(img, mask)
    tracker.step(_scene(1)[0], end=True)
    assert _count(net, "encode_mask") == 1
    # but a new object given on the end frame is memorised so that it can be tracked
    given = np.zeros((H, W), dtype=np.int64)
    given[0:8, 0:8] = 5
    tracker.step(_scene(2)[0], given, end=True)
    assert _count(net, "encode_mask") == 2 and tracker.memory.has_memory(5)


def test_chunked_objects_read_in_chunks() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, chunk_size=1)
    img, mask = _scene(0)
    tracker.step(img, mask)
    tracker.step(_scene(1)[0])
    assert net.calls["pixel_fusion"][-2:] == [(1, 1, 3, 3, 5), (1, 1, 3, 3, 5)]


def test_flip_augmentation_uses_a_batch_of_two() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, flip_aug=True)
    img, mask = _scene(0)
    tracker.step(img, mask)
    out = tracker.step(_scene(1)[0])
    assert net.calls["encode_image"][-1][0] == 2
    assert net.calls["encode_mask"][-1][1][0] == 2
    assert out.shape == (3, H, W)
    assert torch.allclose(out.sum(0), torch.ones(H, W), atol=1e-5)
    # a horizontally symmetric scene gives a symmetric prediction with flip averaging
    sym = np.full((48, 64, 3), 100, dtype=np.uint8)
    sym[16:32, 16:48] = (240, 240, 0)
    sym_mask = np.zeros((48, 64), dtype=np.int64)
    sym_mask[16:32, 16:48] = 1
    t2 = Tracker(FakeNetwork(), flip_aug=True)
    t2.step(sym, sym_mask)
    out = t2.step(sym)
    assert torch.allclose(out, out.flip(-1), atol=1e-6)


def test_max_internal_size_resizes_inside_only() -> None:
    net = FakeNetwork()
    tracker = Tracker(net, max_internal_size=20)
    img, mask = _scene(0)
    out = tracker.step(img, mask)
    assert net.calls["encode_image"][-1] == (1, 3, 32, 48)  # 20 x 36, padded
    assert out.shape == (3, H, W)
    out = tracker.step(_scene(1)[0])
    assert out.shape == (3, H, W)
    assert torch.allclose(out.sum(0), torch.ones(H, W), atol=1e-5)


def test_float_tensor_input_matches_uint8() -> None:
    img, mask = _scene(0)
    a, b = Tracker(FakeNetwork()), Tracker(FakeNetwork())
    a.step(img, mask)
    b.step(torch.from_numpy(img).permute(2, 0, 1).float() / 255, torch.from_numpy(mask))
    img1 = _scene(1)[0]
    out_a = a.step(img1)
    out_b = b.step(torch.from_numpy(img1).permute(2, 0, 1).float() / 255)
    assert torch.equal(out_a, out_b)


def test_dtype_follows_network_and_output_is_float32() -> None:
    net = FakeNetwork(dtype=torch.float64)
    tracker = Tracker(net)
    img, mask = _scene(0)
    tracker.step(img, mask)
    out = tracker.step(_scene(1)[0])
    assert out.dtype == torch.float32
    assert tracker.memory.work.buckets[0].key.dtype == torch.float64


def test_options_and_config() -> None:
    net = FakeNetwork()
    with pytest.raises(TypeError, match="memevery"):
        Tracker(net, memevery=3)
    with pytest.raises(TypeError, match="bogus"):
        Tracker(net, long_term={"bogus": 1})
    cfg = InferenceConfig(mem_every=2)
    tracker = Tracker(net, cfg, top_k=10)
    assert tracker.config.mem_every == 2 and tracker.config.top_k == 10
    assert Tracker(net, cfg).config is cfg


def test_output_is_independent_of_state() -> None:
    tracker = Tracker(FakeNetwork())
    img, mask = _scene(0)
    out = tracker.step(img, mask)
    with torch.inference_mode():
        out.zero_()
    assert tracker.state.last_mask is not None and tracker.state.last_mask.sum() > 0


def test_size_change_is_rejected_and_reset_forgets() -> None:
    tracker = Tracker(FakeNetwork())
    img, mask = _scene(0)
    tracker.step(img, mask)
    with pytest.raises(ValueError, match="size"):
        tracker.step(img[:32])
    tracker.reset()
    assert tracker.object_ids == [] and tracker.frame_index == -1
    assert tracker.step(img[:32]).shape == (1, 32, W)


def test_inference_package_imports_neither_model_nor_io() -> None:
    code = (
        "import sys, s3cli.inference, s3cli.inference.engine; "
        "bad = [m for m in sys.modules if m.startswith(('s3cli.model', 's3cli.io'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
