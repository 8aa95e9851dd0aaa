"""``segment_video``: frames in, masks out. The glue between io, the model and the engine.

No typer and no rich here: the CLI calls this with a :class:`SegmentOptions` and a progress
callback, and prints the returned :class:`SegmentSummary`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3cli.errors import InputError
from s3cli.io.masks import IndexMask, read_mask
from s3cli.io.outputs import OutputOptions, ResultWriter
from s3cli.io.video import FolderSource, Frame, FrameSource, open_source
from s3cli.keyframes import DIRECTIONS, Keyframe, keep_given, propagate

__all__ = [
    "SegmentOptions",
    "SegmentSummary",
    "segment_video",
    "load_tracking_model",
    "make_tracker",
    "peak_memory_mb",
]

log = logging.getLogger(__name__)

@dataclass
class SegmentOptions:
    """One video's job: input, first masks, model, inference settings and outputs."""

    source: Path
    mask: Path | None = None
    mask_frame: int = 0
    mask_dir: Path | None = None
    resize_mask: bool = False
    model: str = "auto"
    weights: Path | None = None
    size: str = "480"
    mem_every: int = 5
    top_k: int = 30
    long_term: bool = True
    flip: bool = False
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    """``torch.compile`` the network's stages (S3 and Cutie models; the first frames compile)."""
    start: int = 0
    end: int | None = None
    outputs: OutputOptions = field(default_factory=OutputOptions)
    direction: str = "forward"
    """``forward`` (from the earliest mask on), ``backward`` (from the latest mask back),
    ``both`` (both passes, fused between masks: every frame gets a mask), or ``auto``: ``both``
    when the earliest mask is not on the first frame of the range, else ``forward`` (the CLI's
    default). See :mod:`s3cli.keyframes`."""
    spill_dir: Path | None = None
    """Where the temporary spill of a backward pass goes (default: the system's temp folder)."""


@dataclass
class SegmentSummary:
    source: str
    model: str
    frames: int
    seconds: float
    fps: float
    peak_memory_mb: float
    object_ids: list[int]
    outputs: dict[str, str]
    direction: str = "forward"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def parse_size(size: str | int) -> int:
    """``480``/``600``/``720`` (or any shorter side >= 64) -> pixels; ``native`` -> -1."""
    text = str(size).strip().lower()
    if text == "native":
        return -1
    if text.isdigit() and int(text) >= 64:
        return int(text)
    raise InputError(f"--size {size}: choose 480, 600, 720, native or a shorter side >= 64")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def load_tracking_model(model: str, weights: Path | None, device: str) -> tuple[Any, str]:
    """(network, model name). ``auto`` takes a checkpoint from ``weights/``/``$S3_WEIGHTS`` if
    one is there, else the built-in ``lite`` model."""
    from s3cli.model.loading import find_checkpoint, load_model

    if weights is not None:
        net = load_model(weights, device=device)
        if model not in ("auto", net.cfg.name):
            raise InputError(f"{weights}: holds a {net.cfg.name} model, not {model}")
        return net, net.cfg.name
    if model == "auto":
        found = find_checkpoint()
        if found is None:
            model = "lite"
            log.warning("no checkpoint in weights/ or $S3_WEIGHTS: using the built-in lite model")
        else:
            net = load_model(found, device=device)
            return net, net.cfg.name
    if model == "lite":
        from s3cli.lite import load_lite_model

        return load_lite_model(device=device), "lite"
    net = load_model(model, device=device)
    return net, net.cfg.name


def make_tracker(network: Any, model_name: str, options: SegmentOptions) -> Any:
    size = parse_size(options.size)
    if model_name == "lite":
        from s3cli.lite import LiteTracker

        if options.compile:
            log.warning("--compile: the lite model runs without compilation")
        return LiteTracker(network, max_internal_size=size, mem_every=options.mem_every)
    from s3cli.inference.engine import Tracker

    if options.compile:
        network.compile_stages()
    return Tracker(
        network,
        mem_every=options.mem_every,
        top_k=options.top_k,
        use_long_term=options.long_term,
        max_internal_size=size,
        flip_aug=options.flip,
    )


