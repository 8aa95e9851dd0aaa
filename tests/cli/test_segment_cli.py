"""``s3 segment`` end to end through the real CLI: inputs, outputs, and bad input.

A synthetic cutie-small checkpoint at ``--size 64`` keeps these fast; what is checked here is the
tool (frames, ids, files, errors), not the model's accuracy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.io.masks import davis_palette, rle_decode
from s3cli.model.registry import build_network
from tests.cli.helpers import assert_one_error, default_sigint, read_png
from tests.conftest import REPO, SHARED, require_shared

runner = CliRunner()
JUDO = REPO / "examples" / "judo"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "small.pth"
    torch.save(build_network("cutie-small", synthetic=True).state_dict(), path)
    return path


def _seg(ckpt: Path, *args: str):
    return runner.invoke(app, ["segment", "--weights", str(ckpt), "--size", "64", *map(str, args)])


def _no_partial(folder: Path) -> None:
    if folder.exists():
        leftovers = [p for p in folder.rglob("*") if ".s3-partial" in str(p) or ".tmp" in p.name]
        assert not leftovers, leftovers


def test_judo_frames_objects_added_mid_video(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "judo"
    result = _seg(
        ckpt, JUDO / "frames", "--mask-dir", JUDO / "masks", "-o", out, "--mp4",
        tmp_path / "judo.mp4", "--rle", tmp_path / "judo.jsonl", "--binary", "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["frames"] == 16 and summary["object_ids"] == [1, 2, 3, 4]
    assert ", 4 objects, peak memory" in result.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == [f"{i:05d}" for i in range(16)]
    # Each object's id is present from the frame where its mask is given.
    for frame, obj in [(0, 1), (5, 2), (8, 3), (13, 4)]:
        given = read_png(JUDO / "masks" / f"{frame:05d}.png") == obj
        written = read_png(out / f"{frame:05d}.png")
        assert (written[given] == obj).all()
        assert all(not (read_png(out / f"{t:05d}.png") == obj).any() for t in range(frame))
    # DAVIS-compatible palette PNGs, with the input's palette.
    im = Image.open(pngs[0])
    assert im.mode == "P" and bytes(im.getpalette()[:12]) == davis_palette()[:12]
    # Binary masks per object agree with the palette PNGs.
    np.testing.assert_array_equal(
        read_png(out / "binary" / "3" / "00010.png") == 255, read_png(out / "00010.png") == 3
    )
    # The mp4 decodes with the same frame count; the RLE lines decode back to the PNGs.
    with av.open(str(tmp_path / "judo.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 16
    lines = (tmp_path / "judo.jsonl").read_text().splitlines()
    assert len(lines) == 16
    for line in lines:
        rec = json.loads(line)
        png = read_png(out / f"{rec['name']}.png")
        for obj, rle in rec["masks"].items():
            np.testing.assert_array_equal(rle_decode(rle, "x"), png == int(obj))
    assert (out / ".s3-done.json").is_file()
    _no_partial(out)


def test_video_file_with_rle_mask(ckpt: Path, tmp_path: Path) -> None:
    video = require_shared(SHARED / "examples" / "example.mp4")
    mask = np.zeros((480, 640), np.uint8)
    mask[150:330, 250:420] = 1
    from s3cli.io.masks import rle_encode

    (tmp_path / "m.json").write_text(json.dumps({"7": rle_encode(mask.astype(bool))}))
    out = tmp_path / "ex"
    result = _seg(ckpt, video, "--mask", tmp_path / "m.json", "-o", out, "--mp4",
                  tmp_path / "ex.mp4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["object_ids"] == [7]
    assert "117 frames in" in result.stderr and ", 1 object, peak memory" in result.stderr
    assert len(list(out.glob("*.png"))) == 117
    first = read_png(out / "00000.png")
    assert ((first == 7) == mask.astype(bool)).all()
    with av.open(str(tmp_path / "ex.mp4")) as c:
        stream = c.streams.video[0]
        assert abs(float(stream.average_rate) - 25) < 0.01
        assert sum(1 for _ in c.decode(video=0)) == 117


def test_frame_range_and_mask_frame(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = _seg(ckpt, JUDO / "frames", "--mask", JUDO / "masks" / "00005.png",
                  "--mask-frame", "5", "--start", "3", "--end", "9", "-o", out,
                  "--direction", "forward")
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in out.glob("*.png")) == [f"{i:05d}" for i in range(3, 9)]
    assert not read_png(out / "00004.png").any() and (read_png(out / "00005.png") == 2).any()
    # The default (auto) segments the frames before the mask too, by a backward pass.
    both = tmp_path / "b"
    result = _seg(ckpt, JUDO / "frames", "--mask", JUDO / "masks" / "00005.png",
                  "--mask-frame", "5", "--start", "3", "--end", "9", "-o", both, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["direction"] == "both"
    assert read_png(both / "00004.png").any()
    assert (read_png(both / "00005.png") == read_png(out / "00005.png")).all()


def test_batch_with_shards_and_skip_done(ckpt: Path, tmp_path: Path) -> None:
    frames = tmp_path / "clips"
    for name in ("a", "b", "c"):
        (frames / name).mkdir(parents=True)
        for t in range(3):
            src = JUDO / "frames" / f"{t:05d}.jpg"
            (frames / name / src.name).write_bytes(src.read_bytes())
    mask = JUDO / "masks" / "00000.png"
    listing = tmp_path / "list.tsv"
    listing.write_text("".join(f"{frames / n}\t{mask}\n" for n in ("a", "b", "c")))
    out = tmp_path / "out"
    r = _seg(ckpt, "--from-list", listing, "-o", out, "--shard", "1/2", "--json")
    assert r.exit_code == 0, r.output
    assert [v["source"] for v in json.loads(r.stdout)["videos"]] == [str(frames / "b")]
    r = _seg(ckpt, "--from-list", listing, "-o", out, "--skip-done", "--json")
    statuses = [v["status"] for v in json.loads(r.stdout)["videos"]]
    assert statuses == ["ok", "skipped", "ok"]
    assert all(len(list((out / n).glob("*.png"))) == 3 for n in "abc")


def test_batch_failure_sets_exit_code(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _seg(ckpt, JUDO / "frames", tmp_path / "missing.mp4", "--mask",
             JUDO / "masks" / "00000.png", "-o", out, "--end", "2", "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["failed"] == 1
    assert [v["status"] for v in report["videos"]] == ["ok", "failed"]
    assert "missing.mp4: no such file" in r.stderr


# --------------------------------------------------------------------------- bad input


def test_missing_input(ckpt: Path, tmp_path: Path) -> None:
    r = _seg(ckpt, tmp_path / "nope.mp4", "--mask", JUDO / "masks" / "00000.png", "-o", tmp_path)
    assert_one_error(r, "nope.mp4: no such file")


def test_corrupt_video(ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(20000))
    r = _seg(ckpt, bad, "--mask", JUDO / "masks" / "00000.png", "-o", tmp_path / "o")
    assert_one_error(r, "bad.mp4: not a readable video")
    _no_partial(tmp_path / "o")


def test_truncated_video(ckpt: Path, tmp_path: Path) -> None:
    video = require_shared(SHARED / "examples" / "example.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    r = _seg(ckpt, cut, "--mask", JUDO / "masks" / "00000.png", "--resize-mask", "-o",
             tmp_path / "o", "--mp4", tmp_path / "o.mp4")
    assert_one_error(r, "cut.mp4")
    assert not (tmp_path / "o.mp4").exists()
    _no_partial(tmp_path)


def test_mask_of_wrong_size(ckpt: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.open(JUDO / "masks" / "00000.png").resize((100, 60)).save(small)
    r = _seg(ckpt, JUDO / "frames", "--mask", small, "-o", tmp_path / "o")
    assert_one_error(r, "small.png: mask is 100x60 but the video is 854x480", "--resize-mask")
    r = _seg(ckpt, JUDO / "frames", "--mask", small, "--resize-mask", "--end", "2",
             "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output


def _raw_palette_png(path: Path, arr: np.ndarray, palette: list[int]) -> None:
    """A palette PNG written byte by byte (Pillow would repair a too-short palette)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    h, w = arr.shape
    raw = b"".join(b"\0" + arr[r].astype(np.uint8).tobytes() for r in range(h))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", bytes(palette))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_palette_with_unknown_ids(ckpt: Path, tmp_path: Path) -> None:
    arr = np.zeros((480, 854), np.uint8)
    arr[100:200, 100:200] = 5
    _raw_palette_png(tmp_path / "pal.png", arr, [0, 0, 0, 255, 0, 0])
    r = _seg(ckpt, JUDO / "frames", "--mask", tmp_path / "pal.png", "-o", tmp_path / "o")
    assert_one_error(r, "pal.png: value 5 has no colour", "palette")


