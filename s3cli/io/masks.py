"""Reading first-frame masks: palette PNG, grayscale/binary PNG, or COCO RLE JSON.

Every reader returns an :class:`IndexMask`: an (H, W) int64 map whose values are object ids
(0 = background), the ids present, and the PNG palette when there was one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s3cli.errors import InputError

__all__ = [
    "IndexMask",
    "davis_palette",
    "read_mask",
    "read_png_mask",
    "read_rle_json",
    "rle_encode",
    "rle_decode",
]


@dataclass
class IndexMask:
    """An index mask: ``array`` (H, W) int64, object ``ids`` (sorted), optional palette
    (768 bytes: 256 RGB triples)."""

    array: np.ndarray
    ids: list[int]
    palette: bytes | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.array.shape[0]), int(self.array.shape[1])


def davis_palette() -> bytes:
    """The DAVIS / PASCAL VOC colour map: colour of index i from the bits of i."""
    out = bytearray()
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += bytes((r, g, b))
    return bytes(out)


def _ids(array: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(array) if v != 0]


def read_png_mask(path: Path) -> IndexMask:
    """Palette PNG -> its indices; grayscale 0/255 (or 0/1) -> one object with id 1; other
    grayscale values are ids; RGB is accepted when every colour is in the DAVIS palette."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            palette = im.getpalette() if mode == "P" else None
            if mode == "P":
                array = np.array(im)
            elif mode in ("1", "L", "I", "I;16", "LA"):
                array = np.array(im.convert("L") if mode in ("1", "LA") else im)
            elif mode in ("RGB", "RGBA"):
                array = _rgb_to_index(np.array(im.convert("RGB")), path)
            else:
                raise InputError(f"{path}: unsupported PNG mode {mode} (save a palette PNG)")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc
    array = array.astype(np.int64)
    if palette is not None and array.size and int(array.max()) >= len(palette) // 3:
        raise InputError(
            f"{path}: value {int(array.max())} has no colour in the PNG's "
            f"{len(palette) // 3}-colour palette (unknown object id; re-save the mask)"
        )
    if mode in ("1", "L", "LA") or (mode.startswith("I") and mode != "P"):
        values = set(np.unique(array).tolist())
        if values <= {0, 255} or (mode == "1"):
            array = (array > 0).astype(np.int64)
    pal = bytes(palette[:768]).ljust(768, b"\0") if palette else None
    return IndexMask(array, _ids(array), pal)


def _rgb_to_index(rgb: np.ndarray, path: Path) -> np.ndarray:
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0]
    pal = np.frombuffer(davis_palette(), dtype=np.uint8).reshape(256, 3).astype(np.int64)
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lut = {int(r << 16 | g << 8 | b): i for i, (r, g, b) in enumerate(pal)}
    colours = np.unique(code)
    unknown = [int(c) for c in colours if int(c) not in lut]
    if unknown:
        c = unknown[0]
        raise InputError(
            f"{path}: RGB mask colour #{c:06x} is not a DAVIS palette colour (save the mask as a "
            "palette or grayscale PNG)"
        )
    out = np.zeros(code.shape, dtype=np.int64)
    for c in colours:
        out[code == c] = lut[int(c)]
    return out


def rle_decode(rle: dict, where: str) -> np.ndarray:
    """A COCO RLE dict (``size`` [h, w] and ``counts``, compressed string or list) -> (H, W)
    bool."""
    from pycocotools import mask as mask_utils

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InputError(f"{where}: not a COCO RLE object (needs 'size' and 'counts')")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise InputError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
    h, w = size
    counts = rle["counts"]
    try:
        if isinstance(counts, list):
            if sum(counts) != h * w or any((not isinstance(c, int)) or c < 0 for c in counts):
                raise ValueError(f"counts sum to {sum(counts)}, expected {h * w}")
            obj = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        elif isinstance(counts, str | bytes):
            obj = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise ValueError("'counts' must be a string or a list of integers")
        decoded = mask_utils.decode(obj)
    except InputError:
        raise
    except Exception as exc:  # pycocotools raises bare exceptions on bad strings
        raise InputError(f"{where}: invalid RLE ({exc})") from exc
    if decoded.shape != (h, w):
        raise InputError(f"{where}: invalid RLE (decodes to {decoded.shape}, size says {h}x{w})")
    if isinstance(counts, str | bytes):
        # A damaged string may still decode; its pixel total must match.
        area = int(mask_utils.area(obj))
        if area != int(decoded.sum()):
            raise InputError(f"{where}: invalid RLE (inconsistent counts)")
    return decoded.astype(bool)


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO compressed RLE ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def read_rle_json(path: Path) -> IndexMask:
    """``{"size", "counts"}`` (object 1), a list of them (objects 1..n) or a dict of object id
    -> RLE. Later objects win where masks overlap."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from exc
    if isinstance(data, dict) and "counts" in data:
        items = [(1, data)]
    elif isinstance(data, list):
        items = [(i + 1, r) for i, r in enumerate(data)]
    elif isinstance(data, dict):
        items = []
        for k, r in data.items():
            try:
                obj_id = int(k)
            except ValueError:
                raise InputError(f"{path}: object id {k!r} is not an integer") from None
            if not 0 < obj_id < 2**31:
                raise InputError(f"{path}: object id {obj_id} must be positive")
            items.append((obj_id, r))
    else:
        raise InputError(f"{path}: expected an RLE object, a list or a dict of them")
    if not items:
        raise InputError(f"{path}: holds no RLE masks")
    array: np.ndarray | None = None
    for obj_id, rle in items:
        m = rle_decode(rle, f"{path} (object {obj_id})")
        if array is None:
            array = np.zeros(m.shape, dtype=np.int64)
        elif m.shape != array.shape:
            raise InputError(f"{path}: object {obj_id} is {m.shape}, others {array.shape}")
        array[m] = obj_id
    assert array is not None
    return IndexMask(array, _ids(array))


def read_mask(path: str | Path, *, allow_empty: bool = False) -> IndexMask:
    """Read a mask file (``.png`` or ``.json``); an empty mask is an error unless allowed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such mask file")
    if path.suffix.lower() == ".json":
        mask = read_rle_json(path)
    else:
        mask = read_png_mask(path)
    if not mask.ids and not allow_empty:
        raise InputError(f"{path}: the mask is empty (no object pixels; 0 is background)")
    return mask
