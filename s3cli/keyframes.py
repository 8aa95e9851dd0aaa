"""Keyframes: segment backward from a mask, and between several annotated frames.

Given masks at some frames (*keyframes*), :func:`propagate` segments every frame of a range in
one of three directions, over the same trackers as the forward-only loop (``Tracker`` or
``LiteTracker``; anything with ``step(image, mask, objects, end)`` and ``object_ids``):

* ``forward``: from the earliest keyframe to the end; frames before it are background.
* ``backward``: from the latest keyframe back to the first frame; frames after it are background.
* ``both``: a forward pass from the earliest keyframe to the end and a backward pass from the
  latest keyframe to the first frame, each given every keyframe's mask as it reaches it. Before
  the earliest keyframe only the backward pass has a result, after the latest only the forward
  pass. Between two keyframes ``a < t < b`` the two are fused per frame with weights by temporal
  distance (:func:`fusion_weights`: forward ``(b - t) / (b - a)``, backward ``(t - a) / (b - a)``,
  i.e. inversely proportional to the distance from the keyframe each pass last saw). The
  keyframes themselves are exact for the objects their masks give.

Objects are matched between the passes by id (each tracker orders its channels by the order
it met them). An object that one pass has not met at a frame (it is first given at a later
keyframe for the forward pass, an earlier one for the backward pass) is taken from the other
pass alone: an object first seen at a keyframe is tracked both ways from it.

Memory stays bounded on any length. The video is decoded once, in order; the frames the
backward pass needs are spilled as lossless PNGs into a private temporary folder
(:class:`Spill`; a folder of frames is read in place instead), and the backward pass stores
its per-frame probabilities there (uint8, zlib) so that results come out in frame order. The
folder is removed when the run ends, fails, or is interrupted (Ctrl-C, SIGTERM). The backbone
features the backward pass computes on frames the forward pass also visits are kept in the
spill too (up to a disk budget) and reused instead of recomputed (:class:`FeatureCache`).

Order of work (``both``): decode and spill frames ``[start, last keyframe]``; run the backward
pass from the last keyframe down to ``start``; then, in frame order, run the forward pass from
the earliest keyframe, fuse, and yield each frame; frames after the last keyframe are decoded
and tracked as they come, never spilled.

``s3 segment --direction`` and :func:`s3cli.api.segment_video` use this; directly::

    model = load_lite_model("cpu")
    keys = [Keyframe.from_mask(120, mask_120), Keyframe.from_mask(300, mask_300)]
    with contextlib.closing(propagate(open_source("v.mp4"), keys, LiteTracker, network=model))
            as frames:
        for out in frames:            # every frame, in order
            use(out.frame.index, out.index, out.prob, out.object_ids)
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import shutil
import signal
import tempfile
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from s3cli.errors import InputError, OutputError
from s3cli.io.masks import IndexMask
from s3cli.io.video import FolderSource, Frame, FrameSource

__all__ = [
    "DIRECTIONS",
    "Direction",
    "FeatureCache",
    "Keyframe",
    "Plan",
    "Propagated",
    "Spill",
    "fuse",
    "fusion_weights",
    "index_from_probabilities",
    "keep_given",
    "object_order",
    "plan_passes",
    "propagate",
]

log = logging.getLogger(__name__)

Direction = Literal["forward", "backward", "both"]
DIRECTIONS: tuple[str, ...] = ("forward", "backward", "both")

SPILL_PREFIX = "s3-spill-"
"""Name prefix of the temporary spill folders."""


# --------------------------------------------------------------------------------------------
# Keyframes and the plan of passes


@dataclass(frozen=True)
class Keyframe:
    """A frame with a given mask. ``ids`` are the objects the mask gives (non-empty, as read);
    ``load(size)`` returns the mask fitted to a frame of ``size`` (height, width), read when
    needed so that many keyframes do not sit in memory."""

    index: int
    ids: tuple[int, ...]
    load: Callable[[tuple[int, int]], IndexMask]

    @staticmethod
    def from_mask(index: int, mask: IndexMask | np.ndarray) -> Keyframe:
        """A keyframe from a mask in memory (an :class:`IndexMask` or an (H, W) id array)."""
        if not isinstance(mask, IndexMask):
            array = np.asarray(mask).astype(np.int64)
            mask = IndexMask(array, [int(v) for v in np.unique(array) if v])

        def load(size: tuple[int, int]) -> IndexMask:
            if mask.size != tuple(size):
                raise ValueError(f"keyframe {index}: mask is {mask.size}, frames are {size}")
            return mask

        return Keyframe(index, tuple(mask.ids), load)


@dataclass(frozen=True)
class Plan:
    """Which frames each pass covers. ``backward_from`` (the latest keyframe) down to ``start``;
    ``forward_from`` (the earliest keyframe) to the end; ``None`` when there is no such pass."""

    direction: Direction
    start: int
    keyframes: tuple[int, ...]
    forward_from: int | None
    backward_from: int | None

    def weights(self, t: int, power: float = 1.0) -> tuple[float, float]:
        """(forward, backward) weights of frame ``t`` (0 where a pass has no result)."""
        fwd = self.forward_from is not None and t >= self.forward_from
        bwd = self.backward_from is not None and self.start <= t <= self.backward_from
        if fwd and bwd:
            return fusion_weights(t, self.keyframes, power)
        return (1.0 if fwd else 0.0), (1.0 if bwd else 0.0)


def plan_passes(direction: str, keyframes: Sequence[int], start: int = 0) -> Plan:
    """The passes of ``direction`` for keyframes at these frame indices (all ``>= start``)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    keys = tuple(sorted(set(int(k) for k in keyframes)))
    if not keys:
        raise ValueError("at least one keyframe is needed")
    if keys[0] < start:
        raise ValueError(f"keyframe {keys[0]} is before the first frame {start}")
    return Plan(
        direction=direction,  # type: ignore[arg-type]
        start=start,
        keyframes=keys,
        forward_from=keys[0] if direction in ("forward", "both") else None,
        backward_from=keys[-1] if direction in ("backward", "both") else None,
    )


