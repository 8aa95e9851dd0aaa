"""Benchmark layouts and their evaluation protocols, as Cutie's ``eval_vos.py`` runs them.

:func:`load_dataset` reads a dataset folder into a :class:`Dataset`: its sequences (frames, given
masks, the frames to write) and its :class:`Protocol`. Nothing is run and nothing is written; a
folder without the expected layout raises :class:`~s3cli.errors.DatasetError`.

=========  ===================================================  ======================  =======
dataset    layout under ``--root``                               input masks             writes
=========  ===================================================  ======================  =======
davis16    ``JPEGImages/480p/<seq>``, ``Annotations/480p/<seq>``  first mask only         all
davis17    same; sequences from ``ImageSets/2016|2017/<split>``  first mask only         all
ytvos18/19 ``<split>/JPEGImages|Annotations/<seq>``, ``meta.json``  every given mask     meta.json
mose       ``<split>/JPEGImages|Annotations/<seq>``              first mask only         all
lvos       ``<split>/JPEGImages|Annotations/<seq>``, meta        first mask of objects   all
generic    ``JPEGImages/<seq>``, ``Annotations/<seq>``           first mask of objects   all
=========  ===================================================  ======================  =======

Protocol details (Cutie's ``config/eval_config.yaml``, ``inference/data/vos_test_dataset.py``,
``video_reader.py``, ``inference/utils/results_utils.py``):

* Every benchmark is run with the shorter side at most 480 pixels and a memory frame every 5
  frames; masks are written at the frames' own size. Long-term memory is off for DAVIS,
  YouTube-VOS and MOSE, on for LVOS (long videos) and generic folders.
* DAVIS: the sequences are the lines of ``ImageSets/2017/<split>.txt`` (``ImageSets/2016`` for
  davis16; the original DAVIS-2016 ``ImageSets/480p/<split>.txt`` frame lists are understood too),
  or every annotated sequence when the file is absent. Only the first mask is read; every frame is
  written. With dense annotations (``val``) they are the ground truth; test-dev gets a zip of
  ``<seq>/<frame>.png``.
* YouTube-VOS 2018 and 2019 share one protocol; only the data differ. Every mask in
  ``Annotations`` is used (objects appear later, a mask names only its new objects); only the
  frames that ``meta.json`` lists for some object are written, and the submission zip holds
  ``Annotations/<seq>/<frame>.png``. The dense 30 fps frames of ``all_frames/<split>_all_frames/
  JPEGImages`` are used when present (Cutie's setting), else ``<split>/JPEGImages``.
* MOSE: the first mask of each sequence (its first PNG); the zip holds ``<seq>/<frame>.png``.
* LVOS: each object starts from the mask where it first appears: ``Annotations_first_only``
  when present (Cutie's preprocessed copy), else ``Annotations`` reduced to those first masks;
  every frame is written and the zip holds ``Annotations/<seq>/<frame>.png``. ``<split>_meta.json``
  or ``meta.json`` lists the sequences when present. When that meta file gives every object's
  frame range and ``Annotations`` holds the masks inside them (the valid split), the
  predictions are scored with LVOS's own protocol (:mod:`s3cli.eval.lvos_scoring`).
* generic: like LVOS; the annotations are also the ground truth when every frame from the first
  annotated one has a mask.

Frames before a sequence's first mask are not processed (Cutie skips them too).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from s3cli.errors import DatasetError
from s3cli.io.video import IMAGE_SUFFIXES, natural_key

__all__ = [
    "DATASETS",
    "DEFAULT_SPLITS",
    "Dataset",
    "MaskUse",
    "Protocol",
    "Sequence",
    "ZipLayout",
    "load_dataset",
]

log = logging.getLogger(__name__)

DATASETS = ("davis16", "davis17", "ytvos18", "ytvos19", "mose", "lvos", "generic")
"""The names ``--dataset`` accepts."""

DEFAULT_SPLITS: dict[str, str | None] = {
    "davis16": "val",
    "davis17": "val",
    "ytvos18": "valid",
    "ytvos19": "valid",
    "mose": "valid",
    "lvos": "valid",
    "generic": None,
}
"""The split used when ``--split`` is not given (``None``: the dataset has no splits)."""

MaskUse = Literal["first", "all", "first-appearance"]
"""How given masks are used: only the first mask file of a sequence (DAVIS, MOSE); every mask
file (YouTube-VOS); each object's mask at the frame where it first appears (LVOS, generic)."""

