"""Score predictions on LVOS as its official tool does (``LingyiHongfd/lvos-evaluation``).

LVOS objects come and go over long videos, so each object is scored over its own frame range,
read from the split's meta file (``valid_meta.json``; ``meta.json`` for LVOS v1)::

    {"videos": {"<seq>": {"objects": {"<id>": {"frame_range":
        {"start": "00000005", "end": "00000300", "frame_nums": 59}}}}}}

The rules, those of the current official tool (the version that scores LVOS v1 and v2):

* Object ``<id>`` is compared in frames ``start, start+5, ... < end`` (frame files are named
  with 8 digits). Of these positions the first and the one at ``frame_nums - 1`` are skipped,
  as DAVIS skips the first and last frames; the rest fill ``frame_nums - 2`` slots in order.
  Slots left unfilled (a range with fewer frames than ``frame_nums``) count as J = F = 0.
* The masks are ``ground truth == id`` and ``prediction == id``; other ids in either are
  ignored, and no id matching is done. J and F are DAVIS's (:mod:`s3cli.eval.metrics`).
* Per object, named ``<seq>_<k>`` with k its 1-based position in the meta file: J-Mean and
  F-Mean (NaN-ignoring means over the slots), and V, the standard deviation of the per-frame
  (J + F) / 2, computed as ``sqrt(round(variance, 4))``. The official tool computes a recall
  and a decay too but reports neither (its decay is always 0).
* Videos listed as unseen (:data:`~s3cli.eval.lvos_unseen.LVOS_UNSEEN_VIDEOS`: object classes
  absent from LVOS's training set) are averaged apart from the others. J-Mean is the mean of the
  seen and unseen object means, F-Mean and V-Mean alike, and J&F-Mean is (J-Mean + F-Mean) / 2.

Where the official tool crashes or gives a meaningless number, this module decides:

* With no unseen object (LVOS v1, or a subset of videos), the official J&F is NaN (the mean
  of an empty list); here the seen objects' numbers stand alone, and a note says so.
  Likewise with no seen object.
* A missing prediction or ground-truth frame raises :class:`InputError` (the official tool
  prints a message and exits with status 0); a frame range holding more frames than
  ``frame_nums`` raises :class:`DatasetError` (the official tool dies with an IndexError).
* As in :mod:`s3cli.eval.scoring`, greyscale PNGs holding only 0 and 255 are one object, id 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s3cli.errors import DatasetError, InputError
from s3cli.eval.lvos_unseen import LVOS_UNSEEN_VIDEOS
from s3cli.eval.metrics import RECALL_THRESHOLD, frame_scores
from s3cli.eval.scoring import default_workers, read_label_map, run_chunks

__all__ = [
    "LVOS_FRAME_STEP",
    "LVOS_KEYS",
    "LvosObject",
    "LvosObjectScore",
    "LvosReport",
    "find_lvos_meta",
    "read_lvos_meta",
    "score_lvos",
]

LVOS_FRAME_STEP = 5
"""LVOS releases every 5th frame; frame numbers in the meta file count the original frames."""

LVOS_KEYS = (
    "J&F-Mean",
    "J-Mean",
    "J-seen-Mean",
    "J-unseen-Mean",
    "F-Mean",
    "F-seen-Mean",
    "F-unseen-Mean",
    "V-Mean",
    "V-seen-Mean",
    "V-unseen-Mean",
)
"""The columns of the official ``global_results`` CSV, in its order."""

OBJECT_KEYS = ("J&F-Mean", "J-Mean", "F-Mean", "V-Mean")
"""Per object: the official per-sequence CSV's J-Mean, F-Mean and V-Mean, plus their J&F."""

_SERIAL_FRAMES = 40
"""Jobs with fewer frames than this are scored in this process."""


# --------------------------------------------------------------------------------------------
# The meta file


