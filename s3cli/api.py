"""``segment_video``: frames in, masks out. The glue between io, the model and the engine.

No typer and no rich here: the CLI calls this with a :class:`SegmentOptions` and a progress
callback, and prints the returned :class:`SegmentSummary`.
"""

from __future__ import annotations

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
from s3cli.io.video import Frame, open_source

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
    start: int = 0
    end: int | None = None
    outputs: OutputOptions = field(default_factory=OutputOptions)


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

        return LiteTracker(network, max_internal_size=size, mem_every=options.mem_every)
    from s3cli.inference.engine import Tracker

    return Tracker(
        network,
        mem_every=options.mem_every,
        top_k=options.top_k,
        use_long_term=options.long_term,
        max_internal_size=size,
        flip_aug=options.flip,
    )


def _mask_for_dir(mask_dir: Path, frame: Frame) -> Path | None:
    for cand in (frame.name, f"{frame.index:05d}", str(frame.index)):
        for suffix in (".png", ".json"):
            p = mask_dir / f"{cand}{suffix}"
            if p.is_file():
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


def _keep_given(index: np.ndarray, mask: IndexMask) -> np.ndarray:
    """On an annotated frame the given objects are exactly their given masks (the model works
    at a lower internal resolution and would blur them)."""
    index = index.copy()
    index[np.isin(index, mask.ids)] = 0
    given = mask.array > 0
    index[given] = mask.array[given]
    return index


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

    ``network``/``model_name`` reuse an already loaded model (batch runs).
    """
    source = open_source(options.source)
    if options.mask is None and options.mask_dir is None:
        raise InputError(f"{options.source}: no first mask given (use --mask or --mask-dir)")
    if options.mask_dir is not None and not options.mask_dir.is_dir():
        raise InputError(f"{options.mask_dir}: no such mask folder")
    first = read_mask(options.mask) if options.mask is not None else None
    device = resolve_device(options.device)
    if network is None:
        network, model_name = load_tracking_model(options.model, options.weights, device)
    assert model_name is not None
    tracker = make_tracker(network, model_name, options)
    outputs = options.outputs
    if outputs.palette is None and first is not None and first.palette is not None:
        outputs.palette = first.palette
    if outputs.fps is None:
        outputs.fps = source.fps

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
    seconds = time.perf_counter() - t0
    done = {
        k: str(v)
        for k, v in (
            ("masks", outputs.masks_dir),
            ("mp4", outputs.mp4),
            ("rle", outputs.rle),
            ("scores", outputs.scores_dir),
        )
        if v is not None
    }
    return SegmentSummary(
        source=str(options.source),
        model=model_name,
        frames=frames,
        seconds=round(seconds, 3),
        fps=round(frames / seconds, 3) if seconds > 0 else 0.0,
        peak_memory_mb=round(peak_memory_mb(), 1),
        object_ids=list(tracker.object_ids),
        outputs=done,
    )


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
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
