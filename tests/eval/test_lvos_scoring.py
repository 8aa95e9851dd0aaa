"""LVOS scoring against the official tool's numbers, through the Python API and the CLI.

``data/lvos_expected.json`` is what the official LVOS evaluation (``LingyiHongfd/lvos-evaluation``
at 25cb02d, ``lvos.evaluation.LVOSEvaluation`` with the global numbers of its
``evaluation_method.py``, NumPy 1.26) computed on the split that :mod:`tests.eval.lvos_synth`
draws: its per-frame J and F per object, per-object J/F/V means and the global columns.
Per-frame values must match exactly; means to 1e-12.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.errors import DatasetError, InputError
from s3cli.eval.datasets import load_dataset
from s3cli.eval.lvos_scoring import LVOS_KEYS, read_lvos_meta, score_lvos
from tests.eval.lvos_synth import VIDEOS, make_lvos

EXPECTED = Path(__file__).parent / "data" / "lvos_expected.json"
TOL = 1e-12
runner = CliRunner()


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads(EXPECTED.read_text())


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lvos(tmp_path_factory.mktemp("lvos"))


def _paths(root: Path) -> tuple[Path, Path, Path]:
    return root / "valid" / "Annotations", root / "pred", root / "valid" / "valid_meta.json"


@pytest.mark.parametrize("workers", [1, 2])
def test_matches_official_tool(split: Path, expected: dict[str, Any], workers: int) -> None:
    report = score_lvos(*_paths(split), workers=workers)
    assert [o.name for o in report.objects] == sorted(expected["objects"])
    for obj in report.objects:
        per_frame = expected["per_frame"][obj.sequence][str(obj.object_id)]
        assert list(obj.j) == per_frame["J"], obj.name  # exact, zero slots included
        assert list(obj.f) == per_frame["F"], obj.name
        want = expected["objects"][obj.name]
        assert abs(obj.j_mean - want["J-Mean"]) <= TOL
        assert abs(obj.f_mean - want["F-Mean"]) <= TOL
        assert abs(obj.v - want["V-Mean"]) <= TOL
    assert list(report.summary) == list(LVOS_KEYS)
    for key, value in expected["global"].items():
        assert abs(report.summary[key] - value) <= TOL, key
    assert sorted(o.j_recall for o in report.objects) == sorted(expected["recall"]["J"])
    assert [o.unseen for o in report.objects][:2] == [True, True]  # R3UJGYwy sorts first
    assert len(report.notes) == 1 and "bbbb0002_2: frame_range holds 11" in report.notes[0]


def test_frame_ranges_and_slots(split: Path) -> None:
    meta = split / "valid" / "valid_meta.json"
    videos = read_lvos_meta(meta)
    late = next(o for o in videos["R3UJGYwy"] if o.object_id == 4)  # appears at frame 15
    frames = [name for _, name in late.scored_frames(meta)]
    # frames 15..45: the first (15) and the one at frame_nums - 1 (45) are not scored
    assert frames == [f"{t:08d}" for t in range(20, 45, 5)]
    padded = next(o for o in videos["bbbb0002"] if o.object_id == 5)
    assert padded.slots == 12 and len(padded.scored_frames(meta)) == 11  # one zero slot


def test_seen_only_subset_is_the_seen_mean(split: Path, expected: dict[str, Any]) -> None:
    seen = ["aaaa0001", "bbbb0002"]
    report = score_lvos(*_paths(split), sequences=seen, workers=1)
    objects = [v for k, v in expected["objects"].items() if k.rsplit("_", 1)[0] in seen]
    j = float(np.mean([o["J-Mean"] for o in objects]))
    f = float(np.mean([o["F-Mean"] for o in objects]))
    assert abs(report.summary["J-Mean"] - j) <= TOL
    assert abs(report.summary["J&F-Mean"] - (j + f) / 2) <= TOL
    assert math.isnan(report.summary["J-unseen-Mean"])
    assert any("official tool reports NaN" in n for n in report.notes)


def test_errors_name_the_file(split: Path, tmp_path: Path) -> None:
    gt, pred, meta = _paths(split)
    broken = tmp_path / "pred"
    shutil.copytree(pred, broken)
    (broken / "aaaa0001" / "00000020.png").unlink()
    with pytest.raises(InputError, match=r"aaaa0001/00000020.png: prediction mask not found"):
        score_lvos(gt, broken, meta, workers=1)

    bad = tmp_path / "bad_meta.json"
    bad.write_text(json.dumps({"videos": {"aaaa0001": {"objects": {"1": {}}}}}))
    with pytest.raises(DatasetError, match=r"bad_meta.json: video aaaa0001 object 1 has no "):
        score_lvos(gt, pred, bad)

    data = json.loads(meta.read_text())
    data["videos"]["aaaa0001"]["objects"]["1"]["frame_range"]["frame_nums"] = "5"
    short = tmp_path / "short_meta.json"
    short.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"holds more than frame_nums=5 frames"):
        score_lvos(gt, pred, short)


def test_score_cli_lvos_json_and_csv(split: Path, expected: dict[str, Any],
                                     tmp_path: Path) -> None:
    gt, pred, _ = _paths(split)
    out = tmp_path / "lvos.csv"
    # the meta file is found beside the ground truth
    result = runner.invoke(app, ["score", "--protocol", "lvos", "--gt", str(gt), "--pred",
                                 str(pred), "--csv", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["protocol"] == "lvos"
    for key, value in expected["global"].items():
        assert abs(data[key] - value) <= TOL, key
    assert sorted(data["sequences"]) == sorted(expected["objects"])
    assert "LVOS J&F" in result.stderr and "R3UJGYwy_2" in result.stderr
    rows = out.read_text().splitlines()
    assert rows[0].startswith("Sequence,Video,Unseen,Frames,J&F-Mean")
    assert [r.split(",")[0] for r in rows[1:4]] == ["Global", "Global-seen", "Global-unseen"]
    assert len(rows) == 4 + sum(len(objs) for _, objs in VIDEOS.values())

    result = runner.invoke(app, ["score", "--protocol", "lvos", "--gt", str(gt), "--pred",
                                 str(pred), "--meta", str(tmp_path / "none.json")])
    assert result.exit_code != 0
    assert "none.json: LVOS meta file not found" in result.stderr
    assert "Traceback" not in result.output


def test_lvos_dataset_is_scorable(split: Path) -> None:
    ds = load_dataset("lvos", split)
    assert ds.ground_truth == split / "valid" / "Annotations"
    assert ds.lvos_meta == split / "valid" / "valid_meta.json" and not ds.notes
    assert [s.name for s in ds.sequences] == sorted(VIDEOS)