@dataclass(frozen=True)
class LvosObject:
    """One object of an LVOS video and the frames it is scored on."""

    sequence: str
    object_id: int
    position: int  # 1-based position among the video's objects in the meta file
    start: int
    end: int
    frame_nums: int

    @property
    def name(self) -> str:
        """``<seq>_<k>``: how the official per-sequence CSV names the object."""
        return f"{self.sequence}_{self.position}"

    @property
    def slots(self) -> int:
        """Number of per-frame values: ``frame_nums - 2`` (the first and last not scored)."""
        return max(self.frame_nums - 2, 0)

    def scored_frames(self, meta: Path) -> list[tuple[int, str]]:
        """``(slot, frame name)`` of every frame this object is scored on."""
        out: list[tuple[int, str]] = []
        for pos, number in enumerate(range(self.start, self.end, LVOS_FRAME_STEP)):
            if pos == 0 or pos == self.frame_nums - 1:
                continue
            if pos - 1 >= self.slots:
                raise DatasetError(
                    f"{meta}: video {self.sequence} object {self.object_id}: frame_range "
                    f"{self.start}..{self.end} holds more than frame_nums={self.frame_nums} "
                    "frames (fix the meta file)"
                )
            out.append((pos - 1, f"{number:08d}"))
        return out


def find_lvos_meta(folder: Path | str) -> Path | None:
    """The meta file of an LVOS split folder: ``<split>_meta.json`` or ``meta.json``."""
    folder = Path(folder)
    for path in (folder / f"{folder.name}_meta.json", folder / "meta.json"):
        if path.is_file():
            return path
    found = sorted(folder.glob("*_meta.json")) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def _int(value: Any, where: str, meta: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{meta}: {where} is {value!r}, not a frame number") from None


def read_lvos_meta(meta: Path | str) -> dict[str, list[LvosObject]]:
    """Video name -> its objects in meta-file order, videos sorted by name."""
    meta = Path(meta)
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(
            f"{meta}: LVOS meta file not found (pass the split's *_meta.json)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{meta}: cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta}: is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    videos = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(videos, dict) or not videos:
        raise DatasetError(f'{meta}: has no "videos" object (not an LVOS meta file)')
    out: dict[str, list[LvosObject]] = {}
    for seq in sorted(videos):
        objects = videos[seq].get("objects") if isinstance(videos[seq], dict) else None
        if not isinstance(objects, dict):
            raise DatasetError(f'{meta}: video {seq} has no "objects" (not an LVOS meta file)')
        entries = []
        for position, (key, obj) in enumerate(objects.items(), start=1):
            fr = obj.get("frame_range") if isinstance(obj, dict) else None
            if not isinstance(fr, dict) or not {"start", "end", "frame_nums"} <= set(fr):
                raise DatasetError(
                    f"{meta}: video {seq} object {key} has no frame_range with start, end and "
                    "frame_nums (LVOS scoring needs them; is this the split's meta file?)"
                )
            where = f"video {seq} object {key}"
            entries.append(
                LvosObject(
                    sequence=seq,
                    object_id=_int(key, f"{where} id", meta),
                    position=position,
                    start=_int(fr["start"], f"{where} start", meta),
                    end=_int(fr["end"], f"{where} end", meta),
                    frame_nums=_int(fr["frame_nums"], f"{where} frame_nums", meta),
                )
            )
        out[seq] = entries
    return out


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class LvosObjectScore:
    """One object's per-frame values (``frame_nums - 2`` slots) and its numbers."""

    name: str
    sequence: str
    object_id: int
    unseen: bool
    frames: tuple[str, ...]  # the frames that filled the slots, in slot order
    j: tuple[float, ...]
    f: tuple[float, ...]
    j_mean: float
    j_recall: float
    f_mean: float
    f_recall: float
    v: float

    def as_dict(self) -> dict[str, float]:
        return dict(
            zip(OBJECT_KEYS, ((self.j_mean + self.f_mean) / 2, self.j_mean, self.f_mean, self.v),
                strict=True)
        )


@dataclass(frozen=True)
class LvosReport:
    """The result of :func:`score_lvos`."""

    gt_root: Path
    pred_root: Path
    meta: Path
    objects: tuple[LvosObjectScore, ...]
    summary: dict[str, float]  # LVOS_KEYS
    notes: tuple[str, ...] = ()
    num_frames: int = 0  # distinct frames read


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if values.size and not np.isnan(values).all() else math.nan


def _variation(j: np.ndarray, f: np.ndarray) -> float:
    """V: the official ``sqrt(round(mean squared deviation of (J+F)/2, 4))``."""
    jf = (j + f) / 2
    if jf.size == 0:
        return math.nan
    dev = np.float64(np.nansum((_nanmean(jf) - jf) ** 2) / jf.size)
    return math.sqrt(float(np.round(dev, 4)))


def _object_score(obj: LvosObject, frames: list[str], j: np.ndarray, f: np.ndarray,
                  unseen: bool) -> LvosObjectScore:
    return LvosObjectScore(
        name=obj.name,
        sequence=obj.sequence,
        object_id=obj.object_id,
        unseen=unseen,
        frames=tuple(frames),
        j=tuple(float(x) for x in j),
        f=tuple(float(x) for x in f),
        j_mean=_nanmean(j),
        j_recall=float(np.mean(j > RECALL_THRESHOLD)) if j.size else math.nan,
        f_mean=_nanmean(f),
        f_recall=float(np.mean(f > RECALL_THRESHOLD)) if f.size else math.nan,
        v=_variation(j, f),
    )


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return float(np.mean(np.asarray(v, dtype=np.float64))) if v else math.nan


def _summary(objects: Sequence[LvosObjectScore]) -> tuple[dict[str, float], list[str]]:
    groups = {
        "seen": [o for o in objects if not o.unseen],
        "unseen": [o for o in objects if o.unseen],
    }
    out: dict[str, float] = {}
    for letter, attr in (("J", "j_mean"), ("F", "f_mean"), ("V", "v")):
        means = {g: _mean(getattr(o, attr) for o in objs) for g, objs in groups.items()}
        present = [means[g] for g, objs in groups.items() if objs]
        out[f"{letter}-Mean"] = sum(present) / len(present) if present else math.nan
        out[f"{letter}-seen-Mean"] = means["seen"]
        out[f"{letter}-unseen-Mean"] = means["unseen"]
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    notes = []
    if objects and not (groups["seen"] and groups["unseen"]):
        missing = "unseen" if groups["seen"] else "seen"
        notes.append(
            f"no object is in a {missing} video, so J&F, J, F and V are the "
            f"{'seen' if missing == 'unseen' else 'unseen'} objects' means (the official tool "
            "reports NaN)"
        )
    return {k: out[k] for k in LVOS_KEYS}, notes


# --------------------------------------------------------------------------------------------
# Work units


@dataclass(frozen=True)
class _Chunk:
    """Frames of one video, each with the object ids scored in it."""

    seq: str
    gt_dir: str
    pred_dir: str
    names: tuple[str, ...]  # frame names
    ids: tuple[tuple[int, ...], ...]  # per frame


def _score_chunk(chunk: _Chunk) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    gt_dir, pred_dir = Path(chunk.gt_dir), Path(chunk.pred_dir)
    for name, ids in zip(chunk.names, chunk.ids, strict=True):
        gt = read_label_map(gt_dir / f"{name}.png", ground_truth=True)
        pred_path = pred_dir / f"{name}.png"
        try:
            pred = read_label_map(pred_path, ground_truth=False)
        except InputError as exc:
            if pred_path.exists():
                raise
            raise InputError(
                f"{pred_path}: prediction mask not found (LVOS scores every 5th frame of each "
                "object's frame range, so those frames need a prediction PNG)"
            ) from exc
        if pred.shape != gt.shape:
            raise InputError(
                f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} pixels but the "
                f"ground truth is {gt.shape[1]}x{gt.shape[0]} (save predictions at the "
                "ground-truth resolution; no resizing is done)"
            )
        out.append(frame_scores(gt, pred, list(ids)))
    return out


# --------------------------------------------------------------------------------------------
# Entry point


def score_lvos(
    gt_root: Path | str,
    pred_root: Path | str,
    meta: Path | str,
    *,
    unseen: Iterable[str] | None = None,
    workers: int | None = None,
    sequences: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LvosReport:
    """Score ``pred_root`` against ``gt_root`` (both ``<seq>/<8-digit frame>.png``) with the
    LVOS protocol, objects and frame ranges from ``meta``.

    ``unseen`` names the unseen videos (default: LVOS's list). ``sequences`` restricts scoring
    to those videos of the meta file. ``workers`` and ``progress`` as in
    :func:`s3cli.eval.scoring.score_folders`. Nothing is written anywhere.
    """
    gt_root, pred_root, meta = Path(gt_root), Path(pred_root), Path(meta)
    videos = read_lvos_meta(meta)
    unseen_set = frozenset(LVOS_UNSEEN_VIDEOS if unseen is None else unseen)
    if sequences is not None:
        missing = [s for s in sequences if s not in videos]
        if missing:
            raise DatasetError(f"{meta}: video {missing[0]} is not listed (check --sequences)")
        videos = {s: videos[s] for s in dict.fromkeys(sequences)}
    if not gt_root.is_dir():
        raise DatasetError(f"{gt_root}: ground-truth folder not found (pass LVOS's Annotations)")
    if not pred_root.is_dir():
        raise InputError(
            f"{pred_root}: prediction folder not found (pass the folder that holds one "
            "sub-folder of PNG masks per video)"
        )

    # Each object's (slot, frame) list, and each frame's object ids.
    plans: dict[str, list[tuple[LvosObject, list[tuple[int, str]]]]] = {}
    chunks: list[_Chunk] = []
    total = 0
    for seq, objects in videos.items():
        plans[seq] = [(o, o.scored_frames(meta)) for o in objects]
        per_frame: dict[str, list[int]] = {}
        for obj, frames in plans[seq]:
            for _, name in frames:
                per_frame.setdefault(name, []).append(obj.object_id)
        if per_frame and not (pred_root / seq).is_dir():
            raise InputError(
                f"{pred_root / seq}: no predictions for video '{seq}' (the prediction folder "
                "needs one sub-folder per video, with PNGs named like the ground truth)"
            )
        names = sorted(per_frame)
        total += len(names)
        for i in range(0, len(names), 16):
            part = tuple(names[i : i + 16])
            chunks.append(
                _Chunk(seq, str(gt_root / seq), str(pred_root / seq), part,
                       tuple(tuple(per_frame[n]) for n in part))
            )

    if workers is None:
        n_workers = default_workers() if total >= _SERIAL_FRAMES else 1
    else:
        n_workers = int(workers)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results = run_chunks(chunks, min(n_workers, max(len(chunks), 1)), total, progress,
                         _score_chunk)

    scores: dict[tuple[str, str, int], tuple[float, float]] = {}
    for chunk, res in zip(chunks, results, strict=True):
        for name, ids, (j, f) in zip(chunk.names, chunk.ids, res, strict=True):
            for k, obj_id in enumerate(ids):
                scores[(chunk.seq, name, obj_id)] = (float(j[k]), float(f[k]))

    out: list[LvosObjectScore] = []
    notes: list[str] = []
    for seq, objects in plans.items():
        for obj, frames in objects:
            j = np.zeros(obj.slots, dtype=np.float64)
            f = np.zeros(obj.slots, dtype=np.float64)
            for slot, name in frames:
                j[slot], f[slot] = scores[(seq, name, obj.object_id)]
            if len(frames) < obj.slots:
                notes.append(
                    f"{meta}: {obj.name}: frame_range holds {len(frames)} scored frames but "
                    f"frame_nums asks for {obj.slots}; the rest count as 0, as officially"
                )
            if obj.slots == 0:
                notes.append(f"{meta}: {obj.name}: frame_nums {obj.frame_nums} leaves no frame "
                             "to score (its numbers are NaN)")
            out.append(_object_score(obj, [n for _, n in frames], j, f, seq in unseen_set))
    summary, more = _summary(out)
    return LvosReport(
        gt_root=gt_root,
        pred_root=pred_root,
        meta=meta,
        objects=tuple(out),
        summary=summary,
        notes=tuple(notes + more),
        num_frames=total,
    )
