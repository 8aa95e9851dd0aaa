"""``s3 eval`` through the real CLI: protocols end to end, JSON, resume, errors.

The YouTube-VOS case runs a synthetic cutie-small checkpoint at ``--size 64`` (the files are
checked, not the masks' quality); DAVIS bookkeeping uses the echo tracker of the runner tests;
the davis16-mini case runs the built-in ``lite`` model and checks a real J&F floor.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.model.registry import build_network
from tests.cli.helpers import assert_one_error
from tests.eval.test_eval_runner import echo, make_davis, make_youtube  # noqa: F401

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "small.pth"
    torch.save(build_network("cutie-small", synthetic=True).state_dict(), path)
    return path


@pytest.fixture
def one_thread():
    """One thread: faster for tiny frames, and far faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eval(*args: str | Path):
    return runner.invoke(app, ["eval", "--device", "cpu", *map(str, args)])


def _ids(data: bytes) -> set[int]:
    import io

    return {int(v) for v in np.unique(np.array(Image.open(io.BytesIO(data)))) if v}


def test_youtube_layout_gives_a_submission_zip(tmp_path: Path, ckpt: Path, one_thread) -> None:
    # two videos; object 2 appears at frame 4 and is annotated only there; meta.json asks
    # for every second frame from each object's first one
    root = make_youtube(tmp_path / "yt", ("aaa", "bbb"), frames=6, first=0, late=4)
    out = tmp_path / "out"
    result = _eval("--dataset", "ytvos18", "--root", root, "--weights", ckpt, "--size", "64",
                   "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "J&F-Mean" not in data  # YouTube-VOS is scored by its server
    assert data["frames"] == 12 and data["seconds"] > 0 and data["fps"] > 0
    assert data["dataset"] == "ytvos18" and data["split"] == "valid"
    assert data["model"] == "cutie-small" and data["run"] == 2 and data["resumed"] == 0
    zip_path = out / "ytvos18-valid.zip"
    assert data["zip"] == str(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(zf.namelist())
        assert names == [f"Annotations/{s}/{t:05d}.png" for s in ("aaa", "bbb") for t in (0, 2, 4)]
        for seq in ("aaa", "bbb"):
            first = zf.read(f"Annotations/{seq}/00000.png")
            assert _ids(first) == {1}
            assert 2 in _ids(zf.read(f"Annotations/{seq}/00004.png"))  # joined when it appeared
            with Image.open(zf.open(f"Annotations/{seq}/00002.png")) as im:
                assert im.mode == "P" and im.size == (96, 64)
    # only the frames of meta.json are written
    assert sorted(p.name for p in (out / "Annotations" / "aaa").glob("*.png")) == [
        "00000.png", "00002.png", "00004.png"
    ]  # fmt: skip
    assert "wrote " + str(zip_path) in result.stderr
    assert "upload the zip" in result.stderr


def test_davis_json_table_csv_and_resume(tmp_path: Path, echo) -> None:  # noqa: F811
    root = make_davis(tmp_path / "d", ("one", "two"), binary=True)
    out = tmp_path / "out"
    result = _eval("--dataset", "davis16", "--root", root, "-o", out, "--json", "-n", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["J&F-Mean"] == pytest.approx(1.0)
    assert sorted(data["sequences"]) == ["one", "two"]
    assert data["frames"] == 10 and "fps" in data and data["zip"] is None
    assert data["csv"] == str(out / "scores.csv") and (out / "scores.csv").is_file()
    assert "Global" in result.stderr and "done one (1/2)" in result.stderr
    # again: both sequences are found done, the numbers are the same
    again = _eval("--dataset", "davis16", "--root", root, "-o", out, "--json")
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["resumed"] == 2 and second["run"] == 0
    assert second["J&F-Mean"] == data["J&F-Mean"] and second["frames"] == 10
    assert "skip one (1/2): done earlier" in again.stderr
    # other settings on the same output are refused
    assert_one_error(
        _eval("--dataset", "davis16", "--root", root, "-o", out, "--size", "64"),
        "other settings", "size '480' (now '64')",
    )  # fmt: skip


def test_sequences_subset(tmp_path: Path, echo) -> None:  # noqa: F811
    root = make_davis(tmp_path / "d", ("one", "two", "three"))
    out = tmp_path / "out"
    result = _eval("--dataset", "davis17", "--root", root, "-o", out, "--sequences", "three,one",
                   "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["sequences"]) == ["one", "three"]
    assert sorted(p.name for p in (out / "Annotations").iterdir()) == ["one", "three"]


def test_errors_are_one_line(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", ("one",))
    assert_one_error(_eval("--dataset", "davis18", "--root", root), "--dataset davis18", "davis16")
    assert_one_error(_eval("--dataset", "davis16", "--root", tmp_path / "nope"),
                     "nope: dataset root not found")  # fmt: skip
    assert_one_error(_eval("--dataset", "ytvos19", "--root", root),
                     "use --dataset davis16 or davis17")
    assert_one_error(_eval("--dataset", "davis16", "--root", root, "--sequences", "two"),
                     "no sequence named two")  # fmt: skip
    assert_one_error(_eval("--dataset", "davis16", "--root", root, "--size", "32"), "--size 32")
    assert_one_error(_eval("--dataset", "davis16", "--root", root, "--model", "big"), "--model big")
    assert not (Path.cwd() / "eval-davis16-val").exists()


# The davis16-mini run with the built-in lite model (all seven sequences, per-sequence J floors)
# is tests/lite/test_davis_quality.py.