def test_invalid_rle(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{"size": [480, 854], "counts": "@@@@"}')
    r = _seg(ckpt, JUDO / "frames", "--mask", tmp_path / "m.json", "-o", tmp_path / "o")
    assert_one_error(r, "m.json", "invalid RLE")


def test_empty_mask(ckpt: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((480, 854), np.uint8), mode="L").save(tmp_path / "e.png")
    r = _seg(ckpt, JUDO / "frames", "--mask", tmp_path / "e.png", "-o", tmp_path / "o")
    assert_one_error(r, "e.png: the mask is empty")


def test_unwritable_output(ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _seg(ckpt, JUDO / "frames", "--mask", JUDO / "masks" / "00000.png", "-o", blocker / "o")
    assert_one_error(r, f"{blocker / 'o'}: cannot write here")


def test_error_keeps_earlier_results(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    earlier = np.full((480, 854), 9, np.uint8)
    Image.fromarray(earlier, mode="L").save(out / "00000.png")
    (tmp_path / "o.mp4").write_bytes(b"earlier video")
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(4):
        (frames / f"{t:05d}.jpg").write_bytes((JUDO / "frames" / f"{t:05d}.jpg").read_bytes())
    (frames / "00003.jpg").write_bytes(b"corrupt")
    r = _seg(ckpt, frames, "--mask", JUDO / "masks" / "00000.png", "-o", out, "--mp4",
             tmp_path / "o.mp4")
    assert_one_error(r, "00003.jpg: not a readable image")
    np.testing.assert_array_equal(read_png(out / "00000.png"), earlier)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png"]
    assert (tmp_path / "o.mp4").read_bytes() == b"earlier video"


def test_ctrl_c_leaves_no_partial_output(ckpt: Path, tmp_path: Path) -> None:
    video = require_shared(SHARED / "examples" / "example.mp4")
    mask = np.zeros((480, 640), np.uint8)
    mask[100:300, 200:400] = 1
    Image.fromarray(mask, mode="L").save(tmp_path / "m.png")
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "s3cli", "segment", str(video), "--mask", str(tmp_path / "m.png"),
           "--weights", str(ckpt), "--size", "64", "-o", str(out), "--mp4", str(tmp_path / "o.mp4")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until frames are being written to the staging area
        if any(out.glob(".s3-partial-*/*.png")):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("segment never started writing")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and err.decode().strip().endswith("interrupted")
    assert list(out.iterdir()) == [] and not (tmp_path / "o.mp4").exists()
    assert not list(tmp_path.glob(".o.mp4*"))
