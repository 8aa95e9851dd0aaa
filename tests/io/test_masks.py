"""Mask readers: palette, grayscale and RGB PNGs, COCO RLE JSON, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s3cli.errors import InputError
from s3cli.io.masks import davis_palette, read_mask, rle_decode, rle_encode


def _palette_png(path: Path, arr: np.ndarray, palette: bytes | None = None) -> Path:
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(palette or davis_palette())
    im.save(path)
    return path


def test_davis_palette_colours() -> None:
    pal = davis_palette()
    assert pal[:12] == bytes([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0])
    assert len(pal) == 768


def test_palette_png(tmp_path: Path) -> None:
    arr = np.zeros((10, 12), np.uint8)
    arr[2:5, 3:6] = 3
    arr[6:, :2] = 7
    m = read_mask(_palette_png(tmp_path / "m.png", arr))
    assert m.ids == [3, 7] and m.size == (10, 12)
    np.testing.assert_array_equal(m.array, arr)
    assert m.palette is not None and m.palette[:6] == davis_palette()[:6]


def test_binary_png_is_one_object(tmp_path: Path) -> None:
    arr = np.zeros((8, 8), np.uint8)
    arr[2:6, 2:6] = 255
    Image.fromarray(arr, mode="L").save(tmp_path / "b.png")
    m = read_mask(tmp_path / "b.png")
    assert m.ids == [1] and int(m.array.sum()) == 16


def test_rgb_davis_colours(tmp_path: Path) -> None:
    pal = np.frombuffer(davis_palette(), np.uint8).reshape(256, 3)
    idx = np.array([[0, 1], [2, 1]])
    Image.fromarray(pal[idx].astype(np.uint8), mode="RGB").save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "c.png").array, idx)
    rgb = np.full((2, 2, 3), (10, 200, 30), np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "x.png")
    with pytest.raises(InputError, match="not a DAVIS palette colour"):
        read_mask(tmp_path / "x.png")


def test_palette_with_unknown_ids(tmp_path: Path) -> None:
    arr = np.array([[0, 1], [2, 3]], np.uint8)
    path = _palette_png(tmp_path / "p.png", arr, bytes([0, 0, 0, 255, 0, 0, 0, 255, 0]))
    with pytest.raises(InputError, match=r"p\.png: value 3 has no colour"):
        read_mask(path)


def test_empty_mask(tmp_path: Path) -> None:
    path = _palette_png(tmp_path / "e.png", np.zeros((4, 4)))
    with pytest.raises(InputError, match=r"e\.png: the mask is empty"):
        read_mask(path)
    assert read_mask(path, allow_empty=True).ids == []


def test_rle_forms(tmp_path: Path) -> None:
    a = np.zeros((6, 9), bool)
    a[1:3, 2:7] = True
    b = np.zeros((6, 9), bool)
    b[4:, :3] = True
    ra, rb = rle_encode(a), rle_encode(b)
    np.testing.assert_array_equal(rle_decode(ra, "x"), a)
    (tmp_path / "one.json").write_text(json.dumps(ra))
    (tmp_path / "list.json").write_text(json.dumps([ra, rb]))
    (tmp_path / "dict.json").write_text(json.dumps({"4": ra, "9": rb}))
    assert read_mask(tmp_path / "one.json").ids == [1]
    assert read_mask(tmp_path / "list.json").ids == [1, 2]
    m = read_mask(tmp_path / "dict.json")
    assert m.ids == [4, 9] and (m.array == 9).sum() == b.sum()
    # Uncompressed RLE (counts as a list), column-major as in COCO.
    flat = a.flatten(order="F")
    counts, cur, run = [], False, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    (tmp_path / "raw.json").write_text(json.dumps({"size": [6, 9], "counts": counts}))
    np.testing.assert_array_equal(read_mask(tmp_path / "raw.json").array, a.astype(int))


@pytest.mark.parametrize(
    "payload,needle",
    [
        ('{"size": [4, 4], "counts": "!!!bad"}', "invalid RLE"),
        ('{"size": [4], "counts": "0"}', "'size' must be"),
        ('{"size": [2, 2], "counts": [1, 1]}', "invalid RLE"),
        ('{"counts": "abc"}', "needs 'size' and 'counts'"),
        ('"text"', "expected an RLE object"),
        ("[]", "holds no RLE masks"),
        ("{not json", "not readable JSON"),
        ('{"x": {"size": [2, 2], "counts": [4]}}', "object id 'x'"),
    ],
)
def test_invalid_rle(tmp_path: Path, payload: str, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(payload)
    with pytest.raises(InputError, match=needle) as err:
        read_mask(path)
    assert str(err.value).startswith(str(path))


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such mask file"):
        read_mask(tmp_path / "none.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"junk\.png: not a readable image"):
        read_mask(tmp_path / "junk.png")
