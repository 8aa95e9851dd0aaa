"""Result writers: palette PNGs, binary PNGs, overlays, an mp4, RLE JSON lines, scores.

Everything is written into hidden staging locations beside its destination and moved into place
only when the whole video has succeeded (:meth:`ResultWriter.commit`). An error or Ctrl-C
removes the staging (:meth:`ResultWriter.abort`), so there is never a half-written file and an
earlier result at the destination stays intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np

from s3cli.errors import OutputError
from s3cli.io.masks import davis_palette, rle_encode

__all__ = ["OutputOptions", "ResultWriter", "overlay_image", "write_png_atomic"]


@dataclass
class OutputOptions:
    """Which results to write for one video. ``masks_dir`` holds palette PNGs (and the
    ``binary/`` and ``overlay/`` sub-folders when asked for)."""

    masks_dir: Path | None = None
    binary: bool = False
    overlay: bool = False
    mp4: Path | None = None
    rle: Path | None = None
    scores_dir: Path | None = None
    palette: bytes | None = None
    fps: float | None = None
    only_frames: frozenset[str] | None = None
    """Write results only for frames of these names (benchmarks that ask for some frames, such
    as YouTube-VOS); ``None`` writes every frame."""

    @property
    def any(self) -> bool:
        return any((self.masks_dir, self.mp4, self.rle, self.scores_dir))


def overlay_image(image: np.ndarray, index: np.ndarray, palette: bytes, alpha: float = 0.5):
    """Blend object colours over ``image`` (H, W, 3) uint8 and darken object outlines."""
    pal = np.frombuffer(palette, dtype=np.uint8).reshape(-1, 3)
    colours = pal[np.clip(index, 0, len(pal) - 1)]
    fg = index > 0
    out = image.astype(np.float32)
    out[fg] = out[fg] * (1 - alpha) + colours[fg].astype(np.float32) * alpha
    edge = np.zeros_like(fg)
    edge[:-1] |= index[:-1] != index[1:]
    edge[:, :-1] |= index[:, :-1] != index[:, 1:]
    out[edge & fg] *= 0.4
    return out.clip(0, 255).astype(np.uint8)


def _index_image(index: np.ndarray, palette: bytes):
    from PIL import Image

    if index.max(initial=0) > 255:
        raise OutputError("object ids above 255 cannot be stored in a palette PNG")
    im = Image.fromarray(index.astype(np.uint8), mode="P")
    im.putpalette(palette)
    return im


def write_png_atomic(path: Path, index: np.ndarray, palette: bytes) -> None:
    """A palette PNG written to a temporary name and renamed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _index_image(index, palette).save(tmp, format="PNG", optimize=False)
    os.replace(tmp, path)


