"""Peak process memory of the engine on long synthetic videos, long-term memory on.

Runs the engine (cutie-small, synthetic weights, a moving-square video made on the fly, never
held in memory) for 1,000 and for 5,000 frames, each in a fresh process, and prints peak RSS and
the memory token counts for both. Bounded memory means the two peaks are within 10 %.

    python benchmarks/memory_long_video.py [--frames 1000 5000] [--size 96x160]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _frame(t: int, h: int, w: int):
    import numpy as np

    img = np.full((h, w, 3), 40, np.uint8)
    y = int((h - h // 3) * (0.5 + 0.5 * np.sin(t / 23)))
    x = int((w - w // 3) * (0.5 + 0.5 * np.cos(t / 31)))
    img[y : y + h // 3, x : x + w // 3] = (200, 60, 30)
    img += (np.arange(w, dtype=np.uint8)[None, :, None] // 8)
    return img, (y, x)


def run(frames: int, h: int, w: int) -> dict:
    import numpy as np
    import torch

    from s3cli.inference.engine import Tracker
    from s3cli.model.registry import build_network

    torch.set_num_threads(2)
    net = build_network("cutie-small", synthetic=True)
    tracker = Tracker(net, mem_every=5, use_long_term=True)
    t0 = time.perf_counter()
    for t in range(frames):
        img, (y, x) = _frame(t, h, w)
        mask = None
        if t == 0:
            mask = np.zeros((h, w), np.int64)
            mask[y : y + h // 3, x : x + w // 3] = 1
        tracker.step(img, mask, end=t == frames - 1)
    stats = tracker.memory.stats()
    return {
        "frames": frames,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "working_tokens": sum(b.work_size for b in stats.buckets.values()),
        "long_term_tokens": sum(b.long_size for b in stats.buckets.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--size", default="96x160")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    if args.child:
        print(json.dumps(run(args.child, h, w)))
        return
    results = []
    for n in args.frames:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--size", args.size],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{n} frames: peak RSS {r['peak_rss_mb']} MiB in {r['seconds']} s", file=sys.stderr)
    peaks = [r["peak_rss_mb"] for r in results]
    ratio = max(peaks) / min(peaks)
    print(f"largest/smallest peak: {ratio:.3f} (bounded if <= 1.10)", file=sys.stderr)
    print(json.dumps({"runs": results, "peak_ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
