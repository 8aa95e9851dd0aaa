"""Score a folder of predicted masks against a ground-truth folder, as DAVIS 2017 does.

Both folders hold one sub-folder per sequence with one PNG per frame (``<root>/<seq>/<frame>.png``,
pixel value = object id, 0 = background). The numbers are those of the official DAVIS 2017
semi-supervised evaluation (``davisvideochallenge/davis2017-evaluation``):

* The frames of a sequence are its sorted ground-truth PNG names; the first and the last are not
  scored (their prediction files are never opened and may be missing).
* The objects are ids 1..N, N being the largest id in the first ground-truth frame. Every id is
  scored in every evaluated frame, even one that never occurs (then J = F = 1). Ground-truth ids
  above N that appear later are not scored. A prediction that lacks an id is an empty mask for it.
  No id matching is done.
* Ground-truth value 255 is DAVIS's "void": it becomes background (it is not excluded).
* Per object: Mean, Recall and Decay of J and F (:func:`s3cli.eval.metrics.statistics`).
* Per sequence: the mean of its objects' statistics. Globally: the mean over all objects of all
  sequences (not over sequences), and J&F-Mean = (J-Mean + F-Mean) / 2.

Frames are scored in chunks by a process pool (``workers``); results do not depend on it.

Where the official tool crashes, exits or gives a meaningless number, this module decides:

* A missing or unreadable prediction frame, a prediction whose size differs from the ground
  truth, or a prediction id above N raise :class:`~s3cli.errors.InputError` (the official tool
  stops too, with no result file: exit status 0, or an AssertionError for the size).
* A sequence with fewer than 3 ground-truth frames (nothing left to score) raises
  :class:`~s3cli.errors.DatasetError` (the official tool dies with an IndexError).
* Greyscale PNGs whose only values are 0 and 255 (how DAVIS 2016 stores its single-object masks,
  and a common way to save binary predictions) are read as one object with id 1, on both sides.
  Palette PNGs keep DAVIS 2017's meaning of 255 (void in the ground truth).
* A sequence whose first ground-truth frame has no object scores nothing, as officially: its
  summary is NaN and ``ScoreReport.notes`` says so (as it does for ids appearing later).
* Decay of sequences of 256 or more evaluated frames: the official code wraps its bin indices
  around (uint8) and reports NaN; here the bins are the intended ones unless
  ``uint8_decay_wrap=True``. Shorter sequences give the same decay either way.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from s3cli.errors import DatasetError, InputError
from s3cli.eval.metrics import (
    BOUND_TH,
    Statistics,
    boundary_tolerance,
    frame_scores,
    statistics,
)

__all__ = [
    "SUMMARY_KEYS",
    "VOID_LABEL",
    "ObjectScore",
    "ScoreReport",
    "SequenceScore",
    "Summary",
    "default_workers",
    "list_sequences",
    "read_label_map",
    "run_chunks",
    "score_folders",
]

VOID_LABEL = 255
"""DAVIS's "void" ground-truth value, turned into background."""

SUMMARY_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")

_SERIAL_PIXELS = 40 * 480 * 854
"""Below this many evaluated pixels (about 40 frames of 480p), the default is to score serially."""

_MASK_HINT = "save masks as palette or greyscale PNGs whose pixel values are object ids"


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Summary:
    """The seven DAVIS summary numbers, as fractions (NaN when there is nothing to average)."""

    jf_mean: float
    j_mean: float
    j_recall: float
    j_decay: float
    f_mean: float
    f_recall: float
    f_decay: float
    num_objects: int

    def as_dict(self) -> dict[str, float]:
        """The numbers under the column names of DAVIS's ``global_results`` CSV."""
        values = (
            self.jf_mean,
            self.j_mean,
            self.j_recall,
            self.j_decay,
            self.f_mean,
            self.f_recall,
            self.f_decay,
        )
        return dict(zip(SUMMARY_KEYS, values, strict=True))


@dataclass(frozen=True)
class ObjectScore:
    """Per-frame J and F of one object over the evaluated frames, with their statistics."""

    object_id: int
    j: tuple[float, ...]
    f: tuple[float, ...]
    j_stats: Statistics
    f_stats: Statistics


@dataclass(frozen=True)
class SequenceScore:
    """One sequence: its evaluated frames, its objects and the mean of their statistics."""

    name: str
    frames: tuple[str, ...]
    height: int
    width: int
    bound_pix: int
    objects: tuple[ObjectScore, ...]
    summary: Summary


