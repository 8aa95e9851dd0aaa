"""Time one training iteration (forward over T frames with memory, point-sampled loss, backward,
AdamW step) and report the peak accelerator memory.

The default is the paper's setting: s3-base, batch 16, 8 frames (3 memory), 480x480 crops,
3 objects per sequence, 12544 loss points, fp16 AMP, on one GPU. The batch is random images with
random blob masks (speed and memory do not depend on the data's content); the weights follow the
synthetic rule (``--synthetic``) or PyTorch's initialisation.

    python benchmarks/train_step.py [--device cuda] [--batch 16] [--frames 8] [--crop 480]
        [--model s3-base] [--repeats 3] [--no-amp] [--amp-dtype bfloat16]

Prints a summary on stderr and one JSON line on stdout. On the CPU use a small setting, e.g.
``--device cpu --batch 1 --frames 3 --crop 64 --points 512``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3cli.model.synthetic import fill_synthetic_  # noqa: E402
from s3cli.train.config import DataSpec, TrainConfig  # noqa: E402
from s3cli.train.data import make_sample  # noqa: E402
from s3cli.train.trainer import DistEnv, Trainer  # noqa: E402


def random_batch(batch: int, frames: int, crop: int, objects: int, seed: int = 0
                 ) -> dict[str, torch.Tensor | list[str]]:
    """Random images and ``objects`` smooth random blobs per sequence, moving a little."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batch):
        images = torch.rand(frames, crop, crop, 3, generator=g)
        noise = torch.randn(1, objects, crop // 16, crop // 16, generator=g)
        ids = torch.zeros(frames, crop, crop, dtype=torch.int32)
        for t in range(frames):
            shifted = torch.roll(noise, shifts=(t, t), dims=(2, 3))
            field = F.interpolate(shifted, size=(crop, crop), mode="bilinear")[0]
            best = field.max(dim=0)
            ids[t] = torch.where(best.values > 0.8, best.indices.int() + 1, 0)
        labels = [int(v) for v in ids[0].unique() if v != 0][:objects] or [1]
        if not (ids[0] != 0).any():
            ids[:, : crop // 4, : crop // 4] = 1
        samples.append(make_sample(images.numpy(), ids.numpy(), labels, objects))
    out: dict[str, torch.Tensor | list[str]] = {}
    for k in samples[0]:
        if isinstance(samples[0][k], torch.Tensor):
            out[k] = torch.stack([s[k] for s in samples])  # type: ignore[misc]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="s3-base")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--mem-frames", type=int, default=3)
    ap.add_argument("--crop", type=int, default=480)
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--points", type=int, default=12544)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = TrainConfig(
        model=args.model, data=(DataSpec("generic", "."),), output="/nonexistent",
        batch_size=args.batch, seq_length=args.frames, mem_frames=args.mem_frames,
        crop_size=args.crop, num_objects=args.objects, points=args.points, amp=args.amp,
        amp_dtype=args.amp_dtype, device=args.device, workers=0,
    )
    trainer = Trainer(cfg, DistEnv(device=device), say=lambda m: print(m, file=sys.stderr))
    if args.synthetic:
        fill_synthetic_(trainer.net)
    batch = random_batch(args.batch, args.frames, args.crop, args.objects)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times = []
    losses = []
    for i in range(args.repeats + 1):  # the first iteration warms up
        if cuda and i == 1:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t = time.perf_counter()
        values = trainer.train_step(batch, i)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(values["total_loss"])
    steady = times[1:] or times
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batch": args.batch,
        "frames": args.frames,
        "crop": args.crop,
        "objects": args.objects,
        "amp": trainer.use_amp and args.amp_dtype,
        "first_iteration_s": round(times[0], 3),
        "iteration_s": round(sorted(steady)[len(steady) // 2], 3),
        "iteration_s_all": [round(t, 3) for t in steady],
        "losses": [round(v, 4) for v in losses],
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None
        ),
        "peak_reserved_gib": (
            round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if cuda else None
        ),
    }
    print(
        f"{args.model} batch {args.batch} x {args.frames} frames at {args.crop}x{args.crop}: "
        f"{result['iteration_s']:.3f} s per iteration (median of {len(steady)}), peak memory "
        f"{result['peak_memory_gib']} GiB on {result['device']}",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
