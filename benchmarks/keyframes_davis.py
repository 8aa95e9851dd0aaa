"""J&F of keyframe runs on the seven davis16-mini sequences (not a test).

Three runs per sequence, through ``s3cli.api.segment_video`` (what ``s3 segment`` calls):

* ``frame0``: the ground-truth mask of frame 0, forward only (the usual protocol);
* ``middle``: only the mask of the middle frame, ``--direction auto`` (= both: a backward pass
  to frame 0 and a forward pass to the end);
* ``firstlast``: the masks of the first and the last frame (``--mask-dir``), ``--direction
  both``: forward from the first, backward from the last, fused by temporal distance.

Predictions are scored with ``s3cli.eval.scoring`` (DAVIS 2017 protocol: every frame but the
first and the last). The ``middle`` run's scored frames include its given middle frame (exact);
its J&F without that frame is printed as well (``middle*``). The ``firstlast`` run is compared
with ``frame0`` (its forward-only counterpart) per sequence.

    python benchmarks/keyframes_davis.py [--root ../shared/data/davis16-mini] [--size 480]
        [--model lite] [--out /tmp/keyframes-davis] [--sequences ...] [--runs frame0 middle
        firstlast] [--json results.json]

Runs already finished in ``--out`` are reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DAVIS16_MINI, DAVIS_SEQUENCES  # noqa: E402

from s3cli.api import SegmentOptions, load_tracking_model, segment_video  # noqa: E402
from s3cli.eval.metrics import statistics  # noqa: E402
from s3cli.eval.scoring import score_folders  # noqa: E402
from s3cli.io.outputs import OutputOptions  # noqa: E402

DEFAULT_ROOT = DAVIS16_MINI
SEQUENCES = DAVIS_SEQUENCES
RUNS = ("frame0", "middle", "firstlast")
MARKER = ".bench-done.json"


def run_options(run: str, root: Path, seq: str, out: Path, size: str, model: str) -> SegmentOptions:
    gt = root / "Annotations" / "480p" / seq
    masks = sorted(gt.glob("*.png"))
    common: dict[str, Any] = {
        "source": root / "JPEGImages" / "480p" / seq,
        "model": model,
        "size": size,
        "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "outputs": OutputOptions(masks_dir=out),
    }
    if run == "frame0":
        return SegmentOptions(mask=masks[0], mask_frame=0, direction="forward", **common)
    if run == "middle":
        mid = len(masks) // 2
        return SegmentOptions(mask=masks[mid], mask_frame=mid, direction="auto", **common)
    if run == "firstlast":
        keys = out.parent / f".keys-{seq}"
        keys.mkdir(parents=True, exist_ok=True)
        for m in (masks[0], masks[-1]):
            shutil.copyfile(m, keys / m.name)
        return SegmentOptions(mask_dir=keys, direction="both", **common)
    raise SystemExit(f"unknown run {run}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--size", default="480")
    ap.add_argument("--model", default="lite")
    ap.add_argument("--out", type=Path, default=Path("/tmp/keyframes-davis"))
    ap.add_argument("--sequences", nargs="+", default=list(SEQUENCES))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gt_root = args.root / "Annotations" / "480p"
    out_root = args.out / f"{args.model}-{args.size}"
    network = name = None
    seconds: dict[str, dict[str, float]] = {}
    for run in args.runs:
        for seq in args.sequences:
            out = out_root / run / seq
            marker = out / MARKER
            if marker.is_file():
                seconds.setdefault(run, {})[seq] = json.loads(marker.read_text())["seconds"]
                continue
            if network is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
                network, name = load_tracking_model(args.model, None, device)
            opts = run_options(run, args.root, seq, out, args.size, args.model)
            t0 = time.perf_counter()
            summary = segment_video(opts, network=network, model_name=name)
            took = time.perf_counter() - t0
            marker.write_text(json.dumps({**summary.to_dict(), "seconds": took}))
            seconds.setdefault(run, {})[seq] = took
            print(f"{run:9s} {seq:15s} {summary.frames:3d} frames  {took:6.1f} s  "
                  f"({summary.direction})", file=sys.stderr, flush=True)

    results: dict[str, Any] = {"size": args.size, "model": args.model, "runs": {}}
    for run in args.runs:
        report = score_folders(gt_root, out_root / run, sequences=args.sequences, workers=1)
        per_seq = {s.name: s.summary.jf_mean for s in report.sequences}
        entry: dict[str, Any] = {"mean": report.summary.jf_mean, "sequences": per_seq}
        if run == "middle":
            # Without the given (exact) middle frame.
            excl: dict[str, float] = {}
            for s in report.sequences:
                n_all = len(sorted((gt_root / s.name).glob("*.png")))
                mid = f"{n_all // 2:05d}"
                keep = [i for i, f in enumerate(s.frames) if f != mid]
                o = s.objects[0]
                j = statistics([o.j[i] for i in keep]).mean
                f = statistics([o.f[i] for i in keep]).mean
                excl[s.name] = (j + f) / 2
            entry["sequences_without_given"] = excl
            entry["mean_without_given"] = float(np.mean(list(excl.values())))
        results["runs"][run] = entry
    results["seconds"] = seconds

    runs = results["runs"]
    cols = [r for r in RUNS if r in runs]
    head = f"{'sequence':15s}" + "".join(f"{c:>11s}" for c in cols)
    if "middle" in runs:
        head += f"{'middle*':>11s}"
    if "frame0" in runs and "firstlast" in runs:
        head += f"{'firstlast-frame0':>18s}"
    print(head)
    wins = 0
    for seq in args.sequences:
        line = f"{seq:15s}" + "".join(f"{100 * runs[c]['sequences'][seq]:11.1f}" for c in cols)
        if "middle" in runs:
            line += f"{100 * runs['middle']['sequences_without_given'][seq]:11.1f}"
        if "frame0" in runs and "firstlast" in runs:
            d = runs["firstlast"]["sequences"][seq] - runs["frame0"]["sequences"][seq]
            wins += d > 0
            line += f"{100 * d:+18.1f}"
        print(line)
    line = f"{'mean (J&F)':15s}" + "".join(f"{100 * runs[c]['mean']:11.1f}" for c in cols)
    if "middle" in runs:
        line += f"{100 * runs['middle']['mean_without_given']:11.1f}"
    print(line)
    if "frame0" in runs and "firstlast" in runs:
        results["firstlast_wins"] = wins
        print(f"first+last keyframes beat forward-only from frame 0 on {wins} of "
              f"{len(args.sequences)} sequences")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