def fusion_weights(t: int, keyframes: Sequence[int], power: float = 1.0) -> tuple[float, float]:
    """(forward, backward) weights of frame ``t`` when both passes have a result there.

    Between keyframes ``a < t < b`` the forward pass last saw a mask ``t - a`` frames ago and
    the backward pass ``b - t`` frames ago; each weighs inversely to that distance (to the
    power ``power``), normalised: forward ``(b - t)^p / ((b - t)^p + (t - a)^p)``. Before the
    first keyframe only the backward pass counts, after the last only the forward pass, and on
    a keyframe both equally (the given objects are exact there anyway).
    """
    keys = sorted(keyframes)
    if t < keys[0]:
        return 0.0, 1.0
    if t > keys[-1]:
        return 1.0, 0.0
    i = bisect.bisect_right(keys, t) - 1
    if keys[i] == t:
        return 0.5, 0.5
    a, b = keys[i], keys[i + 1]
    to_fwd, to_bwd = float(t - a) ** power, float(b - t) ** power
    wf = to_bwd / (to_fwd + to_bwd)
    return wf, 1.0 - wf


def object_order(keyframes: Sequence[Keyframe]) -> list[int]:
    """Object ids in the order they are first given in time (then in mask order)."""
    order: list[int] = []
    for kf in sorted(keyframes, key=lambda k: k.index):
        order.extend(o for o in kf.ids if o not in order)
    return order


# --------------------------------------------------------------------------------------------
# Fusion


def fuse(
    parts: Sequence[tuple[float, np.ndarray, Sequence[int]]], order: Sequence[int] = ()
) -> tuple[np.ndarray, list[int]]:
    """Fuse per-pass probabilities into one (1 + N, H, W) float32 map and its object ids.

    ``parts``: (weight, probabilities (1 + n, H, W), object ids in channel order) per pass.
    Each object is the weighted mean over the passes that track it (a pass that has not met
    the object says nothing about it); the background is the weighted mean over all passes;
    the result is normalised per pixel. Objects come in ``order`` (ids missing from it follow
    in the order the parts list them); only objects some pass tracks are in the result.
    """
    parts = [(float(w), p, list(ids)) for w, p, ids in parts if w > 0]
    if not parts:
        raise ValueError("nothing to fuse")
    for _, p, ids in parts:
        if p.shape[0] != len(ids) + 1:
            raise ValueError(f"{p.shape[0]} channels for {len(ids)} objects")
    known = {o for _, _, ids in parts for o in ids}
    ids_out = [o for o in order if o in known]
    for _, _, ids in parts:
        ids_out.extend(o for o in ids if o not in ids_out)
    if len(parts) == 1:
        _, p, ids = parts[0]
        channels = [0, *(ids.index(o) + 1 for o in ids_out)]
        out = p[channels] if channels != list(range(len(channels))) else p
        return np.asarray(out, dtype=np.float32), ids_out
    total = sum(w for w, _, _ in parts)
    out = np.empty((1 + len(ids_out), *parts[0][1].shape[1:]), dtype=np.float32)
    out[0] = sum(w * p[0] for w, p, _ in parts) / total
    for j, obj in enumerate(ids_out, start=1):
        having = [(w, p[ids.index(obj) + 1]) for w, p, ids in parts if obj in ids]
        out[j] = sum(w * c for w, c in having) / sum(w for w, _ in having)
    out /= np.maximum(out.sum(axis=0, keepdims=True), 1e-12)
    return out, ids_out


