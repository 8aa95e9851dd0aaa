"""``run_eval``: a model over every sequence of a benchmark with its protocol, then the score.

Outputs, under ``EvalOptions.output``::

    Annotations/<seq>/<frame>.png   predicted palette masks (the frames the protocol writes)
    Annotations/<seq>/.s3-done.json the sequence is finished: its summary and settings
    .inputs/<seq>/<frame>.png       first-appearance masks derived from dense annotations
    <dataset>-<split>.zip           the submission archive, for benchmarks scored by a server

Each sequence is written all or nothing (:func:`s3cli.api.segment_video` stages its PNGs), then
marked done; a run that stops resumes at the first sequence without a marker. A marker made with
other settings stops the run rather than mixing two models' masks. The zip is rebuilt at the end
of every run through a temporary file and a rename. Where the dataset has ground truth the
predictions are scored with :func:`s3cli.eval.scoring.score_folders` (DAVIS 2017 protocol).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from s3cli.errors import DatasetError, OutputError
from s3cli.eval.datasets import Dataset, Sequence, load_dataset

if TYPE_CHECKING:
    from s3cli.eval.lvos_scoring import LvosReport
    from s3cli.eval.scoring import ScoreReport

__all__ = [
    "DONE_MARKER",
    "EvalCallbacks",
    "EvalOptions",
    "EvalResult",
    "SequenceResult",
    "run_eval",
    "write_zip",
]

log = logging.getLogger(__name__)

DONE_MARKER = ".s3-done.json"
"""Written into a sequence's output folder once all its masks are in place (as ``s3 segment``)."""

PREDICTIONS = "Annotations"
INPUTS = ".inputs"


@dataclass
class EvalOptions:
    """One evaluation run. ``None`` settings take the dataset's protocol values."""

    dataset: str
    root: Path
    output: Path
    split: str | None = None
    sequences: list[str] | None = None
    model: str = "auto"
    weights: Path | None = None
    size: str | None = None
    mem_every: int | None = None
    top_k: int = 30
    long_term: bool | None = None
    flip: bool = False
    device: str = "auto"
    precision: str = "fp32"
    workers: int | None = None
    score: bool = True


@dataclass(frozen=True)
class SequenceResult:
    name: str
    frames: int
    seconds: float
    resumed: bool


@dataclass
class EvalResult:
    dataset: Dataset
    model: str | None
    """The model that ran (``None`` when every sequence was resumed without loading one)."""
    settings: dict[str, Any]
    predictions: Path
    sequences: list[SequenceResult]
    zip_path: Path | None = None
    report: ScoreReport | LvosReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.sequences)

    @property
    def seconds(self) -> float:
        return round(sum(s.seconds for s in self.sequences), 3)

    @property
    def fps(self) -> float:
        seconds = sum(s.seconds for s in self.sequences)
        return round(self.frames / seconds, 3) if seconds > 0 else 0.0


@dataclass
class EvalCallbacks:
    """Progress hooks for a front end; all optional."""

    sequence_start: Callable[[Sequence, int, int], None] | None = None
    """(sequence, position from 1, number of sequences), before a sequence is run."""
    frame: Callable[[int, int | None], None] | None = None
    """(frames done, frames in the sequence) while a sequence runs."""
    sequence_end: Callable[[SequenceResult, int, int], None] | None = None
    """After a sequence is run or found done."""
    scoring: Callable[[int, int], None] | None = None
    """(frames scored, frames to score)."""


# --------------------------------------------------------------------------------------------
# Markers and settings


def _settings(options: EvalOptions, dataset: Dataset) -> dict[str, Any]:
    proto = dataset.protocol
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "model": options.model,
        "weights": str(options.weights.resolve()) if options.weights is not None else None,
        "size": str(options.size if options.size is not None else proto.size),
        "mem_every": options.mem_every if options.mem_every is not None else proto.mem_every,
        "top_k": options.top_k,
        "long_term": options.long_term if options.long_term is not None else proto.long_term,
        "flip": options.flip,
        "precision": options.precision,
    }


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s: unreadable marker: the sequence is run again", path)
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_settings(marker: Path, done: dict[str, Any], settings: dict[str, Any]) -> None:
    theirs = done.get("eval")
    if not isinstance(theirs, dict):
        return  # written by `s3 segment`: taken as it is
    diff = [k for k, v in settings.items() if k in theirs and theirs[k] != v]
    if diff:
        what = ", ".join(f"{k} {theirs[k]!r} (now {settings[k]!r})" for k in diff)
        raise OutputError(
            f"{marker}: this output was made with other settings: {what} (pass another --output, "
            "or delete the folder to start again)"
        )