def _mask_for_dir(mask_dir: Path, frame: Frame) -> Path | None:
    return _mask_for_name(mask_dir, frame.name, frame.index)


def _mask_for_name(
    mask_dir: Path, name: str, index: int, listing: set[str] | None = None
) -> Path | None:
    """The mask of frame ``index`` named ``name`` in ``mask_dir`` (``listing``: the folder's
    file names, to look up without touching the disk)."""
    for cand in (name, f"{index:05d}", str(index)):
        for suffix in (".png", ".json"):
            p = mask_dir / f"{cand}{suffix}"
            if (f"{cand}{suffix}" in listing) if listing is not None else p.is_file():
                return p
    return None


def _fit_mask(mask: IndexMask, path: Path, size: tuple[int, int], resize: bool) -> IndexMask:
    if mask.size == size:
        return mask
    if not resize:
        raise InputError(
            f"{path}: mask is {mask.size[1]}x{mask.size[0]} but the video is {size[1]}x{size[0]} "
            "(pass --resize-mask to scale it)"
        )
    h, w = mask.size
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    arr = mask.array[rows[:, None], cols[None, :]]
    return IndexMask(arr, [int(v) for v in np.unique(arr) if v], mask.palette)


_keep_given = keep_given


def _with_last(frames: Iterator[Frame]) -> Iterator[tuple[Frame, bool]]:
    """Yield (frame, is_last) with one frame of look-ahead."""
    prev = next(frames, None)
    for cur in frames:
        yield prev, False  # type: ignore[misc]
        prev = cur
    if prev is not None:
        yield prev, True


def segment_video(
    options: SegmentOptions,
    *,
    on_frame: Callable[[int, int | None], None] | None = None,
    network: Any = None,
    model_name: str | None = None,
) -> SegmentSummary:
    """Segment one video or frame folder; write the requested outputs atomically.

    ``network``/``model_name`` reuse an already loaded model (batch runs). With
    ``options.direction`` ``backward``/``both`` (or ``auto`` resolving to ``both``) the frames
    go through :func:`s3cli.keyframes.propagate`; ``on_frame`` then counts tracker steps of
    both passes.
    """
    source = open_source(options.source)
    if options.mask is None and options.mask_dir is None:
        raise InputError(f"{options.source}: no first mask given (use --mask or --mask-dir)")
    if options.mask_dir is not None and not options.mask_dir.is_dir():
        raise InputError(f"{options.mask_dir}: no such mask folder")
    if options.direction not in (*DIRECTIONS, "auto"):
        raise InputError(
            f"--direction {options.direction}: choose forward, backward, both or auto"
        )
    first = read_mask(options.mask) if options.mask is not None else None
    direction = options.direction
    mask_files: dict[int, Path | None] = {}
    if direction != "forward":
        mask_files = _mask_files(options, source)
        if direction == "auto":
            earliest = min(mask_files, default=options.start)
            direction = "forward" if earliest == options.start else "both"
    device = resolve_device(options.device)
    if network is None:
        network, model_name = load_tracking_model(options.model, options.weights, device)
    assert model_name is not None
    outputs = options.outputs
    if outputs.palette is None and first is not None and first.palette is not None:
        outputs.palette = first.palette
    if outputs.fps is None:
        outputs.fps = source.fps
    if direction != "forward":
        return _segment_keyframes(
            options, source, first, mask_files, direction, network, model_name, device, on_frame
        )
    tracker = make_tracker(network, model_name, options)

    autocast = _autocast(device, options.precision)
    start, end = options.start, options.end
    total = source.num_frames
    if total is not None:
        total = max(0, (min(total, end) if end is not None else total) - start)
    seen_mask = False
    frames = 0
    t0 = time.perf_counter()
    with ResultWriter(outputs) as writer:
        stream = (f for f in source if f.index >= start and (end is None or f.index < end))
        for frame, last in _with_last(iter(stream)):
            mask: IndexMask | None = None
            where: Path | None = None
            if first is not None and frame.index == options.mask_frame:
                mask, where = first, options.mask
            elif options.mask_dir is not None:
                where = _mask_for_dir(options.mask_dir, frame)
                if where is not None:
                    mask = read_mask(where, allow_empty=seen_mask)
            if mask is not None and where is not None:
                mask = _fit_mask(mask, where, frame.image.shape[:2], options.resize_mask)
                seen_mask = seen_mask or bool(mask.ids)
                if not mask.ids:
                    mask = None
            with autocast:
                prob = tracker.step(
                    frame.image,
                    mask.array if mask is not None else None,
                    mask.ids if mask is not None else None,
                    end=last,
                )
            index = tracker.to_index_mask(prob).cpu().numpy()
            if mask is not None:
                index = _keep_given(index, mask)
            writer.write(
                frame.name,
                frame.index,
                frame.image,
                index,
                list(tracker.object_ids),
                prob.float().cpu().numpy() if outputs.scores_dir is not None else None,
            )
            frames += 1
            if on_frame is not None:
                on_frame(frames, total)
        if frames == 0:
            raise InputError(f"{options.source}: no frames in the range [{start}, {end})")
        if not seen_mask:
            raise InputError(
                f"{options.mask or options.mask_dir}: no mask matched any processed frame "
                f"(mask frame {options.mask_frame}, range starts at {start})"
            )
    return _summary(options, model_name, frames, t0, list(tracker.object_ids), "forward")


