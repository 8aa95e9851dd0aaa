"""Peak memory of ``s3 segment --direction both`` against forward-only on a long video.

Writes a low-resolution video (a square moving over a gradient, ``--frames`` frames, default
5,000 at 64x96) and runs ``s3 segment`` on it, each run in a fresh process:

* ``forward``: the mask of frame 0, ``--direction forward``;
* ``both``: masks on the first and the last frame (``--mask-dir``), ``--direction both``: a
  backward pass over the whole video (every frame spilled to disk, every result stored) and a
  forward pass over it again, fused;
* ``middle``: the mask of the middle frame only (default direction: both).

Prints each run's peak resident memory (``peak_memory_mb`` of the JSON summary: the process's
``ru_maxrss``), the largest size the temporary spill reached (sampled), and whether the spill
is gone afterwards. Bounded memory means ``both`` peaks within 10 % of ``forward``.

    python benchmarks/keyframes_memory.py [--frames 5000] [--size 64x96] [--model lite]
        [--runs forward both [middle]] [--json out.json]

``--model cutie-small`` runs a synthetic (random-weight) cutie-small checkpoint instead; speed
is not what is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _frame(t: int, h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    img = np.full((h, w, 3), 40, np.uint8)
    img += (np.arange(w, dtype=np.uint8)[None, :, None] // 4).astype(np.uint8)
    y = int((h - h // 3) * (0.5 + 0.5 * np.sin(t / 23)))
    x = int((w - w // 3) * (0.5 + 0.5 * np.cos(t / 31)))
    img[y : y + h // 3, x : x + w // 3] = (200, 60, 30)
    return img, (y, x)


def write_video(path: Path, frames: int, h: int, w: int) -> None:
    """An mp4 written frame by frame (never held in memory)."""
    import av

    with av.open(str(path), mode="w") as c:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = c.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            img, _ = _frame(t, h, w)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def write_mask(path: Path, t: int, h: int, w: int) -> None:
    from PIL import Image

    _, (y, x) = _frame(t, h, w)
    m = np.zeros((h, w), np.uint8)
    m[y : y + h // 3, x : x + w // 3] = 255
    Image.fromarray(m, mode="L").save(path)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def run_one(args: list[str], spill: Path) -> dict:
    """One ``s3 segment`` in a fresh process; samples the spill folder's size meanwhile."""
    peak_spill = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak_spill
        while not done.is_set():
            peak_spill = max(peak_spill, _folder_bytes(spill))
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "s3cli", "segment", *args, "--spill-dir", str(spill), "--json"],
        capture_output=True, text=True, env=env,
    )
    done.set()
    watcher.join()
    if out.returncode != 0:
        raise SystemExit(f"s3 segment failed:\n{out.stderr}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "peak_memory_mb": summary["peak_memory_mb"],
        "seconds": round(time.perf_counter() - t0, 1),
        "direction": summary["direction"],
        "frames": summary["frames"],
        "peak_spill_mb": round(peak_spill / 2**20, 1),
        "spill_left": sorted(p.name for p in spill.iterdir()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--size", default="64x96", help="HxW of the video")
    ap.add_argument("--model", default="lite", choices=("lite", "cutie-small"))
    ap.add_argument("--runs", nargs="+", default=["forward", "both"],
                    choices=("forward", "both", "middle"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="s3-kf-mem-") as tmp:
        root = Path(tmp)
        video = root / "long.mp4"
        t0 = time.perf_counter()
        write_video(video, args.frames, h, w)
        print(f"video: {args.frames} frames {w}x{h} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        last, mid = args.frames - 1, args.frames // 2
        (root / "firstlast").mkdir()
        write_mask(root / "first.png", 0, h, w)
        write_mask(root / "firstlast" / "00000.png", 0, h, w)
        write_mask(root / "firstlast" / f"{last:05d}.png", last, h, w)
        write_mask(root / "middle.png", mid, h, w)
        model = ["--model", "lite"]
        if args.model == "cutie-small":
            import torch

            from s3cli.model.registry import build_network

            ckpt = root / "small.pth"
            torch.save(build_network("cutie-small", synthetic=True).state_dict(), ckpt)
            model = ["--weights", str(ckpt)]
        common = [str(video), *model, "--size", "native", "--device", "cpu",
                  "--rle", str(root / "out.jsonl")]
        runs = {
            "forward": ["--mask", str(root / "first.png"), "--direction", "forward"],
            "both": ["--mask-dir", str(root / "firstlast"), "--direction", "both"],
            "middle": ["--mask", str(root / "middle.png"), "--mask-frame", str(mid)],
        }
        results = {}
        for name in args.runs:
            spill = root / f"spill-{name}"
            spill.mkdir()
            r = results[name] = run_one(common + runs[name], spill)
            print(f"{name:8s} ({r['direction']}): peak RSS {r['peak_memory_mb']:.0f} MiB, "
                  f"{r['seconds']:.0f} s, spill peak {r['peak_spill_mb']:.0f} MiB, "
                  f"left after: {r['spill_left'] or 'nothing'}", file=sys.stderr, flush=True)
    report: dict = {"frames": args.frames, "size": args.size, "model": args.model,
                    "runs": results}
    if "forward" in results:
        base = results["forward"]["peak_memory_mb"]
        for name in results:
            if name != "forward":
                ratio = results[name]["peak_memory_mb"] / base
                report[f"{name}_over_forward"] = round(ratio, 4)
                print(f"{name}/forward peak memory: {ratio:.3f} (bounded if <= 1.10)",
                      file=sys.stderr)
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
