"""A tiny synthetic VOS training set in the YouTube-VOS train layout (made by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from s3cli.io.masks import davis_palette


def make_ytvos(root: Path, *, videos: int = 3, frames: int = 6, size: tuple[int, int] = (96, 80),
               objects: int = 2, seed: int = 0) -> Path:
    """``root/train/JPEGImages/<vid>/%05d.jpg`` and palette masks in ``Annotations``: textured
    background, ``objects`` coloured discs moving linearly."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for v in range(videos):
        img_dir = root / "train" / "JPEGImages" / f"vid{v:02d}"
        ann_dir = root / "train" / "Annotations" / f"vid{v:02d}"
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        bg = (rng.random((h, w, 3)) * 80 + 60).astype(np.float32)
        starts = rng.uniform([15, 15], [w - 15, h - 15], size=(objects, 2))
        speeds = rng.uniform(-3, 3, size=(objects, 2))
        colours = rng.uniform(120, 255, size=(objects, 3))
        radius = rng.uniform(8, 14, size=objects)
        for f in range(frames):
            img = bg.copy()
            ids = np.zeros((h, w), np.uint8)
            for o in range(objects):
                cx, cy = starts[o] + f * speeds[o]
                disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius[o] ** 2
                img[disc] = colours[o]
                ids[disc] = o + 1
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(img_dir / f"{f:05d}.jpg",
                                                                     quality=95)
            m = Image.fromarray(ids, mode="P")
            m.putpalette(davis_palette())
            m.save(ann_dir / f"{f:05d}.png")
    return root
