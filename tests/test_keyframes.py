"""``s3cli.keyframes``: the plan of passes, the fusion, the spill and ``propagate``.

Most cases drive :func:`propagate` with :class:`EchoTracker` (keeps each given mask where it was
given) or :class:`ConstTracker` (a fixed probability per pass), over synthetic frames whose pixel
value is their index, so which pass saw which frame, in which order, with which mask, and what
was fused are all visible. One case runs the real ``lite`` tracker on a tiny video to check that
reusing the backbone features between the passes changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s3cli.errors import InputError
from s3cli.io.masks import IndexMask
from s3cli.io.video import FolderSource, Frame, FrameSource
from s3cli.keyframes import (
    SPILL_PREFIX,
    FeatureCache,
    Keyframe,
    Spill,
    fuse,
    fusion_weights,
    index_from_probabilities,
    object_order,
    plan_passes,
    propagate,
)

H, W = 8, 12


# --------------------------------------------------------------------------------------------
# Helpers


class Source(FrameSource):
    """``n`` frames generated on demand (frame t is filled with the value t % 256); counts how
    often it is iterated and how many frames it decoded."""

    def __init__(self, n: int, h: int = H, w: int = W, fail_at: int | None = None) -> None:
        self.path = Path(f"synthetic-{n}")
        self.n, self.h, self.w = n, h, w
        self.fps = 25.0
        self.num_frames = n
        self.iterations = 0
        self.decoded = 0
        self.fail_at = fail_at

    def __iter__(self) -> Iterator[Frame]:
        self.iterations += 1
        for t in range(self.n):
            if t == self.fail_at:
                raise InputError(f"{self.path}: video is corrupt or truncated at frame {t}")
            self.decoded += 1
            yield Frame(t, self.frame_name(t), np.full((self.h, self.w, 3), t % 256, np.uint8))


def box_mask(obj: int, h: int = H, w: int = W) -> np.ndarray:
    """Object ``obj`` as a box of its own columns, so that objects never overlap."""
    m = np.zeros((h, w), np.int64)
    m[1 : h - 1, 2 * obj - 2 : 2 * obj] = obj
    return m


def masks_of(**objects_at: list[int]) -> list[Keyframe]:
    """``masks_of(f3=[1], f7=[1, 2])``: keyframes with boxes of those objects."""
    out = []
    for name, objs in objects_at.items():
        arr = np.zeros((H, W), np.int64)
        for o in objs:
            arr += box_mask(o)
        out.append(Keyframe.from_mask(int(name[1:]), arr))
    return out


class EchoTracker:
    """Each object stays where it was last given; records (frame value, given ids) per step."""

    made: list[EchoTracker] = []

    def __init__(self, network: object = None) -> None:
        self.network = network
        self.ids: list[int] = []
        self.index: np.ndarray | None = None
        self.seen: list[tuple[int, tuple[int, ...], bool]] = []
        EchoTracker.made.append(self)

    @property
    def object_ids(self) -> list[int]:
        return list(self.ids)

    def step(self, image, mask=None, objects=None, end=False) -> torch.Tensor:
        t = int(image[0, 0, 0])
        self.seen.append((t, tuple(objects or ()), end))
        if self.network is not None:
            self.network.features(torch.from_numpy(np.ascontiguousarray(image)))
        if self.index is None:
            self.index = np.zeros(image.shape[:2], np.int64)
        if mask is not None:
            given = list(objects)
            self.ids.extend(o for o in given if o not in self.ids)
            self.index[np.isin(self.index, given)] = 0
            keep = np.isin(mask, given)
            self.index[keep] = np.asarray(mask)[keep]
        prob = torch.zeros((1 + len(self.ids), *image.shape[:2]))
        prob[0] = torch.from_numpy(self.index == 0)
        for c, o in enumerate(self.ids):
            prob[c + 1] = torch.from_numpy(self.index == o)
        return prob


class ConstTracker(EchoTracker):
    """Like :class:`EchoTracker` for ids, but every object has probability ``value`` everywhere
    (the background the rest)."""

    values: list[float] = []

    def __init__(self, network: object = None) -> None:
        super().__init__(network)
        self.value = ConstTracker.values[len(EchoTracker.made) - 1]

    def step(self, image, mask=None, objects=None, end=False) -> torch.Tensor:
        super().step(image, mask, objects, end)
        n = len(self.ids)
        prob = torch.full((1 + n, *image.shape[:2]), self.value / max(n, 1))
        prob[0] = 1 - self.value if n else 1.0
        return prob


@pytest.fixture(autouse=True)
def _reset() -> None:
    EchoTracker.made = []


def run(source, keyframes, *, tracker=EchoTracker, **kw):
    with contextlib.closing(propagate(source, keyframes, tracker, **kw)) as it:
        return list(it)


def spills(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{SPILL_PREFIX}*"))


# --------------------------------------------------------------------------------------------
# Plan and fusion


def test_fusion_weights_follow_temporal_distance() -> None:
    keys = [10, 20, 24]
    assert fusion_weights(5, keys) == (0.0, 1.0)  # before the first keyframe: backward only
    assert fusion_weights(30, keys) == (1.0, 0.0)  # after the last: forward only
    assert fusion_weights(10, keys) == (0.5, 0.5) == fusion_weights(20, keys)
    wf, wb = fusion_weights(12, keys)  # 2 frames after 10, 8 before 20
    assert (wf, wb) == pytest.approx((0.8, 0.2))
    assert fusion_weights(15, keys) == pytest.approx((0.5, 0.5))
    assert fusion_weights(23, keys) == pytest.approx((0.25, 0.75))
    # Monotonic between keyframes; a higher power trusts the nearer keyframe more.
    f = [fusion_weights(t, keys)[0] for t in range(11, 20)]
    assert all(a > b for a, b in zip(f, f[1:], strict=False))
    assert fusion_weights(12, keys, power=2.0)[0] == pytest.approx(64 / 68)


def test_plan_passes_per_direction() -> None:
    both = plan_passes("both", [7, 3, 7, 12], start=1)
    assert both.keyframes == (3, 7, 12) and (both.forward_from, both.backward_from) == (3, 12)
    assert both.weights(2) == (0.0, 1.0) and both.weights(13) == (1.0, 0.0)
    fwd = plan_passes("forward", [3, 12], start=0)
    assert (fwd.forward_from, fwd.backward_from) == (3, None)
    assert fwd.weights(2) == (0.0, 0.0) and fwd.weights(8) == (1.0, 0.0)
    bwd = plan_passes("backward", [3, 12], start=0)
    assert (bwd.forward_from, bwd.backward_from) == (None, 12)
    assert bwd.weights(8) == (0.0, 1.0) and bwd.weights(13) == (0.0, 0.0)
    with pytest.raises(ValueError):
        plan_passes("sideways", [1])
    with pytest.raises(ValueError):
        plan_passes("both", [2], start=5)


def test_fuse_matches_objects_by_id() -> None:
    fwd = np.zeros((3, 1, 2), np.float32)  # ids [1, 2]
    fwd[:, 0, 0] = (0.1, 0.6, 0.3)
    fwd[:, 0, 1] = (0.9, 0.05, 0.05)
    bwd = np.zeros((4, 1, 2), np.float32)  # ids [3, 2, 1]: another channel order, a new object
    bwd[:, 0, 0] = (0.1, 0.0, 0.1, 0.8)
    bwd[:, 0, 1] = (0.1, 0.9, 0.0, 0.0)
    prob, ids = fuse([(0.75, fwd, [1, 2]), (0.25, bwd, [3, 2, 1])], order=[1, 2, 3])
    assert ids == [1, 2, 3]
    raw0 = np.array([0.1, 0.75 * 0.6 + 0.25 * 0.8, 0.75 * 0.3 + 0.25 * 0.1, 0.0])
    np.testing.assert_allclose(prob[:, 0, 0], raw0 / raw0.sum(), rtol=1e-6)
    # Object 3 is known to the backward pass only: taken from it alone, and it wins there.
    raw1 = np.array([0.75 * 0.9 + 0.25 * 0.1, 0.05 * 0.75, 0.05 * 0.75, 0.9])
    np.testing.assert_allclose(prob[:, 0, 1], raw1 / raw1.sum(), rtol=1e-6)
    np.testing.assert_array_equal(index_from_probabilities(prob, ids), [[1, 3]])
    # One part: its channels reordered to ``order``, values unchanged.
    one, one_ids = fuse([(1.0, bwd, [3, 2, 1])], order=[1, 2, 3])
    assert one_ids == [1, 2, 3]
    np.testing.assert_array_equal(one, bwd[[0, 3, 2, 1]])
    with pytest.raises(ValueError):
        fuse([(0.0, fwd, [1, 2])])


def test_object_order_is_order_of_first_mask() -> None:
    keys = masks_of(f9=[1, 4], f2=[3], f5=[1, 2])
    assert object_order(keys) == [3, 1, 2, 4]


# --------------------------------------------------------------------------------------------
# propagate


def test_both_passes_cover_every_frame_in_order(tmp_path: Path) -> None:
    src = Source(12)
    out = run(src, masks_of(f4=[1], f8=[1, 2]), direction="both", spill_dir=tmp_path)
    assert [p.frame.index for p in out] == list(range(12))
    assert src.iterations == 1 and src.decoded == 12  # decoded once
    bwd, fwd = EchoTracker.made
    # The backward pass runs from the last keyframe to the first frame, masks where given.
    assert [s[0] for s in bwd.seen] == list(range(8, -1, -1))
    assert [(t, ids) for t, ids, _ in bwd.seen if ids] == [(8, (1, 2)), (4, (1,))]
    assert bwd.seen[-1][2] is True  # ``end`` on its last frame
    # The forward pass from the first keyframe to the end.
    assert [s[0] for s in fwd.seen] == list(range(4, 12))
    assert [(t, ids) for t, ids, _ in fwd.seen if ids] == [(4, (1,)), (8, (1, 2))]
    assert fwd.seen[-1][2] is True and not any(e for _, _, e in fwd.seen[:-1])
    # Every frame has both objects: object 2, first given at 8, is tracked back to frame 0.
    for p in out:
        assert p.object_ids == [1, 2]
        np.testing.assert_array_equal(p.index, box_mask(1) + box_mask(2))
    assert out[4].given is not None and out[4].given.ids == [1]
    assert out[5].given is None
    assert spills(tmp_path) == []


def test_fused_values_weighted_by_distance(tmp_path: Path) -> None:
    ConstTracker.values = [0.9, 0.3]  # the backward tracker is made first
    out = run(Source(10), masks_of(f2=[1], f6=[1]), tracker=ConstTracker, spill_dir=tmp_path)
    obj = [float(p.prob[1, 0, 0]) for p in out]
    # The backward results are stored as uint8 and renormalised: 230 / 256 and 26 / 256.
    q, qb = 230 / 256, 26 / 256
    assert obj[:2] == pytest.approx([q, q], abs=1e-6)  # before the first keyframe: backward
    assert obj[7:] == pytest.approx([0.3] * 3, abs=1e-6)  # after the last: forward
    for t in (3, 4, 5):
        wf, wb = (6 - t) / 4, (t - 2) / 4
        fg, bg = wf * 0.3 + wb * q, wf * 0.7 + wb * qb
        assert obj[t] == pytest.approx(fg / (fg + bg), abs=1e-6)
    # Keyframes exact for the given object, whatever the trackers said.
    assert (out[2].index == box_mask(1)).all() and (out[6].index == box_mask(1)).all()


def test_backward_and_forward_alone(tmp_path: Path) -> None:
    out = run(Source(9), masks_of(f3=[1], f5=[2]), direction="backward", spill_dir=tmp_path)
    (bwd,) = EchoTracker.made
    assert [s[0] for s in bwd.seen] == [5, 4, 3, 2, 1, 0]
    assert [p.object_ids for p in out] == [[1, 2]] * 4 + [[2]] * 2 + [[]] * 3
    assert not out[6].index.any() and out[6].prob.shape == (1, H, W)
    EchoTracker.made = []
    src = Source(9)
    out = run(src, masks_of(f3=[1], f5=[2]), direction="forward", spill_dir=tmp_path)
    (fwd,) = EchoTracker.made
    assert [s[0] for s in fwd.seen] == list(range(3, 9))
    assert [p.object_ids for p in out] == [[]] * 3 + [[1]] * 2 + [[1, 2]] * 4
    assert spills(tmp_path) == [] and not list(tmp_path.iterdir())  # forward: no spill at all


def test_range_and_folder_source(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(10):
        Image.fromarray(np.full((H, W, 3), t, np.uint8)).save(folder / f"img{t}.png")
    src = FolderSource(folder)
    spill = tmp_path / "spill"
    out = run(src, masks_of(f1=[1], f6=[2], f9=[3]), start=2, end=8, spill_dir=spill)
    assert [p.frame.name for p in out] == [f"img{t}" for t in range(2, 8)]
    bwd, fwd = EchoTracker.made
    assert [s[0] for s in bwd.seen] == [6, 5, 4, 3, 2]  # keyframes outside [2, 8) ignored
    assert [s[0] for s in fwd.seen] == [6, 7]
    assert all(p.object_ids == [2] for p in out)
    assert not any(spill.iterdir())
    with pytest.raises(InputError, match="no keyframe in the frame range"):
        run(src, masks_of(f1=[1]), start=2)


def test_keyframe_after_the_end_of_a_video(tmp_path: Path) -> None:
    out = run(Source(6), masks_of(f2=[1], f9=[2]), spill_dir=tmp_path)
    assert len(out) == 6 and all(p.object_ids == [1] for p in out)
    with pytest.raises(InputError, match="no keyframe within"):
        run(Source(6), masks_of(f9=[2]), spill_dir=tmp_path)
    assert spills(tmp_path) == []


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_spill_removed_on_error_and_interrupt(tmp_path: Path, exc: type[BaseException]) -> None:
    class Failing(EchoTracker):
        def step(self, image, mask=None, objects=None, end=False):
            if int(image[0, 0, 0]) == 2:
                assert len(list(spills(tmp_path)[0].iterdir())) > 0  # something was spilled
                raise exc()
            return super().step(image, mask, objects, end)

    with pytest.raises(exc):
        run(Source(10), masks_of(f6=[1]), tracker=Failing, spill_dir=tmp_path)
    assert spills(tmp_path) == []
    # A source that fails while being decoded.
    with pytest.raises(InputError, match="corrupt"):
        run(Source(10, fail_at=4), masks_of(f6=[1]), spill_dir=tmp_path)
    assert spills(tmp_path) == []


def test_spill_removed_when_the_consumer_stops(tmp_path: Path) -> None:
    it = propagate(Source(10), masks_of(f6=[1]), EchoTracker, spill_dir=tmp_path)
    next(it)
    assert len(spills(tmp_path)) == 1
    it.close()
    assert spills(tmp_path) == []


def test_spill_removed_on_sigterm(tmp_path: Path) -> None:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("a SIGTERM handler is installed")
    with pytest.raises(SystemExit) as info, Spill(tmp_path) as spill:
        spill.put_image(0, np.zeros((4, 4, 3), np.uint8))
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next statement
        pytest.fail("SIGTERM did not interrupt")
    assert info.value.code == 128 + signal.SIGTERM
    assert spills(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_spill_round_trips(tmp_path: Path) -> None:
    with Spill(tmp_path) as spill:
        img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
        spill.put_image(3, img)
        np.testing.assert_array_equal(spill.get_image(3), img)  # lossless
        prob = np.random.default_rng(1).random((3, 5, 7)).astype(np.float32)
        prob /= prob.sum(axis=0)
        spill.put_probabilities(3, prob, [4, 2])
        back, ids = spill.get_probabilities(3, release=True)
        assert ids == [4, 2] and np.abs(back - prob).max() <= 2 / 255
        np.testing.assert_allclose(back.sum(axis=0), 1, atol=1e-6)
        assert not any(p.name.startswith("prob") for p in spill.files())
    assert spills(tmp_path) == []


def test_memory_does_not_grow_with_length(tmp_path: Path) -> None:
    """The frames stay on disk: Python-side peak allocations are the same for 40 and for 400
    frames (a video held in memory would grow tenfold)."""
    peaks = []
    for n in (40, 400):
        tracemalloc.start()
        for p in propagate(Source(n, 48, 64), [Keyframe.from_mask(n - 1, box_mask(1, 48, 64))],
                           EchoTracker, spill_dir=tmp_path):
            del p
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        EchoTracker.made = []
    assert peaks[1] < 1.5 * peaks[0], peaks
    assert spills(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Feature reuse


class CountingNet:
    """A stand-in backbone: ``features`` counts its calls."""

    pad_divisor = 16

    def __init__(self) -> None:
        self.calls = 0

    def features(self, images: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        self.calls += 1
        return images.float() * scale


def test_features_computed_once_where_both_passes_go(tmp_path: Path) -> None:
    net = CountingNet()
    run(Source(12), masks_of(f3=[1], f8=[1]), network=net, spill_dir=tmp_path)
    # Backward: frames 8..0 (9); forward: 3..11 (9), of which 3..8 reuse saved features.
    assert net.calls == 9 + 3
    net = CountingNet()
    run(Source(12), masks_of(f3=[1], f8=[1]), network=net, reuse_features=False,
        spill_dir=tmp_path)
    assert net.calls == 18
    net = CountingNet()
    run(Source(12), masks_of(f3=[1], f8=[1]), network=net, feature_budget_mb=2 * H * W * 3 * 4
        / 2**20, spill_dir=tmp_path)
    assert net.calls == 9 + 3 + 4  # the budget held 2 frames' features
    assert spills(tmp_path) == []


def test_feature_cache_passes_other_attributes_through(tmp_path: Path) -> None:
    with Spill(tmp_path) as spill:
        net = CountingNet()
        wrapped = FeatureCache(spill, 2**20).wrap(net)
        assert wrapped.pad_divisor == 16 and wrapped.calls == 0
        wrapped.features(torch.zeros(1))  # no frame set: computed, not saved
        assert net.calls == 1 and not spill.files()
        cache = FeatureCache(spill, 2**20)
        wrapped = cache.wrap(net)
        with cache.at(5, record=True):
            wrapped.features(torch.ones(1), scale=3.0)
        with cache.at(5):  # saved with other arguments: computed again
            assert float(wrapped.features(torch.ones(1))) == 2.0
        with cache.at(6, record=True):
            wrapped.features(torch.ones(1), scale=3.0)
        with cache.at(6):
            assert float(wrapped.features(torch.ones(1), scale=3.0)) == 3.0
        assert (net.calls, cache.saved, cache.reused) == (4, 2, 1) and not spill.files()


def test_lite_results_identical_with_feature_reuse(tmp_path: Path) -> None:
    from s3cli.lite import LiteTracker, load_lite_model

    model = load_lite_model("cpu")
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)

    class Moving(FrameSource):
        path = Path("moving")
        fps = None
        num_frames = 7

        def __iter__(self):
            for t in range(7):
                img = background.copy()
                img[20:40, 10 + 5 * t : 30 + 5 * t] = (250, 30, 30)
                yield Frame(t, f"{t:05d}", img)

    mask = np.zeros((64, 96), np.int64)
    mask[20:40, 20:40] = 1
    end_mask = np.zeros((64, 96), np.int64)
    end_mask[20:40, 40:60] = 1
    keys = [Keyframe.from_mask(2, mask), Keyframe.from_mask(6, end_mask)]

    def make(net):
        return LiteTracker(net, max_internal_size=64)

    a = run(Moving(), keys, tracker=make, network=model, spill_dir=tmp_path)
    b = run(Moving(), keys, tracker=make, network=model, reuse_features=False, spill_dir=tmp_path)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.prob, y.prob)
        np.testing.assert_array_equal(x.index, y.index)
    assert a[0].index.any()  # the object was tracked back to frame 0
    assert spills(tmp_path) == []


def test_cutie_results_identical_with_feature_reuse(tmp_path: Path) -> None:
    from s3cli.inference.engine import Tracker
    from s3cli.model.registry import build_network

    torch.manual_seed(0)
    net = build_network("cutie-small", synthetic=True)
    keys = [Keyframe.from_mask(1, box_mask(1, 32, 48)), Keyframe.from_mask(4, box_mask(2, 32, 48))]

    def make(n):
        return Tracker(n, mem_every=2, max_internal_size=-1)

    calls = []
    encode = net.encode_image
    net.encode_image = lambda image: calls.append(1) or encode(image)  # counts backbone runs
    a = run(Source(6, 32, 48), keys, tracker=make, network=net, spill_dir=tmp_path)
    reused = len(calls)
    b = run(Source(6, 32, 48), keys, tracker=make, network=net, reuse_features=False,
            spill_dir=tmp_path)
    # Backward 4..0 and forward 1..5 both encode frames 1..4; with reuse only once.
    assert (reused, len(calls) - reused) == (6, 10)
    for x, y in zip(a, b, strict=True):
        assert x.object_ids == y.object_ids == [1, 2]
        np.testing.assert_array_equal(x.prob, y.prob)
    assert spills(tmp_path) == []


def test_index_mask_given_ids_from_mask() -> None:
    k = Keyframe.from_mask(3, IndexMask(box_mask(2), [2]))
    assert k.ids == (2,) and k.load((H, W)).ids == [2]
    with pytest.raises(ValueError):
        k.load((H + 1, W))
