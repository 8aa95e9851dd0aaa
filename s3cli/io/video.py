"""Frame sources: a video file decoded frame by frame with PyAV, or a folder of images.

Neither holds more than one frame in memory. Both yield :class:`Frame` objects with the frame
index, a name for output files and an (H, W, 3) uint8 RGB array.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from s3cli.errors import InputError

__all__ = [
    "Frame",
    "FrameSource",
    "VideoSource",
    "FolderSource",
    "open_source",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "natural_key",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


@dataclass
class Frame:
    index: int
    name: str  # stem used for output files, e.g. "00012"
    image: np.ndarray  # (H, W, 3) uint8 RGB


def natural_key(name: str) -> list[object]:
    """Sort key that orders "img2" before "img10"."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


class FrameSource:
    """Common interface: ``path``, ``fps``, ``num_frames`` (an estimate for some videos),
    ``names``-free iteration over :class:`Frame`."""

    path: Path
    fps: float | None
    num_frames: int | None

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def frame_name(self, index: int) -> str:
        return f"{index:05d}"


class FolderSource(FrameSource):
    """A folder of jpg/png/webp frames in natural order."""

    def __init__(self, path: Path, fps: float | None = None) -> None:
        self.path = path
        self.files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=lambda p: natural_key(p.name),
        )
        if not self.files:
            raise InputError(f"{path}: no image frames (jpg, png, webp) in this folder")
        self.fps = fps
        self.num_frames = len(self.files)

    def frame_name(self, index: int) -> str:
        return self.files[index].stem

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        shape = None
        for i, f in enumerate(self.files):
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if bgr is None:
                raise InputError(f"{f}: not a readable image (corrupt or unsupported file)")
            if shape is not None and bgr.shape != shape:
                raise InputError(
                    f"{f}: frame is {bgr.shape[1]}x{bgr.shape[0]}, earlier frames are "
                    f"{shape[1]}x{shape[0]} (all frames of a folder must have one size)"
                )
            shape = bgr.shape
            yield Frame(i, f.stem, np.ascontiguousarray(bgr[:, :, ::-1]))


class VideoSource(FrameSource):
    """A video file decoded by PyAV, one frame at a time, display rotation applied."""

    def __init__(self, path: Path) -> None:
        import av

        self.path = path
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"{path}: has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else None
                self.time_base: Fraction | None = stream.time_base
                n = stream.frames
                if not n and stream.duration and stream.time_base and self.fps:
                    n = round(float(stream.duration * stream.time_base) * self.fps)
                self.num_frames = int(n) if n else None
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
        except InputError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable video ({_av_reason(exc)})") from exc

    def __iter__(self) -> Iterator[Frame]:
        import av

        index = 0
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    rgb = frame.to_ndarray(format="rgb24")
                    rot = int(getattr(frame, "rotation", 0) or 0) % 360
                    if rot:
                        # Display matrix angle is counter-clockwise.
                        rgb = np.ascontiguousarray(np.rot90(rgb, k=rot // 90))
                    yield Frame(index, self.frame_name(index), rgb)
                    index += 1
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise InputError(
                f"{self.path}: video is corrupt or truncated at frame {index} ({_av_reason(exc)})"
            ) from exc
        if index == 0:
            raise InputError(f"{self.path}: video has no decodable frames (corrupt or empty)")


def _av_reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def open_source(path: str | Path, fps: float | None = None) -> FrameSource:
    """A video file or a folder of frames."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderSource(path, fps)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{path}: is a single image; give a video file or a folder of frames")
    return VideoSource(path)