def index_from_probabilities(prob: np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
    """(1 + N, H, W) probabilities -> (H, W) int64 ids of the most probable channel."""
    lut = np.asarray([0, *object_ids], dtype=np.int64)
    return lut[np.argmax(prob, axis=0)]


def keep_given(index: np.ndarray, mask: IndexMask) -> np.ndarray:
    """On an annotated frame the given objects are exactly their given masks (the model works
    at a lower internal resolution and would blur them)."""
    index = index.copy()
    index[np.isin(index, mask.ids)] = 0
    given = mask.array > 0
    index[given] = mask.array[given]
    return index


# --------------------------------------------------------------------------------------------
# The spill: a private temporary folder, removed on exit, error, Ctrl-C and SIGTERM


class Spill:
    """A temporary folder holding frames, probabilities and features of one run.

    Use as a context manager: the folder is removed on leaving it, whatever the reason, and
    while it is open a SIGTERM (in the main thread, when no handler was installed) unwinds the
    run like Ctrl-C does so that it is removed then too. ``parent``: where to create it
    (default: the system's temporary folder, ``$TMPDIR``).
    """

    def __init__(self, parent: Path | None = None) -> None:
        if parent is not None:
            try:
                Path(parent).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(
                    f"{parent}: cannot create the spill folder ({exc.strerror or exc}) "
                    "(pass another --spill-dir)"
                ) from exc
        try:
            self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=parent))
        except OSError as exc:
            where = parent or tempfile.gettempdir()
            raise OutputError(
                f"{where}: cannot create a temporary folder ({exc.strerror or exc}) "
                "(pass another --spill-dir)"
            ) from exc
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        self._old_term: Any = None
        self.bytes_written = 0

    # ----------------------------------------------------------------- lifetime
    def __enter__(self) -> Spill:
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                    self._old_term = signal.signal(signal.SIGTERM, _terminate)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the folder (idempotent) and restore the SIGTERM handler."""
        if self._old_term is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _file(self, kind: str, t: int, suffix: str) -> Path:
        return self.path / f"{kind}{t:08d}{suffix}"

    def _failed(self, exc: OSError) -> OutputError:
        return OutputError(
            f"{self.path}: cannot write the temporary spill ({exc.strerror or exc}) "
            "(free disk space or pass --spill-dir)"
        )

    # ----------------------------------------------------------------- frames
    def put_image(self, t: int, image: np.ndarray) -> None:
        """Store an (H, W, 3) uint8 RGB frame losslessly (PNG, fast compression)."""
        from PIL import Image

        path = self._file("frame", t, ".png")
        try:
            Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(
                path, format="PNG", compress_level=1
            )
        except OSError as exc:
            raise self._failed(exc) from exc
        self.bytes_written += path.stat().st_size

    def get_image(self, t: int, *, release: bool = False) -> np.ndarray:
        from PIL import Image

        path = self._file("frame", t, ".png")
        try:
            with Image.open(path) as im:
                image = np.array(im.convert("RGB"))  # writable, as decoded frames are
        except OSError as exc:
            raise OutputError(
                f"{path}: spilled frame {t} is missing or unreadable (was the folder removed?)"
            ) from exc
        if release:
            path.unlink(missing_ok=True)
        return image

    # ----------------------------------------------------------------- probabilities
    def put_probabilities(self, t: int, prob: np.ndarray, object_ids: Sequence[int]) -> None:
        """Store (1 + N, H, W) probabilities as uint8 (steps of 1/255), zlib-compressed; they
        come back renormalised to sum to 1 per pixel."""
        q = np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
        head = json.dumps({"shape": list(q.shape), "ids": [int(o) for o in object_ids]})
        body = zlib.compress(q.tobytes(), 1)
        path = self._file("prob", t, ".bin")
        try:
            path.write_bytes(head.encode() + b"\n" + body)
        except OSError as exc:
            raise self._failed(exc) from exc
        self.bytes_written += len(body)

    def get_probabilities(self, t: int, *, release: bool = False) -> tuple[np.ndarray, list[int]]:
        path = self._file("prob", t, ".bin")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise OutputError(f"{path}: spilled probabilities of frame {t} are missing") from exc
        head, _, body = data.partition(b"\n")
        meta = json.loads(head)
        q = np.frombuffer(zlib.decompress(body), dtype=np.uint8).reshape(meta["shape"])
        if release:
            path.unlink(missing_ok=True)
        prob = q.astype(np.float32)
        prob /= np.maximum(prob.sum(axis=0, keepdims=True), 1.0)  # sums to 1 again
        return prob, [int(o) for o in meta["ids"]]

    # ----------------------------------------------------------------- features
    def feature_path(self, t: int) -> Path:
        return self._file("feat", t, ".pt")

    def files(self) -> list[Path]:
        return sorted(self.path.iterdir()) if self.path.is_dir() else []


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------------
# Feature reuse between the passes


class FeatureCache:
    """Backbone features of the frames both passes visit, computed once.

    :meth:`wrap` returns a stand-in for the network that forwards everything to it except the
    image encoder (``encode_image`` of Cutie/S3, ``features`` of the lite model): inside
    ``at(t, record=True)`` its result for frame ``t`` is saved in the spill (while the budget
    lasts), inside ``at(t)`` a saved result is loaded (and its file removed) instead of being
    computed. Saved tensors keep their dtype, device and layout, so results are identical.
    """

    def __init__(self, spill: Spill, budget_bytes: int) -> None:
        self.spill = spill
        free = shutil.disk_usage(spill.path).free
        self.budget = max(0, min(int(budget_bytes), free // 2))
        self.used = 0
        self.saved = 0
        self.reused = 0
        self._current: int | None = None
        self._record = False
        self._full = False

    def wrap(self, network: Any) -> Any:
        return _CachingNetwork(network, self)

    @contextlib.contextmanager
    def at(self, t: int, *, record: bool = False) -> Iterator[None]:
        self._current, self._record = t, record
        try:
            yield
        finally:
            self._current, self._record = None, False

    def call(self, fn: Callable[..., Any], images: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(images, *args, **kwargs)``, from the cache when the frame's result with the
        same other arguments was saved."""
        import torch

        t = self._current
        if t is None:
            return fn(images, *args, **kwargs)
        key = repr((args, sorted(kwargs.items())))
        path = self.spill.feature_path(t)
        if not self._record and path.is_file():
            saved_key, out = torch.load(path, map_location=images.device, weights_only=False)
            path.unlink(missing_ok=True)
            if saved_key == key:
                self.reused += 1
                return out
        out = fn(images, *args, **kwargs)
        if self._record and not self._full:
            size = _tensor_bytes(out)
            if self.used + size > self.budget:
                self._full = True
                log.info("feature cache full after %d frames: recomputing the rest", self.saved)
            else:
                try:
                    torch.save((key, out), path)
                except OSError as exc:
                    raise self.spill._failed(exc) from exc
                self.used += size
                self.saved += 1
        return out


