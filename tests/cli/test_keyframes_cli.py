"""``s3 segment --direction``: backward passes and keyframes, end to end through the real CLI.

All use the built-in ``lite`` model (no checkpoint to build, and real tracking). The first
tests check the tool (frames, order, ids, files, the temporary spill, errors, Ctrl-C) on a
small copy of the judo example at ``--size 64``. The davis16-mini tests measure: with the mask
only on the middle frame every frame is segmented, and masks on the first and last frames beat
the forward-only run from frame 0.
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
from PIL import Image
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.eval.scoring import score_folders
from s3cli.io.masks import rle_decode
from s3cli.keyframes import SPILL_PREFIX
from tests.cli.helpers import assert_one_error, default_sigint, read_png
from tests.conftest import REPO, SHARED, require_shared

runner = CliRunner()
JUDO = REPO / "examples" / "judo"
DAVIS = SHARED / "data" / "davis16-mini"
SEQUENCES = ("blackswan", "car-shadow", "motocross-jump", "breakdance", "bmx-trees", "camel",
             "soapbox")


@pytest.fixture(scope="module")
def judo(tmp_path_factory) -> Path:
    """The first 10 judo frames at a quarter size (120x214), masks of frames 5 (object 2) and
    8 (object 3) in ``masks/``, and every original mask, resized, in ``all/``."""
    root = tmp_path_factory.mktemp("judo")
    for sub in ("frames", "masks", "all"):
        (root / sub).mkdir()
    for t in range(10):
        im = Image.open(JUDO / "frames" / f"{t:05d}.jpg").resize((214, 120), Image.BILINEAR)
        im.save(root / "frames" / f"{t:05d}.jpg", quality=95)
    for t in (0, 5, 8):
        m = Image.open(JUDO / "masks" / f"{t:05d}.png").resize((214, 120), Image.NEAREST)
        m.save(root / "all" / f"{t:05d}.png")
        if t:
            m.save(root / "masks" / f"{t:05d}.png")
    return root


def _seg(*args: object):
    return runner.invoke(app, ["segment", "--model", "lite", "--size", "64", "--device", "cpu",
                               *map(str, args)])


def _no_spill(folder: Path) -> None:
    assert not list(folder.glob(f"{SPILL_PREFIX}*")), list(folder.iterdir())


def test_keyframes_every_frame_in_order(judo: Path, tmp_path: Path) -> None:
    out, spill = tmp_path / "o", tmp_path / "spill"
    r = _seg(judo / "frames", "--mask-dir", judo / "masks", "-o", out, "--binary",
             "--mp4", tmp_path / "o.mp4", "--rle", tmp_path / "o.jsonl", "--save-scores",
             tmp_path / "scores", "--spill-dir", spill, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    # auto: the earliest mask is not on frame 0, so both directions.
    assert summary["direction"] == "both" and summary["frames"] == 10
    assert summary["object_ids"] == [2, 3]
    assert sorted(p.stem for p in out.glob("*.png")) == [f"{t:05d}" for t in range(10)]
    for t, obj in ((5, 2), (8, 3)):  # keyframes exact
        given = read_png(judo / "masks" / f"{t:05d}.png") == obj
        np.testing.assert_array_equal(read_png(out / f"{t:05d}.png") == obj, given)
    # Frame order in the streams; both objects are known on every frame (tracked backward).
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(10))
    for x in lines:
        assert sorted(x["masks"]) == ["2", "3"]
        png = read_png(out / f"{x['name']}.png")
        for obj, rle in x["masks"].items():
            np.testing.assert_array_equal(rle_decode(rle, "x"), png == int(obj))
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 10
    np.testing.assert_array_equal(
        read_png(out / "binary" / "3" / "00002.png") == 255, read_png(out / "00002.png") == 3
    )
    with np.load(tmp_path / "scores" / "00001.npz") as z:
        assert z["prob"].shape == (3, 120, 214) and list(z["object_ids"]) == [2, 3]
        np.testing.assert_allclose(z["prob"].sum(axis=0), 1, atol=1e-4)
    assert not list(spill.iterdir())  # the spill is gone


def test_direction_forward_and_auto(judo: Path, tmp_path: Path) -> None:
    r = _seg(judo / "frames", "--mask-dir", judo / "masks", "--direction", "forward",
             "-o", tmp_path / "f", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["direction"] == "forward"
    assert all(not read_png(tmp_path / "f" / f"{t:05d}.png").any() for t in range(5))
    # With a mask on frame 0, auto is the forward loop: the same files as --direction forward.
    for name, extra in (("auto", []), ("fwd", ["--direction", "forward"])):
        r = _seg(judo / "frames", "--mask-dir", judo / "all", "--end", "6", "-o",
                 tmp_path / name, "--json", *extra)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["direction"] == "forward"
    for t in range(6):
        np.testing.assert_array_equal(read_png(tmp_path / "auto" / f"{t:05d}.png"),
                                      read_png(tmp_path / "fwd" / f"{t:05d}.png"))
    # Backward only: frames after the last keyframe are background.
    r = _seg(judo / "frames", "--mask", judo / "masks" / "00005.png", "--mask-frame", "5",
             "--direction", "backward", "-o", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["object_ids"] == [2]
    assert (read_png(tmp_path / "b" / "00005.png") == 2).any()
    assert all(not read_png(tmp_path / "b" / f"{t:05d}.png").any() for t in range(6, 10))


def test_bad_direction(judo: Path, tmp_path: Path) -> None:
    r = _seg(judo / "frames", "--mask-dir", judo / "masks", "--direction", "sideways",
             "-o", tmp_path / "o")
    assert_one_error(r, "--direction sideways", "forward")


def test_error_removes_spill_and_outputs(judo: Path, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(10):
        (frames / f"{t:05d}.jpg").write_bytes((judo / "frames" / f"{t:05d}.jpg").read_bytes())
    (frames / "00002.jpg").write_bytes(b"corrupt")  # reached by the backward pass
    spill, out = tmp_path / "spill", tmp_path / "o"
    r = _seg(frames, "--mask-dir", judo / "masks", "-o", out, "--mp4", tmp_path / "o.mp4",
             "--spill-dir", spill)
    assert_one_error(r, "00002.jpg: not a readable image")
    _no_spill(spill)
    assert list(out.iterdir()) == [] and not (tmp_path / "o.mp4").exists()


def _video(path: Path, frames: int, h: int = 64, w: int = 96) -> Path:
    """A small mp4: a red box moving right over grey."""
    with av.open(str(path), mode="w") as c:
        stream = c.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            img = np.full((h, w, 3), 90, np.uint8)
            img[16:40, 4 + 2 * t : 28 + 2 * t] = (230, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


def test_video_backward_and_error_after_spilling(tmp_path: Path) -> None:
    video = _video(tmp_path / "v.mp4", 20)
    mask = np.zeros((64, 96), np.uint8)
    mask[16:40, 24:48] = 255  # the box at frame 10
    Image.fromarray(mask, mode="L").save(tmp_path / "m.png")
    spill, out = tmp_path / "spill", tmp_path / "o"
    r = _seg(video, "--mask", tmp_path / "m.png", "--mask-frame", "10", "-o", out,
             "--spill-dir", spill, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["direction"] == "both"
    assert sorted(p.stem for p in out.glob("*.png")) == [f"{t:05d}" for t in range(20)]
    # The backward pass followed the box back to the left (the lite model lags a little at
    # this size: a stride-8 grid of 8x12 cells).
    first, given = read_png(out / "00000.png") == 1, read_png(out / "00010.png") == 1
    truth = np.zeros((64, 96), bool)
    truth[16:40, 4:28] = True
    assert (first & truth).sum() > 0.3 * truth.sum()
    assert np.nonzero(first)[1].mean() < np.nonzero(given)[1].mean() - 4
    _no_spill(spill)
    # A mask on a frame the video does not have: found out after the frames were spilled.
    r = _seg(video, "--mask", tmp_path / "m.png", "--mask-frame", "30", "-o", tmp_path / "o2",
             "--spill-dir", spill)
    assert_one_error(r, "v.mp4: no keyframe within the video's 20 frames")
    _no_spill(spill)
    assert not any((tmp_path / "o2").iterdir())


def test_ctrl_c_removes_spill(tmp_path: Path) -> None:
    video = require_shared(SHARED / "examples" / "example.mp4")
    mask = np.zeros((480, 640), np.uint8)
    mask[100:300, 200:400] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "m.png")
    out, spill = tmp_path / "o", tmp_path / "spill"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "s3cli", "segment", str(video), "--mask", str(tmp_path / "m.png"),
           "--mask-frame", "60", "--model", "lite", "--size", "64", "--device", "cpu",
           "-o", str(out), "--mp4", str(tmp_path / "o.mp4"), "--spill-dir", str(spill)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the backward pass stores its results
        if any(spill.glob(f"{SPILL_PREFIX}*/prob*")):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the backward pass never started")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and err.decode().strip().endswith("interrupted")
    _no_spill(spill)
    assert list(out.iterdir()) == [] and not (tmp_path / "o.mp4").exists()


# --------------------------------------------------------------------------- davis16-mini, lite

SIZE = "240"
"""Internal size of the lite runs here (half the default; the lite model is poor much lower)."""

FIRST_LAST = ("car-shadow", "motocross-jump")
"""Sequences of the first+last keyframe comparison here (the two shortest, to keep the tests
short; the benchmark script ``benchmarks/keyframes_davis.py`` runs all seven)."""

FIRST_LAST_SIZE = "480"
"""The first+last comparison runs at the default size: at 240 car-shadow's backward pass from
its last frame is poor (J&F 70 first+last against 77 forward, once the stride-4 features
joined the lite keys), while at 480 first+last wins on both (93.4 / 75.0 against 88.6 / 71.8)
and on 6 of the 7 sequences."""


class LiteRuns:
    """Lite runs on davis16-mini through the CLI, made on first use and kept for the module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def __call__(self, run: str, seq: str, size: str = SIZE) -> Path:
        """Prediction root of ``run`` (holding ``<seq>/``): ``frame0`` (mask of frame 0,
        forward), ``middle`` (mask of the middle frame only, default direction) or
        ``firstlast`` (masks of the first and the last frame, both directions), at ``size``."""
        out = self.tmp / f"{run}-{size}"
        if (out / seq).is_dir():
            return out
        masks = sorted((DAVIS / "Annotations" / "480p" / seq).glob("*.png"))
        args: list[object] = [DAVIS / "JPEGImages" / "480p" / seq, "-o", out / seq]
        if run == "frame0":
            args += ["--mask", masks[0], "--direction", "forward"]
        elif run == "middle":
            args += ["--mask", masks[len(masks) // 2], "--mask-frame", len(masks) // 2]
        else:
            keys = self.tmp / f"keys-{size}" / seq
            keys.mkdir(parents=True)
            for m in (masks[0], masks[-1]):
                (keys / m.name).write_bytes(m.read_bytes())
            args += ["--mask-dir", keys, "--direction", "both"]
        r = runner.invoke(app, ["segment", "--model", "lite", "--size", size, "--device", "cpu",
                                "--json", *map(str, args)])
        assert r.exit_code == 0, r.output
        expected = "forward" if run == "frame0" else "both"
        assert json.loads(r.stdout)["direction"] == expected
        return out


@pytest.fixture(scope="module")
def lite_runs(tmp_path_factory) -> LiteRuns:
    require_shared(DAVIS)
    return LiteRuns(tmp_path_factory.mktemp("davis"))


def _jf(gt_root: Path, pred_root: Path, seqs: tuple[str, ...]) -> dict[str, float]:
    report = score_folders(gt_root, pred_root, sequences=seqs, workers=1)
    return {s.name: s.summary.jf_mean for s in report.sequences}


SEQUENCES = ("blackswan", "car-shadow", "motocross-jump", "breakdance", "bmx-trees", "camel",
             "soapbox")
"""The seven davis16-mini sequences."""


def test_middle_frame_mask_segments_every_frame(lite_runs: LiteRuns) -> None:
    gt_root = DAVIS / "Annotations" / "480p"
    for seq in SEQUENCES:
        out = lite_runs("middle", seq)
        lite_runs("frame0", seq)
        names = sorted(p.name for p in (gt_root / seq).glob("*.png"))
        assert sorted(p.name for p in (out / seq).glob("*.png")) == names, seq
        # The frames before the middle come from the backward pass: the object is found in
        # nearly all of them (the lite model may lose it briefly, e.g. behind bmx-trees' trees).
        before = names[: len(names) // 2]
        found = sum(read_png(out / seq / n).any() for n in before)
        assert found >= 0.8 * len(before), (seq, found, len(before))
    middle = _jf(gt_root, lite_runs.tmp / f"middle-{SIZE}", SEQUENCES)
    frame0 = _jf(gt_root, lite_runs.tmp / f"frame0-{SIZE}", SEQUENCES)
    print(f"\nlite --size {SIZE}, J&F, middle-frame mask / frame-0 mask: "
          + ", ".join(f"{k} {100 * middle[k]:.1f} / {100 * frame0[k]:.1f}" for k in SEQUENCES)
          + f"; mean {100 * np.mean(list(middle.values())):.1f} / "
          f"{100 * np.mean(list(frame0.values())):.1f}")
    # Starting in the middle loses little against starting on frame 0 (at 480p: 68.2 / 68.4,
    # measured before the stride-16 key weight went from 1.0 to 1.4).
    assert np.mean(list(middle.values())) > np.mean(list(frame0.values())) - 0.1


def test_first_and_last_keyframes_beat_forward_only(lite_runs: LiteRuns) -> None:
    gt_root = DAVIS / "Annotations" / "480p"
    size = FIRST_LAST_SIZE
    for seq in FIRST_LAST:
        lite_runs("firstlast", seq, size)
        lite_runs("frame0", seq, size)
    both = _jf(gt_root, lite_runs.tmp / f"firstlast-{size}", FIRST_LAST)
    fwd = _jf(gt_root, lite_runs.tmp / f"frame0-{size}", FIRST_LAST)
    print(f"\nlite --size {size}, J&F first+last keyframes / forward from frame 0: "
          + ", ".join(f"{s} {100 * both[s]:.1f} / {100 * fwd[s]:.1f}" for s in FIRST_LAST))
    # The bar is "better on at least five of seven" (benchmarks/keyframes_davis.py);
    # here: better on the mean of the two, by a clear margin.
    assert np.mean(list(both.values())) > np.mean(list(fwd.values())) + 0.02
