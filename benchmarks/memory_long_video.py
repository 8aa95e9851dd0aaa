"""Peak process memory of the engine on long synthetic videos, long-term memory on.

Runs the engine on a moving-square video made on the fly (never held in memory) for 1,000 and
for 5,000 frames, each in a fresh process, and prints peak RSS and the memory token counts for
both. Bounded memory means the two peaks are within 10 %.

``--network cutie-small`` (default) uses the real network with synthetic weights at a low
resolution. ``--network fake`` swaps in a stand-in with the real channel widths (key 64, value
and sensory 256) but almost no compute, so a 480p-sized memory (1,620 tokens a frame) can be run
for thousands of frames in minutes: that is where unbounded memory would show most.

    python benchmarks/memory_long_video.py [--frames 1000 5000] [--size 96x160]
        [--network cutie-small|fake]
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


def fake_network():
    """The engine's network Protocol with real widths and trivial compute."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from s3cli.model.layers.aggregate import aggregate

    class Fake(nn.Module):
        pad_divisor, key_dim, value_dim, sensory_dim, pixel_dim = 16, 64, 256, 256, 256

        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("k", torch.randn(64, 3, generator=g))
            self.register_buffer("v", torch.randn(256, 4, generator=g))
            self.p = nn.Parameter(torch.zeros(()))

        def encode_image(self, image):
            f16 = F.avg_pool2d(image, 16)  # (B, 3, h, w)
            pix = torch.einsum("ck,bkhw->bchw", self.v[:, :3], f16)  # (B, 256, h, w)
            return [f16, F.avg_pool2d(image, 8), F.avg_pool2d(image, 4)], pix

        def transform_key(self, f16, need_sk=True, need_ek=True):
            key = torch.einsum("ck,bkhw->bchw", self.k, f16)
            return key, 1 + f16[:, :1] ** 2, torch.sigmoid(key)

        def encode_mask(self, image, pix_feat, sensory, masks, *, deep_update=True,
                        chunk_size=-1, need_weights=False):
            m16 = F.avg_pool2d(masks, 16)  # (B, N, h, w)
            value = pix_feat.unsqueeze(1) * m16.unsqueeze(2)  # (B, N, 256, h, w)
            summaries = torch.zeros(*masks.shape[:2], 16, 257, dtype=masks.dtype)
            summaries[..., -1] = m16.flatten(2).sum(-1, keepdim=True)
            return value, value.tanh(), summaries, None

        def pixel_fusion(self, pix_feat, pixel, sensory, last_mask, *, chunk_size=-1):
            return pixel + sensory

        def readout_query(self, pixel_readout, obj_memory, *, selector=None, need_weights=False):
            return pixel_readout, {}

        def segment(self, ms_features, readout, sensory, *, selector=None, chunk_size=-1,
                    update_sensory=True):
            logits = readout.mean(2)  # (B, N, h, w)
            logits = F.interpolate(aggregate(logits.sigmoid(), 1), scale_factor=16)
            return sensory, logits, logits.softmax(1)

    return Fake().eval()


def run(frames: int, h: int, w: int, network: str) -> dict:
    import numpy as np
    import torch

    from s3cli.inference.engine import Tracker
    from s3cli.model.registry import build_network

    torch.set_num_threads(2)
    net = fake_network() if network == "fake" else build_network(network, synthetic=True)
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
    ap.add_argument("--size", default=None, help="HxW (default 96x160; 480x864 for fake)")
    ap.add_argument("--network", default="cutie-small", help="cutie-small or fake")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.size or ("480x864" if args.network == "fake" else "96x160")
    h, w = (int(v) for v in size.split("x"))
    if args.child:
        print(json.dumps(run(args.child, h, w, args.network)))
        return
    results = []
    for n in args.frames:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--size", size, "--network",
             args.network],
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