def _tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(o) for o in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


class _CachingNetwork:
    """Forwards attribute access to the network; routes its image encoder through a cache."""

    def __init__(self, network: Any, cache: FeatureCache) -> None:
        self._network = network
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)

    def encode_image(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        return self._cache.call(self._network.encode_image, image, *args, **kwargs)

    def features(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        return self._cache.call(self._network.features, images, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Frame access: decoded once, random access where the backward pass needs it


class _Frames:
    """Frames ``[start, end)`` of a source. :meth:`fill` makes a prefix randomly accessible
    (a folder of frames in place, anything else decoded once into the spill);
    :meth:`in_order` then yields every frame in order with an is-last flag, the prefix from
    there and the rest as decoded."""

    def __init__(self, source: FrameSource, start: int, end: int | None, spill: Spill | None):
        self.source = source
        self.start = start
        self.spill = spill
        self.folder = source if isinstance(source, FolderSource) else None
        self._shape: tuple[int, ...] | None = None
        self.filled = start - 1  # last index randomly accessible
        self.stop: int | None = None  # one past the last frame, once known
        if self.folder is not None:
            n = len(self.folder.files)
            self.stop = max(start, min(n, end) if end is not None else n)
            self._stream: Iterator[Frame] | None = None
        else:
            self._stream = (
                f for f in source if f.index >= start and (end is None or f.index < end)
            )
        self._pending: Frame | None = None

    def _next(self) -> Frame | None:
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        assert self._stream is not None
        frame = next(self._stream, None)
        if frame is None:
            self.stop = self.filled + 1 if self.stop is None else self.stop
        return frame

    def _peek(self) -> Frame | None:
        if self._pending is None:
            self._pending = self._next()
        return self._pending

    def fill(self, upto: int) -> int:
        """Make frames ``start..upto`` randomly accessible; returns the last index available
        (less than ``upto`` when the source ends first)."""
        if self.folder is not None:
            assert self.stop is not None
            self.filled = max(self.filled, min(upto, self.stop - 1))
            return self.filled
        assert self.spill is not None
        while self.filled < upto:
            frame = self._next()
            if frame is None:
                break
            self.spill.put_image(frame.index, frame.image)
            self.filled = frame.index
        if self.filled == upto:
            self._peek()  # to know whether ``upto`` is the last frame
        return self.filled

    def _read_folder(self, t: int) -> Frame:
        import cv2

        assert self.folder is not None
        f = self.folder.files[t]
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"{f}: not a readable image (corrupt or unsupported file)")
        if self._shape is not None and bgr.shape != self._shape:
            raise InputError(
                f"{f}: frame is {bgr.shape[1]}x{bgr.shape[0]}, earlier frames are "
                f"{self._shape[1]}x{self._shape[0]} (all frames of a folder must have one size)"
            )
        self._shape = bgr.shape
        return Frame(t, f.stem, np.ascontiguousarray(bgr[:, :, ::-1]))

    def get(self, t: int, *, release: bool = False) -> Frame:
        """Frame ``t`` of the filled prefix (``release``: its spilled copy is not needed again)."""
        if not self.start <= t <= self.filled:
            raise IndexError(f"frame {t} is not in the filled range [{self.start}, {self.filled}]")
        if self.folder is not None:
            return self._read_folder(t)
        assert self.spill is not None
        return Frame(t, self.source.frame_name(t), self.spill.get_image(t, release=release))

    def in_order(self) -> Iterator[tuple[Frame, bool]]:
        """Every frame of the range in order with a flag for the last one."""
        if self.folder is not None:
            assert self.stop is not None
            for t in range(self.start, self.stop):
                yield self._read_folder(t), t == self.stop - 1
            return
        for t in range(self.start, self.filled + 1):
            last = t == self.filled and self._peek() is None
            yield self.get(t, release=True), last
        frame = self._next()
        while frame is not None:
            nxt = self._peek()
            yield frame, nxt is None
            frame = self._next()

    @property
    def total(self) -> int | None:
        if self.stop is not None:
            return self.stop - self.start
        n = self.source.num_frames
        return None if n is None else max(0, n - self.start)


# --------------------------------------------------------------------------------------------
# Propagation


@dataclass
class Propagated:
    """One output frame: the frame, probabilities (1 + N, H, W) float32 with channel 0 the
    background and then ``object_ids``, the index mask (H, W) int64 (given objects exact on a
    keyframe), and the keyframe's mask (``None`` elsewhere)."""

    frame: Frame
    prob: np.ndarray
    object_ids: list[int]
    index: np.ndarray
    given: IndexMask | None


def _to_numpy(prob: Any) -> np.ndarray:
    if isinstance(prob, np.ndarray):
        return prob.astype(np.float32, copy=False)
    return prob.float().cpu().numpy()


def propagate(
    source: FrameSource,
    keyframes: Sequence[Keyframe],
    make_tracker: Callable[[Any], Any],
    *,
    direction: str = "both",
    network: Any = None,
    start: int = 0,
    end: int | None = None,
    spill_dir: Path | None = None,
    step_context: AbstractContextManager | None = None,
    on_step: Callable[[int, int | None], None] | None = None,
    reuse_features: bool = True,
    feature_budget_mb: float = 2048.0,
    weight_power: float = 1.0,
) -> Iterator[Propagated]:
    """Segment frames ``[start, end)`` of ``source`` from masks at ``keyframes``; yield every
    frame in order as a :class:`Propagated`.

    ``make_tracker(network)`` builds a fresh tracker (one per pass) on ``network`` or on a
    stand-in for it that reuses backbone features between the passes (``reuse_features``,
    up to ``feature_budget_mb`` of disk). ``step_context`` (e.g. an autocast) is entered
    around every step. ``on_step(done, total)`` counts tracker steps over both passes.
    Keyframes outside the range are ignored; :class:`InputError` when none is left.

    A generator: close it (``contextlib.closing``) when stopping early, so that its temporary
    folder goes at once.
    """
    keys = sorted(
        (k for k in keyframes if k.index >= start and (end is None or k.index < end)),
        key=lambda k: k.index,
    )
    where = getattr(source, "path", "input")
    if not keys:
        raise InputError(f"{where}: no keyframe in the frame range (give a mask on a frame in it)")
    by_index = {k.index: k for k in keys}
    order = object_order(keys)
    plan = plan_passes(direction, list(by_index), start)
    step_ctx = step_context if step_context is not None else contextlib.nullcontext()

    with contextlib.ExitStack() as stack:
        spill = stack.enter_context(Spill(spill_dir)) if plan.backward_from is not None else None
        frames = _Frames(source, start, end, spill)
        cache: FeatureCache | None = None
        if spill is not None and plan.forward_from is not None and reuse_features:
            if network is not None:
                cache = FeatureCache(spill, int(feature_budget_mb * 2**20))
        net = cache.wrap(network) if cache is not None else network

        steps = 0
        total: int | None = None

        def count() -> None:
            nonlocal steps
            steps += 1
            if on_step is not None:
                on_step(steps, total)

        # 1. decode the frames the backward pass needs (once), then run it.
        if plan.backward_from is not None:
            assert spill is not None
            last = frames.fill(plan.backward_from)
            if last < plan.backward_from:  # the video ended before some keyframes
                keys = [k for k in keys if k.index <= last]
                if not keys:
                    raise InputError(
                        f"{where}: no keyframe within the video's {last - start + 1} frames "
                        "from the start (give a mask on an existing frame)"
                    )
                by_index = {k.index: k for k in keys}
                plan = plan_passes(direction, list(by_index), start)
                assert plan.backward_from is not None
            n_all = frames.total
            back_steps = plan.backward_from - start + 1
            fwd_steps = (
                (n_all + start - plan.forward_from)
                if plan.forward_from is not None and n_all is not None
                else 0
            )
            total = back_steps + fwd_steps if n_all is not None else None
            tracker = make_tracker(net)
            for t in range(plan.backward_from, start - 1, -1):
                frame = frames.get(t)
                mask = _load(by_index.get(t), frame)
                record = cache is not None and plan.forward_from is not None
                record = record and t >= plan.forward_from
                with (cache.at(t, record=record) if cache is not None else _nothing()), step_ctx:
                    prob = tracker.step(
                        frame.image,
                        mask.array if mask is not None else None,
                        mask.ids if mask is not None else None,
                        end=t == start,
                    )
                spill.put_probabilities(t, _to_numpy(prob), tracker.object_ids)
                count()
            del tracker, prob
        else:
            n_all = frames.total
            assert plan.forward_from is not None
            total = n_all + start - plan.forward_from if n_all is not None else None

        # 2. in frame order: the forward pass, fusion, output.
        forward = make_tracker(net) if plan.forward_from is not None else None
        for frame, is_last in frames.in_order():
            t = frame.index
            wf, wb = plan.weights(t, weight_power)
            mask = _load(by_index.get(t), frame)
            parts: list[tuple[float, np.ndarray, list[int]]] = []
            if forward is not None and plan.forward_from is not None and t >= plan.forward_from:
                with (cache.at(t) if cache is not None else _nothing()), step_ctx:
                    p = forward.step(
                        frame.image,
                        mask.array if mask is not None else None,
                        mask.ids if mask is not None else None,
                        end=is_last,
                    )
                parts.append((wf, _to_numpy(p), forward.object_ids))
                count()
            if spill is not None and wb > 0:
                q, q_ids = spill.get_probabilities(t, release=True)
                parts.append((wb, q, q_ids))
            if any(w > 0 for w, _, _ in parts):
                prob, ids = fuse(parts, order)
            else:
                prob = np.ones((1, *frame.image.shape[:2]), dtype=np.float32)
                ids = []
            index = index_from_probabilities(prob, ids)
            if mask is not None:
                index = keep_given(index, mask)
            yield Propagated(frame, prob, ids, index, mask)
        if cache is not None:
            log.info("features reused on %d of %d frames", cache.reused, cache.saved)


def _nothing() -> AbstractContextManager:
    return contextlib.nullcontext()


def _load(kf: Keyframe | None, frame: Frame) -> IndexMask | None:
    """The keyframe's mask fitted to the frame, or ``None`` (no keyframe, or no object left)."""
    if kf is None:
        return None
    mask = kf.load(frame.image.shape[:2])
    return mask if mask.ids else None