def _summary(
    options: SegmentOptions,
    model_name: str,
    frames: int,
    t0: float,
    object_ids: list[int],
    direction: str,
) -> SegmentSummary:
    """The summary of a finished run that started at ``perf_counter()`` time ``t0``."""
    seconds = time.perf_counter() - t0
    return SegmentSummary(
        source=str(options.source),
        model=model_name,
        frames=frames,
        seconds=round(seconds, 3),
        fps=round(frames / seconds, 3) if seconds > 0 else 0.0,
        peak_memory_mb=round(peak_memory_mb(), 1),
        object_ids=object_ids,
        outputs=_done_outputs(options.outputs),
        direction=direction,
    )


def _done_outputs(outputs: OutputOptions) -> dict[str, str]:
    return {
        k: str(v)
        for k, v in (
            ("masks", outputs.masks_dir),
            ("mp4", outputs.mp4),
            ("rle", outputs.rle),
            ("scores", outputs.scores_dir),
        )
        if v is not None
    }


def _mask_files(options: SegmentOptions, source: FrameSource) -> dict[int, Path | None]:
    """Frame index -> mask file of every frame of the range that has one, in frame order
    (``None``: the ``--mask`` file, which wins over ``--mask-dir`` on its frame). Frames match
    ``--mask-dir`` files as in the forward loop (:func:`_mask_for_dir`)."""
    start, end = options.start, options.end
    found: dict[int, Path | None] = {}
    if options.mask_dir is not None:
        try:
            listing = {p.name for p in options.mask_dir.iterdir()}
        except OSError as exc:
            raise InputError(
                f"{options.mask_dir}: cannot list the mask folder ({exc.strerror or exc})"
            ) from exc
        if isinstance(source, FolderSource):
            n = len(source.files)
            indices: list[int] = list(range(start, min(n, end) if end is not None else n))
        else:  # frames are named 00000, 00001, ...: only numeric mask names can match
            stems = {Path(name).stem for name in listing}
            indices = sorted({int(s) for s in stems if s.isascii() and s.isdigit()})
            indices = [i for i in indices if i >= start and (end is None or i < end)]
        for i in indices:
            path = _mask_for_name(options.mask_dir, source.frame_name(i), i, listing)
            if path is not None:
                found[i] = path
    if options.mask is not None and options.mask_frame >= start and (
        end is None or options.mask_frame < end
    ):
        found[options.mask_frame] = None
    return dict(sorted(found.items()))