def _finished(seq: Sequence, folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of a finished sequence whose masks are all there, else ``None``."""
    marker = folder / DONE_MARKER
    done = _read_marker(marker)
    if done is None:
        return None
    _check_settings(marker, done, settings)
    missing = [f for f in seq.expected_outputs if not (folder / f"{f}.png").is_file()]
    if missing:
        log.warning("%s: marked done but %s.png is missing: run again", folder, missing[0])
        return None
    return done


# --------------------------------------------------------------------------------------------
# Input masks


@dataclass
class _FirstAppearances:
    """Each object's mask at the frame where it first appears (Cutie's ``preprocess_lvos.py``)."""

    masks: list[tuple[str, np.ndarray, bytes]]  # (frame, mask of only its new objects, palette)
    unchanged: bool  # the given masks already are exactly that
    late: bool  # some object appears after the first given mask


def _first_appearances(seq: Sequence) -> _FirstAppearances:
    from s3cli.io.masks import davis_palette, read_mask

    seen: set[int] = set()
    reduced: list[tuple[str, np.ndarray, bytes]] = []
    unchanged = True
    for name in seq.mask_frames:
        mask = read_mask(seq.masks / f"{name}.png", allow_empty=True)
        new = [i for i in mask.ids if i not in seen]
        if len(new) != len(mask.ids) or not new:
            unchanged = False
        if not new:
            continue
        seen.update(new)
        arr = np.where(np.isin(mask.array, new), mask.array, 0)
        reduced.append((name, arr, mask.palette or davis_palette()))
    if not reduced:
        raise DatasetError(f"{seq.masks}: the masks hold no objects (annotate at least one)")
    late = reduced[0][0] != seq.mask_frames[0] or len(reduced) > 1
    return _FirstAppearances(reduced, unchanged, late)


def _first_appearance_dir(seq: Sequence, found: _FirstAppearances, cache: Path) -> Path:
    """``seq.masks`` when its masks already are the first appearances, else a copy of those in
    ``cache/<seq>`` (rebuilt each time in a temporary folder, then renamed)."""
    from s3cli.io.outputs import write_png_atomic

    if found.unchanged:
        return seq.masks
    target = cache / seq.name
    cache.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{seq.name}.", dir=cache))
    try:
        for name, arr, palette in found.masks:
            write_png_atomic(stage / f"{name}.png", arr, palette)
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return target


def _palette(path: Path) -> bytes | None:
    from s3cli.io.masks import read_mask

    return read_mask(path, allow_empty=True).palette


# --------------------------------------------------------------------------------------------
# Zip


def write_zip(
    path: Path,
    predictions: Path,
    sequences: Iterable[Sequence],
    *,
    prefix: str = "",
) -> Path:
    """Archive ``<predictions>/<seq>/<frame>.png`` for the frames each sequence writes, as
    ``<prefix><seq>/<frame>.png``; through a temporary file and a rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for seq in sequences:
                for frame in seq.expected_outputs:
                    src = predictions / seq.name / f"{frame}.png"
                    if not src.is_file():
                        raise OutputError(
                            f"{src}: prediction missing for the zip (delete "
                            f"{predictions / seq.name / DONE_MARKER} and run again)"
                        )
                    zf.write(src, f"{prefix}{seq.name}/{frame}.png")
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
        raise
    return path


# --------------------------------------------------------------------------------------------
# Entry point