ZipLayout = Literal["annotations", "flat"]
"""Submission zip entries: ``Annotations/<seq>/<frame>.png`` or ``<seq>/<frame>.png``."""


@dataclass(frozen=True)
class Protocol:
    """How a benchmark is run: Cutie's per-dataset settings."""

    size: str = "480"
    mem_every: int = 5
    long_term: bool = False
    masks: MaskUse = "first"


@dataclass(frozen=True)
class Sequence:
    """One video of a dataset.

    ``frames`` are the frame names (file stems) in processing order, ``mask_frames`` the names of
    the given masks in ``masks`` (sorted, a subset of ``frames``); processing starts at the first
    of them. ``save`` names the frames to write (``None``: every processed frame).
    """

    name: str
    images: Path
    frames: tuple[str, ...]
    masks: Path
    mask_frames: tuple[str, ...]
    save: frozenset[str] | None = None

    @property
    def start(self) -> int:
        """Index in ``frames`` of the first given mask."""
        return self.frames.index(self.mask_frames[0])

    @property
    def first_mask(self) -> Path:
        return self.masks / f"{self.mask_frames[0]}.png"

    @property
    def expected_outputs(self) -> tuple[str, ...]:
        """The frame names a finished run has written, in order."""
        processed = self.frames[self.start :]
        if self.save is None:
            return processed
        return tuple(f for f in processed if f in self.save)


@dataclass(frozen=True)
class Dataset:
    """A dataset folder read by :func:`load_dataset`."""

    name: str
    split: str | None
    root: Path
    protocol: Protocol
    sequences: tuple[Sequence, ...]
    ground_truth: Path | None
    """Folder of ``<seq>/<frame>.png`` ground truth to score against, or ``None``."""
    zip_layout: ZipLayout | None
    """The submission zip's layout, or ``None`` when the benchmark takes no zip."""
    notes: tuple[str, ...] = ()
    lvos_meta: Path | None = None
    """LVOS: the meta file whose frame ranges the ground truth is scored over (LVOS's protocol
    instead of DAVIS's); ``None`` for the other datasets."""

    @property
    def label(self) -> str:
        """``davis17-val``, ``generic``: names the outputs."""
        return f"{self.name}-{self.split}" if self.split else self.name


_PROTOCOLS: dict[str, Protocol] = {
    "davis16": Protocol(),
    "davis17": Protocol(),
    "ytvos18": Protocol(masks="all"),
    "ytvos19": Protocol(masks="all"),
    "mose": Protocol(),
    "lvos": Protocol(long_term=True, masks="first-appearance"),
    "generic": Protocol(long_term=True, masks="first-appearance"),
}

_SPLIT_ALIASES = {"val": "valid", "valid": "val"}


# --------------------------------------------------------------------------------------------
# Folder helpers


def _require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "not found"
        raise DatasetError(f"{path}: {what} {state} ({hint})")
    return path


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _frame_names(folder: Path) -> tuple[str, ...]:
    """Stems of the image files of ``folder`` in the order :class:`FolderSource` reads them."""
    files = sorted(
        (
            p.name
            for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()  # as FolderSource lists them
        ),
        key=natural_key,
    )
    return tuple(Path(f).stem for f in files)


