"""Time one 480p frame through s3-base on the CPU (synthetic weights; speed does not depend on
their values). Prints seconds per stage beside the machine's matmul throughput measured in the
same run, so figures from a noisy shared machine can be compared as ratios.

    python benchmarks/forward_s3.py [--threads 2] [--repeats 3] [--model s3-base]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import matmul_gflops, median  # noqa: E402

from s3cli.model.registry import build_network  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="s3-base")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=864)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    net = build_network(args.model, synthetic=True)
    image = torch.rand(1, 3, args.height, args.width)
    masks = (torch.rand(1, 1, args.height, args.width) > 0.7).float()
    times: dict[str, list[float]] = {"encode_image": [], "encode_mask": [], "segment": []}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first round warms up
            t = time.perf_counter()
            ms, pix = net.encode_image(image)
            net.transform_key(ms[0])
            t1 = time.perf_counter()
            sensory = torch.zeros(1, 1, 256, *pix.shape[-2:])
            value, sensory, summaries, _ = net.encode_mask(image, pix, sensory, masks)
            t2 = time.perf_counter()
            fused = net.pixel_fusion(pix, value, sensory, masks)
            readout, _ = net.readout_query(fused, summaries.unsqueeze(2))
            net.segment(ms, readout, sensory)
            t3 = time.perf_counter()
            times["encode_image"].append(t1 - t)
            times["encode_mask"].append(t2 - t1)
            times["segment"].append(t3 - t2)
    gflops = matmul_gflops()
    result = {k: round(median(v[1:]), 3) for k, v in times.items()}
    result["segmented_frame_s"] = round(result["encode_image"] + result["segment"], 3)
    result["matmul_gflops"] = round(gflops, 1)
    result["frame_x_matmul_gflop"] = round(result["segmented_frame_s"] * gflops, 1)
    print(
        f"{args.model} {args.height}x{args.width}, {args.threads} threads: encode_image "
        f"{result['encode_image']:.2f} s, segment {result['segment']:.2f} s, encode_mask "
        f"{result['encode_mask']:.2f} s; segmented frame {result['segmented_frame_s']:.2f} s; "
        f"matmul {gflops:.0f} GFLOP/s in the same run (frame = "
        f"{result['frame_x_matmul_gflop']:.0f} GFLOP-equivalents of matmul time)",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