def _load_keyframe(
    path: Path, mask: IndexMask | None, resize: bool, size: tuple[int, int]
) -> IndexMask:
    if mask is None:
        mask = read_mask(path, allow_empty=True)
    return _fit_mask(mask, path, size, resize)


def _keyframes(
    options: SegmentOptions, first: IndexMask | None, files: dict[int, Path | None]
) -> list[Keyframe]:
    """The frames whose masks give objects; each mask is read once here for its ids, and again
    when a pass reaches it."""
    out: list[Keyframe] = []
    for index, path in files.items():
        if path is None:
            assert first is not None and options.mask is not None
            where, mask, keep = options.mask, first, first
        else:
            where, mask, keep = path, read_mask(path, allow_empty=True), None
        if mask.ids:
            load = functools.partial(_load_keyframe, where, keep, options.resize_mask)
            out.append(Keyframe(index, tuple(mask.ids), load))
    if not out:
        given = options.mask or options.mask_dir
        if files:
            raise InputError(
                f"{given}: every mask in the frame range is empty (give object pixels; 0 is "
                "background)"
            )
        raise InputError(
            f"{given}: no mask matched any processed frame "
            f"(mask frame {options.mask_frame}, range starts at {options.start})"
        )
    return out


def _segment_keyframes(
    options: SegmentOptions,
    source: FrameSource,
    first: IndexMask | None,
    mask_files: dict[int, Path | None],
    direction: str,
    network: Any,
    model_name: str,
    device: str,
    on_frame: Callable[[int, int | None], None] | None,
) -> SegmentSummary:
    """``segment_video`` with a backward pass: :func:`s3cli.keyframes.propagate` yields the
    frames in order, they are written as in the forward loop."""
    keyframes = _keyframes(options, first, mask_files)
    outputs = options.outputs
    autocast = _autocast(device, options.precision)
    frames = 0
    object_ids: list[int] = []
    t0 = time.perf_counter()
    with ResultWriter(outputs) as writer:
        results = propagate(
            source,
            keyframes,
            lambda net: make_tracker(net, model_name, options),
            direction=direction,
            network=network,
            start=options.start,
            end=options.end,
            spill_dir=options.spill_dir,
            step_context=autocast,
            on_step=on_frame,
        )
        with contextlib.closing(results):
            for item in results:
                writer.write(
                    item.frame.name,
                    item.frame.index,
                    item.frame.image,
                    item.index,
                    item.object_ids,
                    item.prob if outputs.scores_dir is not None else None,
                )
                object_ids.extend(o for o in item.object_ids if o not in object_ids)
                frames += 1
        if frames == 0:
            raise InputError(
                f"{options.source}: no frames in the range [{options.start}, {options.end})"
            )
    order = [o for kf in keyframes for o in kf.ids]
    object_ids.sort(key=lambda o: order.index(o) if o in order else len(order))
    return _summary(options, model_name, frames, t0, object_ids, direction)


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX tiles). Without
    either, bf16 is emulated and CPU autocast is slower than float32: on a two-core AVX-512 CPU
    without BF16, bf16 matmul ran at 54 GFLOP/s against 267 in float32, and a 480p frame took
    1.6-2.0 s against 0.5-0.6 s (cutie-small) and ~14 s against ~5-6 s (s3-base)."""
    import torch

    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise InputError(f"--precision {precision}: choose fp32, bf16 or fp16")
    if dtype is torch.float16 and not device.startswith("cuda"):
        raise InputError("--precision fp16 needs a CUDA device (use bf16 on the CPU)")
    if dtype is torch.bfloat16 and device.startswith("cpu") and not cpu_has_bf16_matmul():
        log.warning(
            "--precision bf16: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), "
            "so bf16 runs several times slower than fp32 here"
        )
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