def _mask_names(folder: Path) -> tuple[str, ...]:
    files = sorted(
        (
            p.name
            for p in folder.iterdir()
            if p.suffix.lower() == ".png" and p.is_file() and not p.name.startswith(".")
        ),
        key=natural_key,
    )
    return tuple(Path(f).stem for f in files)


def _guess(root: Path) -> str:
    """A hint naming the layout ``root`` seems to have."""
    if (root / "JPEGImages" / "480p").is_dir():
        return "it looks like a DAVIS root: use --dataset davis16 or davis17"
    for split in ("valid", "test", "train"):
        if (root / split / "JPEGImages").is_dir():
            return (
                f"it holds {split}/JPEGImages: use --dataset ytvos18, ytvos19, mose or lvos "
                f"with --split {split}"
            )
    if (root / "JPEGImages").is_dir() and (root / "Annotations").is_dir():
        return "it holds JPEGImages and Annotations: use --dataset generic"
    return "pass the folder that holds the dataset's JPEGImages and Annotations"


def _sequence(
    name: str,
    images: Path,
    masks: Path,
    *,
    save: frozenset[str] | None = None,
) -> Sequence:
    img_dir = _require_dir(images / name, "frame folder", "every sequence needs its frames")
    mask_dir = _require_dir(masks / name, "mask folder", "every sequence needs its given masks")
    frames = _frame_names(img_dir)
    if not frames:
        raise DatasetError(
            f"{img_dir}: no image frames in this sequence folder (add its jpg or png frames)"
        )
    if len(set(frames)) != len(frames):
        raise DatasetError(
            f"{img_dir}: two frames share a name with different extensions (keep one per frame)"
        )
    mask_frames = _mask_names(mask_dir)
    if not mask_frames:
        raise DatasetError(
            f"{mask_dir}: no PNG masks (the first frame of each object needs a mask)"
        )
    known = set(frames)
    stray = [m for m in mask_frames if m not in known]
    if stray:
        raise DatasetError(
            f"{mask_dir / (stray[0] + '.png')}: no frame of this name in {img_dir} (masks are "
            "named like the frames they annotate)"
        )
    if save is not None:
        missing = sorted(save - known, key=natural_key)
        if missing:
            raise DatasetError(
                f"{img_dir}: frame {missing[0]} is listed in the meta file but missing here "
                "(the frame folder is incomplete)"
            )
    return Sequence(name, img_dir, frames, mask_dir, mask_frames, save)


def _select(names: list[str], wanted: Iterable[str] | None, where: Path) -> list[str]:
    if wanted is None:
        return names
    chosen = list(dict.fromkeys(w.strip() for w in wanted if w.strip()))
    if not chosen:
        raise DatasetError(f"{where}: --sequences names no sequence (give names separated by ,)")
    available = set(names)
    unknown = [w for w in chosen if w not in available]
    if unknown:
        sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise DatasetError(
            f"{where}: no sequence named {unknown[0]} in this split (choose from {sample})"
        )
    return chosen


def _is_dense(seq: Sequence) -> bool:
    """A mask at every frame from the first annotated one: annotations that are ground truth."""
    return len(seq.mask_frames) >= 3 and set(seq.frames[seq.start :]) <= set(seq.mask_frames)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot be read: {exc.strerror or exc} (check the file and its permissions)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(
            f"{path}: is not valid JSON ({exc}) (restore the original file)"
        ) from None
    videos = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(videos, dict):
        raise DatasetError(
            f"{path}: has no \"videos\" mapping (expected the dataset's meta file: "
            '{"videos": {"<seq>": {"objects": {...}}}})'
        )
    return videos


