"""``s3 score``: JSON on stdout, table on stderr, atomic per-sequence CSV, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from s3cli.cli.main import app
from tests.conftest import FIXTURES, require_shared

METRICS = FIXTURES / "metrics"
KEYS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
TOL = 1e-12

runner = CliRunner()


def _score(*args: str | Path) -> Any:
    return runner.invoke(app, ["score", *map(str, args)])


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads(require_shared(METRICS / "expected.json").read_text())


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _no_leftovers(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


def test_main_set_json_csv_and_table(expected: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    result = _score("--gt", require_shared(METRICS / "gt"), "--pred", METRICS / "pred",
                    "--csv", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    ref = expected["davis2017_semi"]
    assert list(data) == [*KEYS, "sequences"]
    for key in KEYS:
        assert abs(data[key] - ref["global"][key]) <= TOL, key
    assert list(data["sequences"]) == sorted(ref["sequences"])
    for seq, values in data["sequences"].items():
        assert list(values) == KEYS, seq
        objects = ref["sequences"][seq]["objects"].values()
        j_mean = float(np.mean([o["J_mean"] for o in objects]))
        f_mean = float(np.mean([o["F_mean"] for o in objects]))
        assert abs(values["J-Mean"] - j_mean) <= TOL
        assert abs(values["J&F-Mean"] - (j_mean + f_mean) / 2) <= TOL
    assert data["sequences"]["perfect"]["J&F-Mean"] == 1.0

    rows = _rows(out)
    assert list(rows[0]) == ["Sequence", "Objects", "Frames", *KEYS]
    assert rows[0]["Sequence"] == "Global" and rows[0]["Objects"] == "38"
    assert rows[0]["Frames"] == "141"
    assert [r["Sequence"] for r in rows[1:]] == sorted(ref["sequences"])
    for key in KEYS:
        assert float(rows[0][key]) == pytest.approx(ref["global"][key], abs=5e-7)
    _no_leftovers(tmp_path, {"scores.csv"})

    assert "Global" in result.stderr and "odd_size_481x853" in result.stderr
    assert "warning: late_gt_object" in result.stderr


def test_default_csv_goes_beside_predictions(expected: dict[str, Any], tmp_path: Path) -> None:
    base = require_shared(METRICS / "quirks" / "pred_missing_first_last")
    shutil.copytree(base / "pred", tmp_path / "pred")
    result = _score("--gt", base / "gt", "--pred", tmp_path / "pred", "-n", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # without --json, stdout stays empty
    rows = _rows(tmp_path / "pred" / "scores.csv")
    ref = expected["quirks"]["pred_missing_first_last"]["davis2017_semi"]["global"]
    assert [r["Sequence"] for r in rows] == ["Global", "seq"]
    assert float(rows[1]["J&F-Mean"]) == pytest.approx(ref["J&F-Mean"], abs=5e-7)
    _no_leftovers(tmp_path / "pred", {"seq", "scores.csv"})


@pytest.mark.parametrize(
    ("quirk", "needle"),
    [
        ("missing_pred_frame", "00003.png: prediction mask not found"),
        ("size_mismatch", "prediction is 90x60 pixels but the ground truth is 96x64"),
        ("two_frames", "only 2 ground-truth frame(s)"),
        ("pred_label_not_in_first_gt_frame", "prediction has object id 2"),
    ],
)
def test_quirk_errors_are_one_line(quirk: str, needle: str, tmp_path: Path) -> None:
    base = require_shared(METRICS / "quirks" / quirk)
    out = tmp_path / "scores.csv"
    out.write_text("previous run\n")
    result = _score("--gt", base / "gt", "--pred", base / "pred", "--csv", out, "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {base}") and needle in lines[0]
    assert lines[0].endswith(")")
    assert "Traceback" not in result.stderr
    assert out.read_text() == "previous run\n"  # untouched, no partial file
    _no_leftovers(tmp_path, {"scores.csv"})


def test_missing_folders(tmp_path: Path) -> None:
    result = _score("--gt", tmp_path / "nope", "--pred", tmp_path, "--csv", tmp_path / "s.csv")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'nope'}: ground-truth folder not found")
    gt = require_shared(METRICS / "quirks" / "void_255" / "gt")
    result = _score("--gt", gt, "--pred", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'nope'}: prediction folder not found")
    _no_leftovers(tmp_path, set())


def test_unwritable_csv_fails_before_scoring(tmp_path: Path) -> None:
    base = require_shared(METRICS / "quirks" / "void_255")
    result = _score("--gt", base / "gt", "--pred", base / "pred", "--csv",
                    tmp_path / "no" / "s.csv", "--json")  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "cannot be written" in result.stderr
    result = _score("--gt", base / "gt", "--pred", base / "pred", "--csv", tmp_path)
    assert result.exit_code == 1 and "is a folder" in result.stderr


def _write(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), "L")
    image.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    image.save(path)


def test_nan_is_null_in_json_and_empty_in_csv(tmp_path: Path) -> None:
    """A sequence without objects in its first frame scores nothing: null / empty, a warning."""
    empty, obj = np.zeros((8, 8)), np.zeros((8, 8))
    obj[2:5, 2:5] = 1
    for t in range(3):
        _write(tmp_path / "gt" / "a" / f"{t:05d}.png", empty if t == 0 else obj)
        _write(tmp_path / "pred" / "a" / f"{t:05d}.png", empty)
    result = _score("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert all(data[k] is None for k in KEYS)
    assert all(v is None for v in data["sequences"]["a"].values())
    row = _rows(tmp_path / "pred" / "scores.csv")[1]
    assert row["Sequence"] == "a" and row["Objects"] == "0" and row["J-Mean"] == ""
    assert "warning: a: the first ground-truth frame (00000.png) has no objects" in result.stderr


def test_binary_davis16_ground_truth(tmp_path: Path) -> None:
    """DAVIS-2016 style 0/255 ground truth is one object (the official 2017 tool stops)."""
    base = require_shared(METRICS / "quirks" / "binary_0_255_gt")
    result = _score("--gt", base / "gt", "--pred", base / "pred", "--csv",
                    tmp_path / "s.csv", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert 0 < data["J-Mean"] < 1 and not math.isnan(data["F-Mean"])
    assert data["J&F-Mean"] == data["sequences"]["seq"]["J&F-Mean"]


def test_help() -> None:
    result = runner.invoke(app, ["score", "--help"])
    assert result.exit_code == 0
    assert "--gt" in result.stdout and "--json" in result.stdout