def _check_writable(path: Path) -> None:
    """Create ``path`` (a folder) if needed and check files can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".s3-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc})") from exc


class _Mp4Writer:
    """Streams RGB frames into an h264 (or mpeg4) mp4 with PyAV."""

    def __init__(self, path: Path, fps: float | None) -> None:
        import av

        self.path = path
        self.container = av.open(str(path), mode="w", format="mp4")
        codec = next(
            (c for c in ("libx264", "h264", "mpeg4") if c in av.codecs_available), "mpeg4"
        )
        rate = Fraction(fps or 25).limit_denominator(1001)
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.pix_fmt = "yuv420p"
        if codec in ("libx264", "h264"):
            self.stream.options = {"crf": "20", "preset": "veryfast"}
        self.opened = False

    def write(self, rgb: np.ndarray) -> None:
        import av

        h, w = rgb.shape[:2]
        if not self.opened:
            self.stream.width, self.stream.height = w + (w % 2), h + (h % 2)
            self.opened = True
        if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row/column
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.opened:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


class ResultWriter:
    """Writes one video's results; use as a context manager (commit on success, abort on
    error or Ctrl-C)."""

    def __init__(self, options: OutputOptions) -> None:
        self.opt = options
        self.palette = options.palette or davis_palette()
        self._staging: list[tuple[Path, Path]] = []  # (staging dir, destination dir)
        self._files: list[tuple[Path, Path]] = []  # (temporary file, destination file)
        self._mp4: _Mp4Writer | None = None
        self._rle: IO[str] | None = None
        self.frames = 0
        self._masks_stage = self._stage_dir(options.masks_dir)
        self._scores_stage = self._stage_dir(options.scores_dir)
        if options.mp4 is not None:
            tmp = self._stage_file(options.mp4)
            self._mp4 = _Mp4Writer(tmp, options.fps)
        if options.rle is not None:
            self._rle = open(self._stage_file(options.rle), "w")  # noqa: SIM115

    def _stage_dir(self, dest: Path | None) -> Path | None:
        if dest is None:
            return None
        _check_writable(dest)
        stage = Path(tempfile.mkdtemp(prefix=".s3-partial-", dir=dest))
        self._staging.append((stage, dest))
        return stage

    def _stage_file(self, dest: Path) -> Path:
        _check_writable(dest.parent if str(dest.parent) else Path("."))
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=dest.suffix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        self._files.append((tmp, dest))
        return tmp

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(
        self,
        name: str,
        index: int,
        image: np.ndarray,
        index_mask: np.ndarray,
        object_ids: list[int],
        prob: np.ndarray | None = None,
    ) -> None:
        """One frame: ``index_mask`` (H, W) of object ids; ``prob`` (1 + N, H, W) float.
        A frame left out by ``only_frames`` is not written."""
        if self.opt.only_frames is not None and name not in self.opt.only_frames:
            return
        try:
            self._write(name, index, image, index_mask, object_ids, prob)
        except OSError as exc:
            raise OutputError(f"{exc.filename or 'output'}: cannot write ({exc.strerror})") from exc
        self.frames += 1

    def _write(self, name, index, image, index_mask, object_ids, prob) -> None:
        stage = self._masks_stage
        if stage is not None:
            _index_image(index_mask, self.palette).save(stage / f"{name}.png", format="PNG")
            if self.opt.binary:
                for obj in object_ids:
                    d = stage / "binary" / str(obj)
                    d.mkdir(parents=True, exist_ok=True)
                    from PIL import Image

                    Image.fromarray(((index_mask == obj) * 255).astype(np.uint8), mode="L").save(
                        d / f"{name}.png"
                    )
        over = None
        if (self.opt.overlay and stage is not None) or self._mp4 is not None:
            over = overlay_image(image, index_mask, self.palette)
        if self.opt.overlay and stage is not None:
            import cv2

            d = stage / "overlay"
            d.mkdir(exist_ok=True)
            cv2.imwrite(str(d / f"{name}.jpg"), over[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        if self._mp4 is not None:
            self._mp4.write(over)
        if self._rle is not None:
            masks = {str(o): rle_encode(index_mask == o) for o in object_ids}
            line = {"frame": index, "name": name, "masks": masks}
            self._rle.write(json.dumps(line, separators=(",", ":")) + "\n")
        if self._scores_stage is not None and prob is not None:
            np.savez_compressed(
                self._scores_stage / f"{name}.npz",
                prob=prob.astype(np.float32),
                object_ids=np.asarray(object_ids, dtype=np.int64),
            )

    def _close_streams(self) -> None:
        if self._mp4 is not None:
            self._mp4.close()
            self._mp4 = None
        if self._rle is not None:
            self._rle.close()
            self._rle = None

    def commit(self) -> None:
        """Move every staged result into place."""
        self._close_streams()
        for stage, dest in self._staging:
            for src in sorted(stage.rglob("*")):
                if src.is_file():
                    target = dest / src.relative_to(stage)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, target)
            shutil.rmtree(stage, ignore_errors=True)
        for tmp, dest in self._files:
            os.replace(tmp, dest)
        self._staging.clear()
        self._files.clear()

    def abort(self) -> None:
        """Remove everything staged; destinations are left as they were."""
        try:
            self._close_streams()
        except Exception:  # noqa: BLE001 - a broken stream must not hide the original error
            pass
        for stage, _ in self._staging:
            shutil.rmtree(stage, ignore_errors=True)
        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        self._staging.clear()
        self._files.clear()