def _meta_frames(meta_path: Path, videos: dict, name: str) -> frozenset[str]:
    """YouTube-VOS: the frames some object of ``name`` lists (those the server scores)."""
    entry = videos.get(name)
    objects = entry.get("objects") if isinstance(entry, dict) else None
    if not isinstance(objects, dict):
        raise DatasetError(
            f"{meta_path}: sequence {name} is not listed with its objects (use the meta.json of "
            "the same split as the Annotations folder)"
        )
    frames: set[str] = set()
    for obj_id, obj in objects.items():
        listed = obj.get("frames") if isinstance(obj, dict) else None
        if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
            raise DatasetError(
                f"{meta_path}: object {obj_id} of sequence {name} has no \"frames\" list of "
                "frame names (expected YouTube-VOS's meta.json)"
            )
        frames.update(listed)
    if not frames:
        raise DatasetError(
            f"{meta_path}: sequence {name} lists no frames to write (restore the original file)"
        )
    return frozenset(frames)


# --------------------------------------------------------------------------------------------
# Layouts


def _davis(
    name: str, root: Path, split: str, explicit: bool, wanted: Iterable[str] | None
) -> Dataset:
    hint = f"{_guess(root)}; DAVIS holds JPEGImages/480p and Annotations/480p"
    images = _require_dir(root / "JPEGImages" / "480p", "DAVIS frame folder", hint)
    masks = _require_dir(root / "Annotations" / "480p", "DAVIS annotation folder", hint)
    year = "2016" if name == "davis16" else "2017"
    candidates = [root / "ImageSets" / year / f"{split}.txt"]
    if name == "davis16":
        candidates.append(root / "ImageSets" / "480p" / f"{split}.txt")
    if split in _SPLIT_ALIASES:
        alias = _SPLIT_ALIASES[split]
        candidates += [p.with_name(f"{alias}.txt") for p in list(candidates)]
    listing = next((p for p in candidates if p.is_file()), None)
    notes: list[str] = []
    if listing is not None:
        names = sorted(_davis_split(listing))  # sorted, as Cutie reads the file
        if not names:
            raise DatasetError(f"{listing}: lists no sequences (restore the split file)")
    elif explicit and split != DEFAULT_SPLITS[name]:
        raise DatasetError(
            f"{candidates[0]}: split file not found (add it, or leave out --split to use every "
            "annotated sequence)"
        )
    else:
        names = _subdirs(masks)
        if not names:
            raise DatasetError(f"{masks}: no sequence folders ({hint})")
        log.info("%s: no split file: using all %d annotated sequences", root, len(names))
    names = _select(names, wanted, root)
    seqs = tuple(_sequence(n, images, masks) for n in names)
    if name == "davis16":
        _check_single_object(seqs)
    dense = all(_is_dense(s) for s in seqs)
    if not dense:
        notes.append(
            f"{masks}: the annotations are not dense (first masks only), so nothing is scored; "
            "submit the zip"
        )
    return Dataset(
        name=name,
        split=split,
        root=root,
        protocol=_PROTOCOLS[name],
        sequences=seqs,
        ground_truth=masks if dense else None,
        zip_layout=None if dense else "flat",
        notes=tuple(notes),
    )


def _check_single_object(seqs: Iterable[Sequence]) -> None:
    """DAVIS 2016 annotates one object per sequence; DAVIS 2017's masks of the same sequences
    have several, and would silently turn a davis16 run into another benchmark."""
    from s3cli.io.masks import read_mask

    for seq in seqs:
        ids = read_mask(seq.first_mask, allow_empty=True).ids
        if len(ids) > 1:
            raise DatasetError(
                f"{seq.first_mask}: holds {len(ids)} objects but DAVIS 2016 annotates one (point "
                "--root at the DAVIS 2016 annotations, or use --dataset davis17)"
            )