@dataclass(frozen=True)
class ScoreReport:
    """The result of :func:`score_folders`."""

    gt_root: Path
    pred_root: Path
    sequences: tuple[SequenceScore, ...]
    summary: Summary
    notes: tuple[str, ...] = ()

    @property
    def num_frames(self) -> int:
        """Evaluated frames over all sequences."""
        return sum(len(s.frames) for s in self.sequences)


def _mean(values: Sequence[float]) -> float:
    # Plain mean as the official summary (np.mean): a NaN makes the result NaN.
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else math.nan


def _summarise(objects: Sequence[ObjectScore]) -> Summary:
    j_mean = _mean([o.j_stats.mean for o in objects])
    f_mean = _mean([o.f_stats.mean for o in objects])
    return Summary(
        jf_mean=(j_mean + f_mean) / 2.0,
        j_mean=j_mean,
        j_recall=_mean([o.j_stats.recall for o in objects]),
        j_decay=_mean([o.j_stats.decay for o in objects]),
        f_mean=f_mean,
        f_recall=_mean([o.f_stats.recall for o in objects]),
        f_decay=_mean([o.f_stats.decay for o in objects]),
        num_objects=len(objects),
    )


# --------------------------------------------------------------------------------------------
# Reading masks


def read_label_map(path: Path | str, *, ground_truth: bool) -> np.ndarray:
    """Read a mask PNG as a 2-D array of object ids.

    Palette PNGs give their indices (not colours); greyscale PNGs their values. A greyscale
    PNG holding only 0 and 255 is a binary mask: 255 becomes id 1. In the ground truth any other
    255 is DAVIS's void label and becomes 0. Colour images raise :class:`InputError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            labels = np.asarray(image)
    except FileNotFoundError:
        if ground_truth:
            raise InputError(
                f"{path}: ground-truth mask not found (check that the dataset is complete)"
            ) from None
        raise InputError(
            f"{path}: prediction mask not found (every ground-truth frame except the first and "
            "the last needs a prediction PNG of the same name)"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot be read as a PNG mask: {exc} ({_MASK_HINT})") from None
    if mode == "1":
        labels = labels.astype(np.uint8)
    elif mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        raise InputError(f"{path}: is a {mode}-mode image, not a mask of object ids ({_MASK_HINT})")
    if labels.ndim != 2:
        raise InputError(f"{path}: mask has shape {labels.shape}, expected 2-D ({_MASK_HINT})")
    if mode != "P" and labels.dtype == np.uint8 and _is_binary_0_255(labels):
        return (labels != 0).view(np.uint8)
    if ground_truth:
        void = labels == VOID_LABEL
        if void.any():
            labels = labels.copy()
            labels[void] = 0
    return labels


def _is_binary_0_255(labels: np.ndarray) -> bool:
    if int(labels.max()) != 255:
        return False
    return not np.any((labels != 0) & (labels != 255))


def _png_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file()),
        key=lambda p: p.name,
    )


def list_sequences(gt_root: Path | str) -> list[str]:
    """Names of the sequence folders of a ground-truth root, sorted."""
    gt_root = Path(gt_root)
    if not gt_root.exists():
        raise DatasetError(
            f"{gt_root}: ground-truth folder not found (pass the folder that holds one "
            "sub-folder of PNG masks per sequence)"
        )
    if not gt_root.is_dir():
        raise DatasetError(
            f"{gt_root}: is not a folder (pass the folder that holds one sub-folder of PNG "
            "masks per sequence)"
        )
    names = sorted(p.name for p in gt_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        if any(p.suffix.lower() == ".png" for p in gt_root.iterdir()):
            hint = "it holds PNGs directly: pass its parent folder, which holds one per sequence"
        elif (gt_root / "Annotations" / "480p").is_dir():
            hint = f"for a DAVIS root pass {gt_root / 'Annotations' / '480p'}"
        else:
            hint = "expected <root>/<sequence>/<frame>.png"
        raise DatasetError(f"{gt_root}: no sequence folders in the ground truth ({hint})")
    return names


# --------------------------------------------------------------------------------------------
# Work units


@dataclass(frozen=True)
class _Chunk:
    """Consecutive evaluated frames of one sequence, scored by one worker call."""

    seq: str
    gt_dir: str
    pred_dir: str
    names: tuple[str, ...]  # ground-truth file names
    num_objects: int
    height: int
    width: int
    bound_pix: int


@dataclass(frozen=True)
class _ChunkResult:
    j: np.ndarray  # (num_objects, frames)
    f: np.ndarray
    max_gt_id: int


def _score_chunk(chunk: _Chunk) -> _ChunkResult:
    n_obj, n_frames = chunk.num_objects, len(chunk.names)
    j = np.ones((n_obj, n_frames), dtype=np.float64)
    f = np.ones((n_obj, n_frames), dtype=np.float64)
    max_gt_id = 0
    gt_dir, pred_dir = Path(chunk.gt_dir), Path(chunk.pred_dir)
    for t, name in enumerate(chunk.names):
        gt_path = gt_dir / name
        gt = read_label_map(gt_path, ground_truth=True)
        if gt.shape != (chunk.height, chunk.width):
            raise DatasetError(
                f"{gt_path}: is {gt.shape[1]}x{gt.shape[0]} pixels but the first frame of the "
                f"sequence is {chunk.width}x{chunk.height} (every ground-truth frame of a "
                "sequence must have the same size)"
            )
        pred_path = pred_dir / (Path(name).stem + ".png")
        pred = read_label_map(pred_path, ground_truth=False)
        if pred.shape != gt.shape:
            raise InputError(
                f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} pixels but the "
                f"ground truth is {gt.shape[1]}x{gt.shape[0]} (save predictions at the "
                "ground-truth resolution; no resizing is done)"
            )
        top = int(pred.max()) if pred.size else 0
        if top > n_obj:
            have = f"ids 1..{n_obj}" if n_obj > 1 else ("id 1" if n_obj == 1 else "no objects")
            raise InputError(
                f"{pred_path}: prediction has object id {top} but the first ground-truth frame "
                f"has {have} (only the objects of the first frame are scored; remove or "
                "renumber the extra ids)"
            )
        max_gt_id = max(max_gt_id, int(gt.max()) if gt.size else 0)
        if n_obj:
            j[:, t], f[:, t] = frame_scores(gt, pred, n_obj, bound_pix=chunk.bound_pix)
    return _ChunkResult(j=j, f=f, max_gt_id=max_gt_id)


@dataclass(frozen=True)
class _SeqPlan:
    name: str
    frames: tuple[str, ...]  # evaluated ground-truth file names
    first_frame: str
    num_objects: int
    height: int
    width: int
    bound_pix: int


def _plan_sequence(gt_root: Path, pred_root: Path, seq: str, bound_th: float) -> _SeqPlan:
    gt_dir = gt_root / seq
    if not gt_dir.is_dir():
        raise DatasetError(
            f"{gt_dir}: sequence folder not found in the ground truth (check the sequence name)"
        )
    files = _png_files(gt_dir)
    if not files:
        raise DatasetError(
            f"{gt_dir}: no PNG masks in this ground-truth sequence folder (add the masks or "
            "remove the folder)"
        )
    if len(files) < 3:
        raise DatasetError(
            f"{gt_dir}: only {len(files)} ground-truth frame(s); at least 3 are needed because "
            "the first and last frames are not scored (add frames or remove the sequence)"
        )
    first = read_label_map(files[0], ground_truth=True)
    num_objects = int(first.max()) if first.size else 0
    height, width = first.shape
    pred_dir = pred_root / seq
    if not pred_dir.is_dir():
        raise InputError(
            f"{pred_dir}: no predictions for sequence '{seq}' (the prediction folder needs one "
            "sub-folder per ground-truth sequence, with PNGs named like the ground truth)"
        )
    return _SeqPlan(
        name=seq,
        frames=tuple(p.name for p in files[1:-1]),
        first_frame=files[0].name,
        num_objects=num_objects,
        height=height,
        width=width,
        bound_pix=boundary_tolerance(height, width, bound_th),
    )


def default_workers() -> int:
    """The number of CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork on Linux: workers start at once and never re-run the caller's __main__ (spawn and
    # forkserver do, which breaks `python - < script` and unguarded scripts). Elsewhere spawn.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the processes are the parallelism; no thread pools inside them


