"""A small LVOS-layout split, ground truth and predictions, drawn from closed-form shapes.

``make_lvos(root)`` writes ``root/valid/{JPEGImages,Annotations}/<video>/<8-digit>.{jpg,png}``,
``root/valid/valid_meta.json`` and ``root/pred/<video>/<8-digit>.png``. Everything is integer
geometry (no random numbers), so the same files come out on any machine and NumPy version.
``tests/eval/data/lvos_expected.json`` holds what the official LVOS tool computed on them.

Cases covered: several objects with their own frame ranges, an object that appears mid-video
and one that leaves early, non-contiguous ids, an unseen video (its name is on LVOS's list),
frames where the prediction misses the object, adds an unknown id or is empty like the ground
truth, and an object whose frame_nums is larger than its range (unfilled slots count as 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 60, 80
STEP = 5

# video -> frames released, objects: id -> (first index, end index exclusive, extra frame_nums)
VIDEOS: dict[str, tuple[int, dict[int, tuple[int, int, int]]]] = {
    "aaaa0001": (12, {1: (0, 12, 0), 2: (0, 12, 0)}),
    "R3UJGYwy": (10, {1: (0, 10, 0), 4: (3, 10, 0)}),  # unseen, id 4 appears at index 3
    "bbbb0002": (14, {2: (0, 9, 0), 5: (2, 14, 2)}),  # id 2 leaves after 9; id 5 frame_nums + 2
}

PALETTE = [0, 0, 0, 200, 40, 40, 40, 200, 40, 40, 40, 200, 200, 200, 40, 200, 40, 200]


def _ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return ((yy - cy) * (yy - cy)) * (rx * rx) + ((xx - cx) * (xx - cx)) * (ry * ry) <= (
        ry * ry * rx * rx
    )


def _gt_shape(video: int, obj: int, t: int) -> np.ndarray:
    cy = 14 + 3 * obj + (t * (2 + video)) % 28
    cx = 10 + 11 * obj + (t * (3 + obj)) % 40
    return _ellipse(cy, cx, 5 + (obj + t) % 4, 7 + (video + t) % 5)


def _pred_shape(video: int, obj: int, t: int, gt: np.ndarray) -> np.ndarray:
    case = (3 * video + 5 * obj + t) % 7
    if case == 0:
        return np.zeros_like(gt)  # missed
    if case == 1:
        return gt.copy()  # exact
    if case == 2:
        return np.roll(gt, (1 + t % 3, 2), axis=(0, 1))  # shifted
    if case == 3:
        return _ellipse(30, 40, 6, 9)  # somewhere else
    if case == 4:
        out = gt.copy()
        out[:, : W // 2] = False  # half
        return out
    return np.roll(gt, (0, -(t % 4)), axis=(0, 1)) | np.roll(gt, (t % 2, 0), axis=(0, 1))


def _save_mask(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(PALETTE)
    image.save(path)


def make_lvos(root: Path) -> Path:
    """Write the split under ``root`` and return ``root``."""
    split = root / "valid"
    meta: dict[str, dict] = {"videos": {}}
    for v, (name, (n_frames, objects)) in enumerate(VIDEOS.items()):
        meta["videos"][name] = {"objects": {}}
        for obj, (first, end, extra) in objects.items():
            count = end - first
            meta["videos"][name]["objects"][str(obj)] = {
                "frame_range": {
                    "start": f"{first * STEP:08d}",
                    "end": f"{(end - 1) * STEP + 1:08d}",
                    "frame_nums": str(count + extra),
                }
            }
        for t in range(n_frames):
            frame = f"{t * STEP:08d}"
            gt = np.zeros((H, W), np.uint8)
            pred = np.zeros((H, W), np.uint8)
            for obj, (first, end, _) in objects.items():
                if not first <= t < end:
                    continue
                shape = _gt_shape(v, obj, t)
                gt[shape] = obj
                pred[_pred_shape(v, obj, t, shape)] = obj
            if t % 5 == 4:
                pred[:4, :6] = 7  # an id the ground truth does not have
            _save_mask(split / "Annotations" / name / f"{frame}.png", gt)
            _save_mask(root / "pred" / name / f"{frame}.png", pred)
            image = np.dstack([gt * 40, pred * 40, np.full_like(gt, 90)])
            path = split / "JPEGImages" / name / f"{frame}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    (split / "valid_meta.json").write_text(json.dumps(meta, indent=1))
    return root