def _davis_split(path: Path) -> list[str]:
    """Sequence names of a DAVIS split file: one name a line (2017 style) or the frame pairs of
    DAVIS 2016 (``/JPEGImages/480p/<seq>/00000.jpg /Annotations/480p/<seq>/00000.png``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read: {exc} (restore the split file)") from None
    names: list[str] = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        first = text.split()[0]
        if "/" in first:
            parts = [p for p in first.split("/") if p]
            if len(parts) < 2:
                raise DatasetError(
                    f"{path}: cannot read a sequence name from line {text!r} (one name a line)"
                )
            first = parts[-2]
        names.append(first)
    return list(dict.fromkeys(names))


def _split_folder(name: str, root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir() and split in _SPLIT_ALIASES:
        alt = root / _SPLIT_ALIASES[split]
        if alt.is_dir():
            return alt
    return _require_dir(
        folder, f"{name} split folder", f"{_guess(root)}; pass --split to choose another split"
    )


def _youtube(name: str, root: Path, split: str, wanted: Iterable[str] | None) -> Dataset:
    folder = _split_folder(name, root, split)
    split = folder.name
    masks = _require_dir(
        folder / "Annotations", "annotation folder", "YouTube-VOS holds <split>/Annotations"
    )
    dense = root / "all_frames" / f"{split}_all_frames" / "JPEGImages"
    images = dense if dense.is_dir() else folder / "JPEGImages"
    _require_dir(images, "frame folder", "YouTube-VOS holds <split>/JPEGImages")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(
            f"{meta_path}: not found (YouTube-VOS's meta.json names the frames to write; restore "
            "it from the dataset archive)"
        )
    videos = _read_json(meta_path)
    names = _subdirs(masks)
    if not names:
        raise DatasetError(f"{masks}: no sequence folders (YouTube-VOS holds <split>/Annotations)")
    names = _select(names, wanted, root)
    seqs = tuple(
        _sequence(n, images, masks, save=_meta_frames(meta_path, videos, n)) for n in names
    )
    log.info("%s: frames from %s", name, images)
    return Dataset(
        name=name,
        split=split,
        root=root,
        protocol=_PROTOCOLS[name],
        sequences=seqs,
        ground_truth=None,
        zip_layout="annotations",
        notes=(f"{name} {split} is scored by the challenge server: upload the zip",),
    )


def _mose(root: Path, split: str, wanted: Iterable[str] | None) -> Dataset:
    folder = _split_folder("mose", root, split)
    images = _require_dir(folder / "JPEGImages", "frame folder", "MOSE holds <split>/JPEGImages")
    masks = _require_dir(
        folder / "Annotations", "annotation folder", "MOSE holds <split>/Annotations"
    )
    names = _subdirs(masks)
    if not names:
        raise DatasetError(f"{masks}: no sequence folders (MOSE holds <split>/Annotations/<seq>)")
    names = _select(names, wanted, root)
    seqs = tuple(_sequence(n, images, masks) for n in names)
    return Dataset(
        name="mose",
        split=folder.name,
        root=root,
        protocol=_PROTOCOLS["mose"],
        sequences=seqs,
        ground_truth=None,
        zip_layout="flat",
        notes=(f"mose {folder.name} is scored by the challenge server: upload the zip",),
    )


def _lvos_scorable(meta: Path, truth: Path, names: Iterable[str]) -> bool:
    """Whether ``truth`` holds LVOS ground truth for ``names``: the meta file gives frame ranges
    and each object's last scored frame has a mask (the test split has first masks only)."""
    from s3cli.eval.lvos_scoring import read_lvos_meta

    try:
        videos = read_lvos_meta(meta)
        for name in names:
            for obj in videos.get(name, ()):
                frames = obj.scored_frames(meta)
                if frames and not (truth / name / f"{frames[-1][1]}.png").is_file():
                    return False
    except DatasetError:
        return False
    return all(name in videos for name in names)