def run_eval(options: EvalOptions, callbacks: EvalCallbacks | None = None) -> EvalResult:
    """Run ``options.dataset`` under ``options.root`` and score it where it has ground truth."""
    from s3cli.api import SegmentOptions, load_tracking_model, resolve_device, segment_video
    from s3cli.io.outputs import OutputOptions

    cb = callbacks or EvalCallbacks()
    dataset = load_dataset(options.dataset, options.root, options.split, options.sequences)
    settings = _settings(options, dataset)
    output = Path(options.output)
    predictions = output / PREDICTIONS
    given = {s.masks.parent for s in dataset.sequences}
    if dataset.ground_truth is not None:
        given.add(dataset.ground_truth)
    if any(_same(g, predictions) for g in given):
        raise OutputError(
            f"{output}: predictions would overwrite the dataset's masks (pass another --output)"
        )
    try:
        predictions.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{predictions}: cannot be created ({exc.strerror or exc}) (pass another --output)"
        ) from None

    device = None
    network: Any = None
    model_name: str | None = None
    scans: dict[str, _FirstAppearances] = {}
    results: list[SequenceResult] = []
    total = len(dataset.sequences)
    for pos, seq in enumerate(dataset.sequences, start=1):
        folder = predictions / seq.name
        done = _finished(seq, folder, settings)
        if done is not None:
            res = SequenceResult(
                seq.name, int(done.get("frames", 0)), float(done.get("seconds", 0.0)), True
            )
            log.info("%s: done earlier, skipped", seq.name)
            model_name = model_name or done.get("model")
            results.append(res)
            if cb.sequence_end is not None:
                cb.sequence_end(res, pos, total)
            continue
        if cb.sequence_start is not None:
            cb.sequence_start(seq, pos, total)
        if network is None:
            device = resolve_device(options.device)
            network, model_name = load_tracking_model(options.model, options.weights, device)
        assert device is not None
        use = dataset.protocol.masks
        mask = mask_dir = None
        palette = None
        if use == "first":
            mask = seq.first_mask
        else:
            if use == "all":
                mask_dir = seq.masks
            else:
                found = scans[seq.name] = _first_appearances(seq)
                mask_dir = _first_appearance_dir(seq, found, output / INPUTS)
            palette = _palette(seq.first_mask)
        seg = SegmentOptions(
            source=seq.images,
            mask=mask,
            mask_frame=seq.start,
            mask_dir=mask_dir,
            model=options.model,
            weights=options.weights,
            size=settings["size"],
            mem_every=settings["mem_every"],
            top_k=settings["top_k"],
            long_term=settings["long_term"],
            flip=settings["flip"],
            device=device,
            precision=settings["precision"],
            start=seq.start,
            outputs=OutputOptions(masks_dir=folder, palette=palette, only_frames=seq.save),
        )
        summary = segment_video(seg, on_frame=cb.frame, network=network, model_name=model_name)
        _write_marker(folder / DONE_MARKER, {**summary.to_dict(), "eval": settings})
        res = SequenceResult(seq.name, summary.frames, summary.seconds, False)
        log.info("%s: %d frames in %.1f s", seq.name, summary.frames, summary.seconds)
        results.append(res)
        if cb.sequence_end is not None:
            cb.sequence_end(res, pos, total)

    result = EvalResult(
        dataset=dataset,
        model=model_name,
        settings=settings,
        predictions=predictions,
        sequences=results,
        notes=list(dataset.notes),
    )
    if dataset.zip_layout is not None:
        prefix = f"{PREDICTIONS}/" if dataset.zip_layout == "annotations" else ""
        result.zip_path = write_zip(
            output / f"{dataset.label}.zip", predictions, dataset.sequences, prefix=prefix
        )
        if options.sequences is not None:
            result.notes.append(
                f"{result.zip_path}: holds only the {total} sequence(s) chosen with --sequences"
            )
    late = []
    lvos = dataset.lvos_meta is not None  # LVOS scores objects over their own frame ranges
    if (
        not lvos
        and dataset.ground_truth is not None
        and dataset.protocol.masks == "first-appearance"
    ):
        late = [
            s.name
            for s in dataset.sequences
            if (scans[s.name] if s.name in scans else _first_appearances(s)).late
        ]
    if late:
        result.notes.append(
            f"{dataset.ground_truth / late[0]}: objects appear after the first annotated frame, "
            "which the DAVIS protocol cannot score, so nothing is scored (score sequences whose "
            "objects are all in their first mask)"
        )
    elif options.score and lvos:
        from s3cli.eval.lvos_scoring import score_lvos

        assert dataset.ground_truth is not None and dataset.lvos_meta is not None
        result.report = score_lvos(
            dataset.ground_truth,
            predictions,
            dataset.lvos_meta,
            workers=options.workers,
            sequences=[s.name for s in dataset.sequences],
            progress=cb.scoring,
        )
    elif options.score and dataset.ground_truth is not None:
        from s3cli.eval.scoring import score_folders

        result.report = score_folders(
            dataset.ground_truth,
            predictions,
            workers=options.workers,
            sequences=[s.name for s in dataset.sequences],
            progress=cb.scoring,
        )
    return result


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
