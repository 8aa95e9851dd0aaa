"""Training data: DAVIS / YouTube-VOS-layout readers, sequence sampling and augmentation.

Layouts (``--data KIND=DIR``):

* ``davis``: ``DIR/JPEGImages/480p/<seq>/*.jpg`` and ``DIR/Annotations/480p/<seq>/*.png``; when
  ``DIR/ImageSets/2017/train.txt`` exists only those sequences are used (so a ``trainval`` root
  never trains on the validation sequences).
* ``ytvos``, ``mose``, ``burst``, ``ovis``, ``generic``: ``DIR/train/JPEGImages/<seq>`` and
  ``DIR/train/Annotations/<seq>``, or ``DIR/JPEGImages/<seq>`` and ``DIR/Annotations/<seq>``.

Masks are palette PNGs of object ids (or 0/255 grayscale: one object). Only frames that have both
an image and a mask are used; sequences with fewer such frames than the sequence length are left
out, as in the official code.

Sampling follows the official ``VOSMergeTrainDataset``: every (dataset, video, frame) triple is an
item (a dataset's items repeated ``repeat`` times); from the item's frame, further frames are
drawn within ``max_skip`` of any frame already drawn (max-skip in frames of the original video,
divided by the dataset's frame interval), sorted, reversed with probability 0.5; the first frame
must show an object after the crop (5 crop tries, then 5 new seed frames, then a new item). With
probability ``merge_prob`` a second sequence's objects are cut and pasted in (Gaussian-blurred
mask edges), when the first has fewer than ``num_objects``. At most ``num_objects`` objects are
kept.

Augmentation (one random draw per sequence unless said): horizontal flip; affine (rotation +-25
degrees, shear +-20 degrees, filled with the ImageNet mean colour); random resized crop to
``crop_size`` (area 36-100%, aspect 3/4-4/3) -- flip, affine and crop are composed into a single
warp; colour jitter (brightness 0.1, contrast and saturation 0.03) and greyscale (p = 0.05) per
sequence; colour jitter (brightness 0.1, contrast and saturation 0.05) per frame.

Randomness is a pure function of ``(seed, rank, iteration, slot)``, so a resumed run draws the
same samples as an uninterrupted one and any number of loader workers gives the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from s3cli.errors import DatasetError
from s3cli.io.video import natural_key
from s3cli.train.config import DATASET_KINDS, DataSpec

__all__ = [
    "IM_MEAN",
    "VideoEntry",
    "SourceDataset",
    "scan_dataset",
    "SequenceSampler",
    "VOSTrainDataset",
    "IterationSampler",
    "collate",
]

IM_MEAN = (124, 116, 104)  # fill colour of the affine transform (ImageNet mean, 0-255)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_LABELS = {
    "davis": "DAVIS",
    "ytvos": "YouTube-VOS",
    "mose": "MOSE",
    "burst": "BURST",
    "ovis": "OVIS",
    "generic": "generic",
}


# ---------------------------------------------------------------------------------- readers
@dataclass(frozen=True)
class VideoEntry:
    """One training sequence: its annotated frames (image and mask files, in order)."""

    name: str
    images: tuple[Path, ...]
    masks: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class SourceDataset:
    """A scanned dataset folder."""

    kind: str
    root: Path
    image_root: Path
    mask_root: Path
    videos: tuple[VideoEntry, ...]
    frame_interval: int
    repeat: int
    skipped_short: int = 0  # sequences with fewer annotated frames than the sequence length

    @property
    def num_frames(self) -> int:
        return sum(len(v) for v in self.videos)

    def describe(self) -> str:
        return (
            f"{_LABELS[self.kind]} {self.root}: {len(self.videos)} sequences, {self.num_frames} "
            f"frames, repeated x{self.repeat}, frame interval {self.frame_interval}"
            + (f" ({self.skipped_short} too short, left out)" if self.skipped_short else "")
        )


def _layout(kind: str, root: Path) -> tuple[Path, Path]:
    """(image root, mask root) of ``root``, or a DatasetError saying what is wrong."""
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise DatasetError(f"{root}: {what} (check --data {kind}={root})")
    if kind == "davis":
        candidates = [("JPEGImages/480p", "Annotations/480p")]
        hint = "pass the DAVIS root that holds JPEGImages/480p and Annotations/480p"
    else:
        candidates = [
            ("train/JPEGImages", "train/Annotations"),
            ("JPEGImages", "Annotations"),
        ]
        hint = f"pass the {_LABELS[kind]} root that holds train/JPEGImages and train/Annotations"
    if kind != "davis" and (root / "JPEGImages" / "480p").is_dir():
        raise DatasetError(
            f"{root}: not a {_LABELS[kind]} training layout (it looks like a DAVIS root: use "
            "--data davis=DIR)"
        )
    for images, masks in candidates:
        if (root / images).is_dir():
            if not (root / masks).is_dir():
                raise DatasetError(
                    f"{root / masks}: missing beside {root / images} (training needs the "
                    "annotation masks)"
                )
            return root / images, root / masks
    if kind == "davis" and (root / "JPEGImages").is_dir():
        hint = "JPEGImages has no 480p folder: use --data generic=DIR for this layout"
    elif kind != "davis" and (root / "valid" / "JPEGImages").is_dir():
        hint = "it holds only valid/, which has no dense annotations: pass the train split"
    raise DatasetError(f"{root}: not a {_LABELS[kind]} training layout ({hint})")


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file():
            out[p.stem] = p
    return out


def scan_dataset(spec: DataSpec, *, seq_length: int, davis_repeat: int = 5) -> SourceDataset:
    """Read the folder of ``spec`` (no image is opened); raises ``DatasetError`` for a wrong
    layout or a dataset without usable sequences."""
    kind = spec.kind
    if kind not in DATASET_KINDS:
        raise DatasetError(
            f"{spec.root}: unknown dataset kind {kind!r} (choose from {', '.join(DATASET_KINDS)})"
        )
    root = Path(spec.root)
    image_root, mask_root = _layout(kind, root)
    interval, repeat = DATASET_KINDS[kind]
    if kind == "davis":
        repeat = davis_repeat
    interval = spec.frame_interval or interval
    repeat = spec.repeat or repeat

    names = sorted(
        (p.name for p in image_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=natural_key,
    )
    subset_file = root / "ImageSets" / "2017" / "train.txt"
    if kind == "davis" and subset_file.is_file():
        wanted = [ln.strip() for ln in subset_file.read_text().splitlines() if ln.strip()]
        missing = [w for w in wanted if not (image_root / w).is_dir()]
        if missing:
            raise DatasetError(
                f"{image_root / missing[0]}: listed in {subset_file} but missing (the DAVIS "
                "folder is incomplete)"
            )
        names = wanted
    if not names:
        raise DatasetError(f"{image_root}: no sequence folders (expected one folder per video)")

    videos: list[VideoEntry] = []
    short = 0
    for name in names:
        mask_dir = mask_root / name
        if not mask_dir.is_dir():
            raise DatasetError(
                f"{mask_dir}: missing (every training sequence in {image_root} needs its masks)"
            )
        images = _files(image_root / name, _IMAGE_SUFFIXES)
        masks = _files(mask_dir, (".png",))
        if not images:
            raise DatasetError(f"{image_root / name}: no image frames (jpg or png)")
        if not masks:
            raise DatasetError(f"{mask_dir}: no PNG masks (training needs annotated frames)")
        stems = sorted(set(images) & set(masks), key=natural_key)
        if not stems:
            raise DatasetError(
                f"{mask_dir}: no mask is named like a frame of {image_root / name} (masks are "
                "named like the frames they annotate, e.g. 00000.png for 00000.jpg)"
            )
        if len(stems) < seq_length:
            short += 1
            continue
        videos.append(
            VideoEntry(name, tuple(images[s] for s in stems), tuple(masks[s] for s in stems))
        )
    if not videos:
        raise DatasetError(
            f"{image_root}: no sequence has {seq_length} annotated frames (lower --seq-length "
            "or check the masks)"
        )
    return SourceDataset(kind, root, image_root, mask_root, tuple(videos), interval, repeat,
                         short)


# ---------------------------------------------------------------------------------- file I/O
def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1]."""
    data = np.fromfile(str(path), dtype=np.uint8)
    im = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if im is None:
        raise DatasetError(f"{path}: not a readable image (re-extract the dataset)")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def read_label_mask(path: Path) -> np.ndarray:
    """(H, W) uint16 object ids: palette PNG indices; a 0/255 grayscale mask is object 1."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                arr = np.array(im)
            elif im.mode in ("L", "1", "I", "I;16"):
                arr = np.array(im.convert("L") if im.mode == "1" else im)
                if set(np.unique(arr).tolist()) <= {0, 255}:
                    arr = (arr > 0).astype(np.uint8)
            elif im.mode in ("RGB", "RGBA", "LA"):
                from s3cli.io.masks import read_png_mask

                arr = read_png_mask(path).array
            else:
                raise DatasetError(f"{path}: unsupported PNG mode {im.mode} (use palette PNGs)")
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: not a readable PNG mask ({exc})") from exc
    except Exception as exc:  # InputError from the RGB reader
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(str(exc)) from exc
    return arr.astype(np.uint16)


# ---------------------------------------------------------------------------------- augmentation
def _crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[float, float, float,
                                                                            float]:
    """RandomResizedCrop's box (top, left, h, w): area 36-100 %, aspect 3/4-4/3 (10 tries, then
    the whole image clipped to the aspect range)."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.36, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def geometry(rng: np.random.Generator, height: int, width: int, size: int) -> np.ndarray:
    """A 2x3 matrix mapping input pixels to the output crop: flip, then affine (rotation and
    shear about the centre), then a random resized crop to ``size`` x ``size``."""
    flip = np.eye(3)
    if rng.random() < 0.5:
        flip = np.array([[-1.0, 0, width - 1], [0, 1, 0], [0, 0, 1]])
    angle = math.radians(rng.uniform(-25, 25))
    shear = math.radians(rng.uniform(-20, 20))
    cx, cy = (width - 1) / 2, (height - 1) / 2
    rot = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    sh = np.array([[1, math.tan(shear), 0], [0, 1, 0], [0, 0, 1]])
    to_c = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    from_c = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
    affine = from_c @ rot @ sh @ to_c
    top, left, h, w = _crop_box(rng, height, width)
    sx, sy = size / w, size / h
    crop = np.array(
        [[sx, 0, (0.5 - left) * sx - 0.5], [0, sy, (0.5 - top) * sy - 0.5], [0, 0, 1]]
    )
    return (crop @ affine @ flip)[:2].astype(np.float64)


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    fill = tuple(c / 255.0 for c in IM_MEAN)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _grey(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class ColourJitter:
    """Brightness, contrast and saturation factors, applied in a random order."""

    brightness: float
    contrast: float
    saturation: float
    order: tuple[int, ...]
    greyscale: bool = False

    @classmethod
    def draw(cls, rng: np.random.Generator, brightness: float, contrast: float,
             saturation: float, greyscale_p: float = 0.0) -> ColourJitter:
        return cls(
            rng.uniform(1 - brightness, 1 + brightness),
            rng.uniform(1 - contrast, 1 + contrast),
            rng.uniform(1 - saturation, 1 + saturation),
            tuple(int(i) for i in rng.permutation(3)),
            bool(rng.random() < greyscale_p) if greyscale_p > 0 else False,
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        for op in self.order:
            if op == 0:
                image = np.clip(image * self.brightness, 0, 1)
            elif op == 1:
                mean = float(_grey(image).mean())
                image = np.clip(self.contrast * image + (1 - self.contrast) * mean, 0, 1)
            else:
                grey = _grey(image)[..., None]
                image = np.clip(self.saturation * image + (1 - self.saturation) * grey, 0, 1)
        if self.greyscale:
            image = np.repeat(_grey(image)[..., None], 3, axis=2)
        return image.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------- sampling
class SequenceSampler:
    """Draws augmented sequences ``(images (T, S, S, 3) float32, ids (T, S, S) int32)`` from the
    scanned datasets, following the official sampling rules (module docstring)."""

    max_crop_trials = 5
    max_seed_trials = 5
    max_seq_trials = 100
    max_items = 100  # new items tried before giving up on the whole dataset

    def __init__(self, sources: Sequence[SourceDataset], *, seq_length: int, crop_size: int,
                 ) -> None:
        self.sources = list(sources)
        self.seq_length = seq_length
        self.size = crop_size
        src, vid, frame = [], [], []
        for si, s in enumerate(self.sources):
            for vi, v in enumerate(s.videos):
                n = len(v)
                src.append(np.full(n * s.repeat, si, np.int32))
                vid.append(np.full(n * s.repeat, vi, np.int32))
                frame.append(np.tile(np.arange(n, dtype=np.int32), s.repeat))
        self.item_source = np.concatenate(src)
        self.item_video = np.concatenate(vid)
        self.item_frame = np.concatenate(frame)

    def __len__(self) -> int:
        return len(self.item_source)

    def _frames(self, rng: np.random.Generator, length: int, seed: int, skip: int) -> list[int]:
        picked = [seed]
        acceptable = set(range(max(0, seed - skip), min(length, seed + skip + 1))) - {seed}
        while len(picked) < self.seq_length:
            nxt = int(rng.choice(sorted(acceptable)))
            picked.append(nxt)
            acceptable |= set(range(max(0, nxt - skip), min(length, nxt + skip + 1)))
            acceptable -= set(picked)
        picked.sort()
        if rng.random() < 0.5:
            picked.reverse()
        return picked

    def draw(self, rng: np.random.Generator, item: int, max_skip: int
             ) -> tuple[np.ndarray, np.ndarray, str]:
        """An augmented sequence starting from item ``item`` (or from other items when that
        one cannot give a sequence whose first frame shows an object)."""
        for _ in range(self.max_items):
            source = self.sources[int(self.item_source[item])]
            video = source.videos[int(self.item_video[item])]
            seed_frame = int(self.item_frame[item])
            length = len(video)
            skip = max(1, min(length, max_skip // source.frame_interval))
            for _seed_trial in range(self.max_seed_trials):
                frames = self._frames(rng, length, seed_frame, skip)
                out = self._augment(rng, video, frames)
                if out is not None:
                    return out[0], out[1], video.name
                seed_frame = int(rng.integers(length))
            item = int(rng.integers(len(self)))
        raise DatasetError(
            f"{self.sources[0].root}: found no sequence whose first frame shows an object in "
            f"{self.max_items} tries (are the masks empty?)"
        )

    def _augment(self, rng: np.random.Generator, video: VideoEntry, frames: list[int]
                 ) -> tuple[np.ndarray, np.ndarray] | None:
        size = self.size
        first = read_label_mask(video.masks[frames[0]])
        h, w = first.shape
        for _ in range(self.max_crop_trials):
            matrix = geometry(rng, h, w, size)
            first_out = warp_mask(first, matrix, size)
            if first_out.any():
                break
        else:
            return None
        seq_jitter = ColourJitter.draw(rng, 0.1, 0.03, 0.03, greyscale_p=0.05)
        images = np.empty((len(frames), size, size, 3), np.float32)
        masks = np.empty((len(frames), size, size), np.int32)
        for i, f in enumerate(frames):
            mask = first if i == 0 else read_label_mask(video.masks[f])
            image = read_image(video.images[f])
            if image.shape[:2] != mask.shape:
                raise DatasetError(
                    f"{video.masks[f]}: mask is {mask.shape[1]}x{mask.shape[0]} but its frame is "
                    f"{image.shape[1]}x{image.shape[0]} (masks must match their frames)"
                )
            masks[i] = first_out if i == 0 else warp_mask(mask, matrix, size)
            image = seq_jitter(warp_image(image, matrix, size))
            images[i] = ColourJitter.draw(rng, 0.1, 0.05, 0.05)(image)
        return images, masks


def cut_and_paste(images: np.ndarray, masks: np.ndarray, images2: np.ndarray,
                  masks2: np.ndarray) -> None:
    """Paste the objects of the second sequence's first frame (and their tracks) onto the first
    sequence, in place, with Gaussian-blurred edges; pasted objects get new ids."""
    labels2 = [int(v) for v in np.unique(masks2[0]) if v != 0]
    next_id = int(masks.max()) + 1
    for l2 in labels2:
        obj = masks2 == l2  # (T, S, S)
        blur = cv2.GaussianBlur(obj.astype(np.float32).transpose(1, 2, 0), (5, 5), 1.0)
        if blur.ndim == 2:
            blur = blur[..., None]
        blur = blur.transpose(2, 0, 1)[..., None]  # (T, S, S, 1)
        images *= 1 - blur
        images += images2 * blur
        masks[obj] = next_id
        next_id += 1


# ---------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class SampleKey:
    """Identifies one training sample: iteration and position in the process's batch."""

    it: int
    slot: int


class VOSTrainDataset(Dataset):
    """Indexed by :class:`SampleKey` (see :class:`IterationSampler`); each sample is a dict:

    - ``rgb`` (T, 3, S, S) float32 in [0, 1]
    - ``first_frame_gt`` (1, N, S, S) float32: the first frame's masks of the kept objects
    - ``cls_gt`` (T, 1, S, S) int64: 0 background, k = k-th kept object
    - ``selector`` (N,) float32: 1 for a kept object, 0 for padding
    - ``num_objects`` int64
    with N = ``num_objects`` of the config.
    """

    def __init__(
        self,
        sources: Sequence[SourceDataset],
        *,
        seq_length: int,
        crop_size: int,
        num_objects: int,
        merge_prob: float,
        seed: int,
        rank: int,
        local_batch: int,
        world_size: int,
        max_skip_at: Callable[[int], int],
    ) -> None:
        self.sampler = SequenceSampler(sources, seq_length=seq_length, crop_size=crop_size)
        self.num_objects = num_objects
        self.merge_prob = merge_prob
        self.seed = seed
        self.rank = rank
        self.local_batch = local_batch
        self.world_size = world_size
        self.max_skip_at = max_skip_at
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def _item(self, key: SampleKey) -> int:
        """The item of sample ``key``: each epoch visits every item once in a seeded order, the
        global batch split among the processes (as DistributedSampler)."""
        g = (key.it * self.world_size + self.rank) * self.local_batch + key.slot
        epoch, pos = divmod(g, len(self))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self))
            self._perm_epoch = epoch
        assert self._perm is not None
        return int(self._perm[pos])

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor | str]:
        rng = np.random.default_rng([self.seed, self.rank, key.it, key.slot])
        skip = self.max_skip_at(key.it)
        images, masks, name = self.sampler.draw(rng, self._item(key), skip)
        labels = [int(v) for v in np.unique(masks[0]) if v != 0]
        if len(labels) < self.num_objects and rng.random() < self.merge_prob:
            images2, masks2, _ = self.sampler.draw(rng, int(rng.integers(len(self))), skip)
            cut_and_paste(images, masks, images2, masks2)
            labels = [int(v) for v in np.unique(masks[0]) if v != 0]
        if len(labels) > self.num_objects:
            labels = sorted(int(v) for v in rng.choice(labels, self.num_objects, replace=False))
        return make_sample(images, masks, labels, self.num_objects, name)


def make_sample(images: np.ndarray, masks: np.ndarray, labels: list[int], num_objects: int,
                name: str = "") -> dict[str, torch.Tensor | str]:
    """Tensors of one sample from (T, S, S, 3) images, (T, S, S) ids and the kept ids."""
    t, s = masks.shape[0], masks.shape[1]
    cls_gt = np.zeros((t, s, masks.shape[2]), np.int64)
    first = np.zeros((1, num_objects, s, masks.shape[2]), np.float32)
    for i, label in enumerate(labels):
        obj = masks == label
        cls_gt[obj] = i + 1
        first[0, i] = obj[0]
    selector = np.array([1.0 if i < len(labels) else 0.0 for i in range(num_objects)],
                        np.float32)
    return {
        "rgb": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        "first_frame_gt": torch.from_numpy(first),
        "cls_gt": torch.from_numpy(cls_gt[:, None]),
        "selector": torch.from_numpy(selector),
        "num_objects": torch.tensor(max(1, len(labels)), dtype=torch.int64),
        "name": name,
    }


class IterationSampler(Sampler[SampleKey]):
    """Yields the sample keys of iterations ``start .. stop - 1`` (``local_batch`` per
    iteration), so batches are a pure function of the iteration number."""

    def __init__(self, start: int, stop: int, local_batch: int) -> None:
        self.start, self.stop, self.local_batch = start, stop, local_batch

    def __iter__(self) -> Iterator[SampleKey]:
        for it in range(self.start, self.stop):
            for slot in range(self.local_batch):
                yield SampleKey(it, slot)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.local_batch


def collate(samples: list[dict[str, torch.Tensor | str]]) -> dict[str, torch.Tensor | list[str]]:
    out: dict[str, torch.Tensor | list[str]] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)  # type: ignore[arg-type]
        else:
            out[key] = [str(v) for v in values]
    return out