# --------------------------------------------------------------------------------------------
# Entry point


def score_folders(
    gt_root: Path | str,
    pred_root: Path | str,
    *,
    workers: int | None = None,
    sequences: Sequence[str] | None = None,
    bound_th: float = BOUND_TH,
    uint8_decay_wrap: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreReport:
    """Score ``pred_root`` against ``gt_root`` with the DAVIS 2017 semi-supervised protocol.

    ``workers`` processes score chunks of frames in parallel (default: the usable CPU cores, or
    this process alone for jobs under about 40 frames of 480p; 1 scores in this process).
    ``sequences`` restricts scoring to those ground-truth sequences.
    ``progress(done, total)`` is called with evaluated-frame counts as chunks finish.
    ``uint8_decay_wrap`` reproduces the official decay overflow (NaN) for sequences of 256 or
    more evaluated frames. Raises :class:`InputError` or :class:`DatasetError` (see the module
    documentation); nothing is written anywhere.
    """
    gt_root, pred_root = Path(gt_root), Path(pred_root)
    names = list_sequences(gt_root) if sequences is None else list(dict.fromkeys(sequences))
    if not pred_root.is_dir():
        raise InputError(
            f"{pred_root}: prediction folder not found (pass the folder that holds one "
            "sub-folder of PNG masks per sequence)"
        )
    plans = [_plan_sequence(gt_root, pred_root, seq, bound_th) for seq in names]

    total = sum(len(p.frames) for p in plans)
    if workers is None:
        pixels = sum(len(p.frames) * p.height * p.width for p in plans)
        # Starting worker processes costs about a second: not worth it for small jobs.
        n_workers = default_workers() if pixels > _SERIAL_PIXELS else 1
    else:
        n_workers = int(workers)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chunk_len = min(32, max(4, math.ceil(total / (n_workers * 4)))) if total else 1
    chunks: list[_Chunk] = []
    for plan in plans:
        for start in range(0, len(plan.frames), chunk_len):
            chunks.append(
                _Chunk(
                    seq=plan.name,
                    gt_dir=str(gt_root / plan.name),
                    pred_dir=str(pred_root / plan.name),
                    names=plan.frames[start : start + chunk_len],
                    num_objects=plan.num_objects,
                    height=plan.height,
                    width=plan.width,
                    bound_pix=plan.bound_pix,
                )
            )

    results = run_chunks(chunks, min(n_workers, len(chunks)), total, progress, _score_chunk)

    notes: list[str] = []
    seq_scores: list[SequenceScore] = []
    by_seq: dict[str, list[_ChunkResult]] = {}
    for chunk, res in zip(chunks, results, strict=True):
        by_seq.setdefault(chunk.seq, []).append(res)
    for plan in plans:
        parts = by_seq.get(plan.name, [])
        n_obj = plan.num_objects
        j_all = np.concatenate([r.j for r in parts], axis=1) if parts else np.ones((n_obj, 0))
        f_all = np.concatenate([r.f for r in parts], axis=1) if parts else np.ones((n_obj, 0))
        objects = tuple(
            ObjectScore(
                object_id=k + 1,
                j=tuple(float(x) for x in j_all[k]),
                f=tuple(float(x) for x in f_all[k]),
                j_stats=statistics(j_all[k], uint8_wrap=uint8_decay_wrap),
                f_stats=statistics(f_all[k], uint8_wrap=uint8_decay_wrap),
            )
            for k in range(n_obj)
        )
        if n_obj == 0:
            notes.append(
                f"{plan.name}: the first ground-truth frame ({plan.first_frame}) has no "
                "objects, so nothing is scored in this sequence"
            )
        late = max((r.max_gt_id for r in parts), default=0)
        if late > n_obj:
            notes.append(
                f"{plan.name}: ground-truth ids above {n_obj} appear after the first frame and "
                "are not scored (only the objects of the first frame are)"
            )
        seq_scores.append(
            SequenceScore(
                name=plan.name,
                frames=tuple(Path(n).stem for n in plan.frames),
                height=plan.height,
                width=plan.width,
                bound_pix=plan.bound_pix,
                objects=objects,
                summary=_summarise(objects),
            )
        )
    every_object = [o for s in seq_scores for o in s.objects]
    return ScoreReport(
        gt_root=gt_root,
        pred_root=pred_root,
        sequences=tuple(seq_scores),
        summary=_summarise(every_object),
        notes=tuple(notes),
    )


def run_chunks(
    chunks: Sequence[Any],
    n_workers: int,
    total: int,
    progress: Callable[[int, int], None] | None,
    score: Callable[[Any], Any],
) -> list[Any]:
    """``score(chunk)`` for every chunk, in order, in ``n_workers`` processes (this one when 1).
    Each chunk has ``names``, the frames it holds: ``progress(done, total)`` counts them."""
    done = 0
    if progress is not None:
        progress(0, total)
    results: list[Any] = []
    if n_workers <= 1:
        for chunk in chunks:
            results.append(score(chunk))
            done += len(chunk.names)
            if progress is not None:
                progress(done, total)
        return results
    executor = ProcessPoolExecutor(
        max_workers=n_workers, mp_context=_pool_context(), initializer=_init_worker
    )
    try:
        futures: list[Future[Any]] = [executor.submit(score, c) for c in chunks]
        for chunk, future in zip(chunks, futures, strict=True):
            results.append(future.result())  # re-raises the worker's error, in chunk order
            done += len(chunk.names)
            if progress is not None:
                progress(done, total)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return results
