"""Benchmark ``s3 score`` on 1,000 frames of 480p masks (not a test).

Writes 10 sequences x 100 frames of 480x854 palette PNGs (3 objects, predictions that are shifted,
eroded, dilated or missing the object now and then) into a temporary folder, then times:

* ``read``: reading every scored ground-truth and prediction PNG with Pillow, in one process:
  a same-run baseline, because the machine's speed varies from run to run;
* ``s3 score``: the command end to end (interpreter start-up included) with the default worker
  count, as a user runs it; its CPU time (workers included) is printed too.

Target: under 30 s for the 1,000 frames. Usage: ``python benchmarks/score_speed.py [--frames N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HEIGHT, WIDTH = 480, 854
TARGET_S = 30.0


def _palette() -> list[int]:
    """The DAVIS/PASCAL colour map."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def _save(path: Path, labels: np.ndarray, palette: list[int]) -> None:
    image = Image.fromarray(labels, mode="L")
    image.putpalette(palette)
    image.save(path)


def make_dataset(root: Path, sequences: int, frames: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    palette = _palette()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    for s in range(sequences):
        gt_dir = root / "gt" / f"seq{s:02d}"
        pred_dir = root / "pred" / f"seq{s:02d}"
        gt_dir.mkdir(parents=True)
        pred_dir.mkdir(parents=True)
        centres = rng.uniform((120, 150), (360, 700), size=(3, 2))
        velocity = rng.uniform(-2, 2, size=(3, 2))
        axes = rng.uniform(30, 110, size=(3, 2))
        for t in range(frames):
            gt = np.zeros((HEIGHT, WIDTH), np.uint8)
            for k in range(3):
                cy, cx = centres[k] + velocity[k] * t
                ay, ax = axes[k]
                centre, size = (int(cx), int(cy)), (int(ax), int(ay))
                cv2.ellipse(gt, centre, size, 15 * k + t, 0, 360, k + 1, -1)
            pred = np.zeros_like(gt)
            for k in range(3):
                m = (gt == k + 1).astype(np.uint8)
                mode = (t + k) % 5
                if mode == 1:
                    m = np.roll(m, (2, 3), axis=(0, 1))
                elif mode == 2:
                    m = cv2.erode(m, kernel)
                elif mode == 3:
                    m = cv2.dilate(m, kernel)
                elif mode == 4 and t % 7 == 0:
                    m[:] = 0
                pred[m > 0] = k + 1
            _save(gt_dir / f"{t:05d}.png", gt, palette)
            _save(pred_dir / f"{t:05d}.png", pred, palette)


def time_read(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for seq in sorted((root / "gt").iterdir()):
        names = sorted(p.name for p in seq.iterdir())[1:-1]
        for name in names:
            for side in ("gt", "pred"):
                with Image.open(root / side / seq.name / name) as image:
                    np.asarray(image)
            n += 1
    return time.perf_counter() - start, n


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_cli(root: Path) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (the command and its workers) and the JSON output."""
    cmd = [sys.executable, "-m", "s3cli", "score", "--gt", str(root / "gt"), "--pred"]
    cmd += [str(root / "pred"), "--json"]
    cpu0 = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"s3 score failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed, _children_cpu() - cpu0, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="total frames (default 1000)")
    parser.add_argument("--sequences", type=int, default=10, help="sequences (default 10)")
    args = parser.parse_args()
    per_seq = args.frames // args.sequences
    with tempfile.TemporaryDirectory(prefix="s3-score-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_dataset(root, args.sequences, per_seq)
        print(
            f"dataset: {args.sequences} x {per_seq} frames of {WIDTH}x{HEIGHT}, 3 objects "
            f"(written in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPU cores"
        )
        total_frames = args.sequences * per_seq
        read_s, scored = time_read(root)
        cli_s, cli_cpu, result = time_cli(root)
        print(f"read PNGs (gt+pred, 1 process): {read_s:6.2f} s  ({scored / read_s:7.1f} frames/s)")
        print(
            f"s3 score end to end:            {cli_s:6.2f} s  ({total_frames / cli_s:7.1f} frames/s"
            f" of {total_frames}; {scored} scored)"
        )
        print(f"  CPU time (command + workers):  {cli_cpu:6.2f} s")
        print(f"ratio s3 score / read:          {cli_s / read_s:6.2f}")
        print(f"J&F-Mean {result['J&F-Mean']:.4f}")
        verdict = "OK" if cli_s < TARGET_S * total_frames / 1000 else "SLOWER THAN TARGET"
        print(f"target < {TARGET_S:.0f} s per 1,000 frames: {verdict}")


if __name__ == "__main__":
    main()