def _lvos(root: Path, split: str, wanted: Iterable[str] | None) -> Dataset:
    from s3cli.eval.lvos_scoring import find_lvos_meta

    folder = _split_folder("lvos", root, split)
    split = folder.name
    images = _require_dir(folder / "JPEGImages", "frame folder", "LVOS holds <split>/JPEGImages")
    first_only = folder / "Annotations_first_only"
    masks = first_only if first_only.is_dir() else folder / "Annotations"
    _require_dir(masks, "annotation folder", "LVOS holds <split>/Annotations")
    meta_path = find_lvos_meta(folder)
    if meta_path is not None:
        names = sorted(_read_json(meta_path))
        if not names:
            raise DatasetError(f"{meta_path}: lists no sequences (restore the meta file)")
    else:
        names = _subdirs(masks)
        if not names:
            raise DatasetError(f"{masks}: no sequence folders (LVOS holds <split>/Annotations)")
    names = _select(names, wanted, root)
    seqs = tuple(_sequence(n, images, masks) for n in names)
    truth = folder / "Annotations"
    if meta_path is not None and _lvos_scorable(meta_path, truth, names):
        return Dataset(
            name="lvos",
            split=split,
            root=root,
            protocol=_PROTOCOLS["lvos"],
            sequences=seqs,
            ground_truth=truth,
            zip_layout="annotations",
            lvos_meta=meta_path,
        )
    why = (
        "it has no meta file with frame ranges"
        if meta_path is None
        else f"{truth} lacks masks inside the frame ranges of {meta_path.name}"
    )
    return Dataset(
        name="lvos",
        split=split,
        root=root,
        protocol=_PROTOCOLS["lvos"],
        sequences=seqs,
        ground_truth=None,
        zip_layout="annotations",
        notes=(f"lvos {split} is not scored here because {why}: upload the zip",),
    )


def _generic(root: Path, wanted: Iterable[str] | None) -> Dataset:
    hint = f"{_guess(root)}; generic holds JPEGImages/<seq> and Annotations/<seq>"
    images = _require_dir(root / "JPEGImages", "frame folder", hint)
    masks = _require_dir(root / "Annotations", "annotation folder", hint)
    names = _subdirs(masks)
    if not names:
        raise DatasetError(f"{masks}: no sequence folders ({hint})")
    names = _select(names, wanted, root)
    seqs = tuple(_sequence(n, images, masks) for n in names)
    dense = all(_is_dense(s) for s in seqs)
    notes = ()
    if not dense:
        notes = (
            f"{masks}: not every frame has a mask, so the annotations are inputs only and "
            "nothing is scored",
        )
    return Dataset(
        name="generic",
        split=None,
        root=root,
        protocol=_PROTOCOLS["generic"],
        sequences=seqs,
        ground_truth=masks if dense else None,
        zip_layout=None,
        notes=notes,
    )


def load_dataset(
    name: str,
    root: Path | str,
    split: str | None = None,
    sequences: Iterable[str] | None = None,
) -> Dataset:
    """Read the layout of dataset ``name`` (one of :data:`DATASETS`) under ``root``.

    ``split`` defaults to :data:`DEFAULT_SPLITS`; ``sequences`` keeps only those (in that order).
    Raises :class:`DatasetError` for a layout that does not match.
    """
    if name not in DATASETS:
        raise DatasetError(f"{name}: unknown dataset (choose one of {', '.join(DATASETS)})")
    root = Path(root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "not found"
        raise DatasetError(f"{root}: dataset root {state} (pass the dataset's folder with --root)")
    explicit = split is not None
    if name == "generic":
        if explicit:
            raise DatasetError(
                f"{root}: --split {split}: generic datasets have no splits (leave out --split)"
            )
        return _generic(root, sequences)
    split = split if split is not None else DEFAULT_SPLITS[name]
    assert split is not None
    if not split or "/" in split or split.startswith("."):
        raise DatasetError(f"{root}: --split {split!r} is not a split name (e.g. val, valid)")
    if name in ("davis16", "davis17"):
        return _davis(name, root, split, explicit, sequences)
    if name in ("ytvos18", "ytvos19"):
        return _youtube(name, root, split, sequences)
    if name == "mose":
        return _mose(root, split, sequences)
    return _lvos(root, split, sequences)
