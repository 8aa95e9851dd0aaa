"""J, F, their statistics and whole-folder scoring against the official tools' golden numbers.

``shared/fixtures/metrics/expected.json`` holds what davis2017-evaluation (and vos-benchmark and the
DAVIS 2016 code) computed on the fixture masks. Per-frame values must match exactly; statistics
and global numbers to 1e-12 (summation order may change the last ulp).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from s3cli.errors import DatasetError, InputError
from s3cli.eval.metrics import (
    boundary_map,
    boundary_tolerance,
    decay_cut_points,
    disk,
    f_measure,
    frame_scores,
    jaccard,
    statistics,
)
from s3cli.eval.scoring import read_label_map, score_folders
from tests.conftest import FIXTURES, SHARED, require_shared

METRICS = FIXTURES / "metrics"
DAVIS16 = SHARED / "data" / "davis16-mini" / "Annotations" / "480p"
FRAME_TOL = 1e-15
STAT_TOL = 1e-12
MAIN_SEQUENCES = [
    "absent_after_first_frame",
    "absent_in_gt",
    "empty_gt_frames",
    "empty_pred",
    "erode_dilate",
    "full_frame",
    "late_gt_object",
    "long_25frames",
    "multi_missing",
    "noncontiguous_ids",
    "odd_size_481x853",
    "perfect",
    "shift_growing",
    "short_3frames",
    "swapped_ids",
    "thin",
    "tiny",
]
STAT_KEYS = ("J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay")


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads(require_shared(METRICS / "expected.json").read_text())


def _labels(side: str, seq: str, frame: str, root: Path | None = None) -> np.ndarray:
    base = METRICS / side if root is None else root
    return read_label_map(base / seq / f"{frame}.png", ground_truth=side == "gt")


def _close(a: float | None, b: float | None, tol: float) -> bool:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return abs(a - b) <= tol


def _stats_dict(j: Any, f: Any, **kw: Any) -> dict[str, float]:
    sj, sf = statistics(j, **kw), statistics(f, **kw)
    return dict(
        zip(STAT_KEYS, (sj.mean, sj.recall, sj.decay, sf.mean, sf.recall, sf.decay), strict=True)
    )


# --------------------------------------------------------------------------------------------
# Building blocks


def test_boundary_map_rules() -> None:
    m = np.zeros((4, 5), bool)
    m[1:3, 1:3] = True
    b = boundary_map(m)
    expected = np.array(
        [
            [1, 1, 1, 0, 0],  # outside pixels above (incl. the diagonal neighbour of (1,1))
            [1, 0, 1, 0, 0],  # outside on the left, inside on the right
            [1, 1, 1, 0, 0],  # inside on the bottom row of the object
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(b, expected)
    assert not boundary_map(np.ones((6, 7), bool)).any()  # all ones: empty boundary
    assert not boundary_map(np.zeros((6, 7), bool)).any()
    # Edges on the image border give no boundary; the bottom-right pixel never counts.
    corner = np.zeros((3, 3), bool)
    corner[2, 2] = True
    np.testing.assert_array_equal(
        boundary_map(corner), [[0, 0, 0], [0, 1, 1], [0, 1, 0]]
    )  # last row: right neighbour only; last column: lower neighbour only


def test_disk_and_tolerance(expected: dict[str, Any]) -> None:
    assert disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert int(disk(2).sum()) == 13
    assert int(disk(8).sum()) == 197
    for (h, w), px in {(120, 200): 2, (64, 96): 1, (481, 853): 8, (480, 854): 8}.items():
        assert boundary_tolerance(h, w) == px
    assert boundary_tolerance(480, 854, bound_th=3) == 3
    for name, case in expected["cases"]["main"].items():
        assert boundary_tolerance(case["height"], case["width"]) == case["bound_pix"], name


@pytest.mark.parametrize(
    ("n", "cuts"),
    [(8, [0, 2, 4, 5, 7]), (5, [0, 1, 2, 3, 4]), (23, [0, 6, 11, 17, 22]), (1, [0] * 5)],
)
def test_decay_cut_points(n: int, cuts: list[int]) -> None:
    assert decay_cut_points(n).tolist() == cuts
    assert decay_cut_points(n, uint8_wrap=True).tolist() == cuts


def test_decay_cut_points_overflow() -> None:
    assert decay_cut_points(300, uint8_wrap=True).tolist() == [0, 75, 150, 224, 43]
    assert decay_cut_points(300).tolist() == [0, 75, 150, 224, 299]


def test_statistics_edge_cases() -> None:
    one = statistics([0.7])
    assert (one.mean, one.recall, one.decay) == (0.7, 1.0, 0.0)
    half = statistics([0.5, 0.5, 0.51])
    assert half.recall == pytest.approx(1 / 3)  # strictly greater than 0.5
    with_nan = statistics([1.0, float("nan"), 0.0, 1.0, 1.0])
    assert with_nan.mean == 0.75
    empty = statistics([])
    assert all(math.isnan(v) for v in (empty.mean, empty.recall, empty.decay))


# --------------------------------------------------------------------------------------------
# Per-frame values, main set (DAVIS 2017 semi-supervised)


@pytest.mark.parametrize("seq", MAIN_SEQUENCES)
def test_per_frame_j_f_exact(expected: dict[str, Any], seq: str) -> None:
    ref = expected["davis2017_semi"]["sequences"][seq]
    n = ref["num_objects"]
    for t, frame in enumerate(ref["frames_evaluated"]):
        gt, pred = _labels("gt", seq, frame), _labels("pred", seq, frame)
        j_fast, f_fast = frame_scores(gt, pred, n)
        for k in range(1, n + 1):
            obj = ref["objects"][str(k)]
            want_j, want_f = obj["J"][t], obj["F"][t]
            assert abs(j_fast[k - 1] - want_j) <= FRAME_TOL, (seq, frame, k, "J fast")
            assert abs(f_fast[k - 1] - want_f) <= FRAME_TOL, (seq, frame, k, "F fast")
            assert abs(jaccard(gt == k, pred == k) - want_j) <= FRAME_TOL, (seq, frame, k)
            assert abs(f_measure(gt == k, pred == k) - want_f) <= FRAME_TOL, (seq, frame, k)


def test_per_object_statistics(expected: dict[str, Any]) -> None:
    for seq, ref in expected["davis2017_semi"]["sequences"].items():
        for k, obj in ref["objects"].items():
            ours = _stats_dict(obj["J"], obj["F"])
            for key in STAT_KEYS:
                assert _close(ours[key], obj[key], STAT_TOL), (seq, k, key)


def test_all_frames_functions(expected: dict[str, Any]) -> None:
    """The DAVIS functions on every frame (first and last included), not an official protocol."""
    for seq, ref in expected["davis2017_functions_all_frames"]["sequences"].items():
        n = ref["num_objects"]
        for t in (0, len(ref["frames_evaluated"]) - 1):
            frame = ref["frames_evaluated"][t]
            j, f = frame_scores(_labels("gt", seq, frame), _labels("pred", seq, frame), n)
            for k in range(1, n + 1):
                assert abs(j[k - 1] - ref["objects"][str(k)]["J"][t]) <= FRAME_TOL
                assert abs(f[k - 1] - ref["objects"][str(k)]["F"][t]) <= FRAME_TOL
        for k, obj in ref["objects"].items():
            ours = _stats_dict(obj["J"], obj["F"])
            assert all(_close(ours[key], obj[key], STAT_TOL) for key in STAT_KEYS), (seq, k)


def test_vos_benchmark_per_frame_agrees(expected: dict[str, Any]) -> None:
    """vos-benchmark's per-frame J/F (also for ids DAVIS skips) equal ours bit for bit."""
    vos = expected["vos_benchmark"]["skip_first_last"]["sequences"]
    for seq, ref in vos.items():
        frames = ref["frames_evaluated"]
        for k, obj in ref["objects"].items():
            start = frames.index(obj["first_frame"])
            for t, frame in enumerate(frames[start:]):
                gt, pred = _labels("gt", seq, frame), _labels("pred", seq, frame)
                j, f = frame_scores(gt, pred, [int(k)])
                assert abs(j[0] - obj["J"][t]) <= FRAME_TOL, (seq, k, frame)
                assert abs(f[0] - obj["F"][t]) <= FRAME_TOL, (seq, k, frame)


def _brute_force_f(gt: np.ndarray, pred: np.ndarray, r: int) -> float:
    """F with the disk test done pixel by pixel, independent of OpenCV."""
    gb, pb = boundary_map(gt), boundary_map(pred)
    gy, gx = np.nonzero(gb)
    py, px = np.nonzero(pb)
    if len(py) == 0 and len(gy) == 0:
        return 1.0
    if len(py) == 0 or len(gy) == 0:
        return 0.0
    d2 = (py[:, None] - gy[None, :]) ** 2 + (px[:, None] - gx[None, :]) ** 2
    precision = np.count_nonzero((d2 <= r * r).any(axis=1)) / float(len(py))
    recall = np.count_nonzero((d2 <= r * r).any(axis=0)) / float(len(gy))
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def test_fast_path_equals_reference_on_random_masks() -> None:
    """Crop-based frame_scores == whole-image jaccard/f_measure == a brute-force F."""
    rng = np.random.default_rng(0)
    for trial in range(120):
        h, w = rng.integers(8, 70, size=2)
        n = int(rng.integers(1, 5))
        gt = rng.integers(0, n + 1, size=(h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)
        gt = gt[:h, :w].astype(np.uint8)
        pred = np.roll(gt, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
        noise = rng.random((h, w)) < 0.05
        pred[noise] = rng.integers(0, n + 1, size=int(noise.sum()))
        if trial % 10 == 0:
            pred[:] = 0
        r = int(rng.integers(1, 6))
        j, f = frame_scores(gt, pred, n, bound_pix=r)
        for k in range(1, n + 1):
            g, p = gt == k, pred == k
            assert j[k - 1] == jaccard(g, p)
            assert f[k - 1] == f_measure(g, p, bound_pix=r)
            assert abs(f[k - 1] - _brute_force_f(g, p, r)) <= FRAME_TOL


# --------------------------------------------------------------------------------------------
# Whole folders


def _check_sequences(report: Any, ref_sequences: dict[str, Any]) -> None:
    assert [s.name for s in report.sequences] == sorted(ref_sequences)
    for s in report.sequences:
        ref = ref_sequences[s.name]
        assert list(s.frames) == ref["frames_evaluated"]
        assert len(s.objects) == ref["num_objects"]
        assert s.bound_pix == ref["bound_pix"]
        for obj in s.objects:
            want = ref["objects"][str(obj.object_id)]
            assert np.max(np.abs(np.subtract(obj.j, want["J"]))) <= FRAME_TOL
            assert np.max(np.abs(np.subtract(obj.f, want["F"]))) <= FRAME_TOL
            ours = dict(
                zip(
                    STAT_KEYS,
                    (*vars(obj.j_stats).values(), *vars(obj.f_stats).values()),
                    strict=True,
                )
            )
            for key in STAT_KEYS:
                assert _close(ours[key], want[key], STAT_TOL), (s.name, obj.object_id, key)


def _check_global(report: Any, ref_global: dict[str, float | None]) -> None:
    for key, value in report.summary.as_dict().items():
        assert _close(value, ref_global[key], STAT_TOL), key


@pytest.mark.parametrize("workers", [1, 2])
def test_score_main_set(expected: dict[str, Any], workers: int) -> None:
    ref = expected["davis2017_semi"]
    report = score_folders(require_shared(METRICS / "gt"), METRICS / "pred", workers=workers)
    _check_sequences(report, ref["sequences"])
    _check_global(report, ref["global"])
    assert report.summary.num_objects == 38
    assert report.num_frames == 141
    assert any("late_gt_object" in note for note in report.notes)


def test_official_csv_text(expected: dict[str, Any]) -> None:
    """The official CSVs (3 decimals) are our numbers rounded."""
    official = expected["davis2017_semi"]["evaluation_method_py"]
    report = score_folders(require_shared(METRICS / "gt"), METRICS / "pred", workers=1)
    rows = ["Sequence,J-Mean,F-Mean"]
    for s in report.sequences:
        for o in s.objects:
            rows.append(f"{s.name}_{o.object_id},{o.j_stats.mean:.3f},{o.f_stats.mean:.3f}")
    assert "\n".join(rows) + "\n" == official["per-sequence_results-val.csv"]
    header = "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    values = ",".join(f"{v:.3f}" for v in report.summary.as_dict().values())
    assert f"{header}\n{values}\n" == official["global_results-val.csv"]


def test_score_binarised_main_set_as_davis16(expected: dict[str, Any], tmp_path: Path) -> None:
    """Main set with every id merged, GT stored as DAVIS-2016 greyscale 0/255 PNGs."""
    ref = expected["davis2016_binary"]
    for seq in MAIN_SEQUENCES:
        for side in ("gt", "pred"):
            (tmp_path / side / seq).mkdir(parents=True)
        for path in sorted((require_shared(METRICS / "gt") / seq).glob("*.png")):
            gt = read_label_map(path, ground_truth=True)
            Image.fromarray(np.where(gt > 0, 255, 0).astype(np.uint8), "L").save(
                tmp_path / "gt" / seq / path.name
            )
            pred_path = METRICS / "pred" / seq / path.name
            pred = read_label_map(pred_path, ground_truth=False)
            out = Image.fromarray((pred > 0).astype(np.uint8), "L")
            out.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
            out.save(tmp_path / "pred" / seq / path.name)
    report = score_folders(tmp_path / "gt", tmp_path / "pred", workers=1)
    _check_sequences(report, ref["davis2017_code_on_binarized"]["sequences"])
    _check_global(report, ref["davis2017_code_on_binarized"]["global"])
    # The DAVIS 2016 functions: same per-frame values, statistics within an ulp.
    old = ref["davis2016_original_functions"]
    for s in report.sequences:
        want = old["sequences"][s.name]
        assert list(s.objects[0].j) == want["J"] and list(s.objects[0].f) == want["F"]
    for key, value in old["average_over_sequences"].items():
        assert _close(report.summary.as_dict()[key], value, STAT_TOL), key


def test_score_davis16_real(expected: dict[str, Any]) -> None:
    """Real DAVIS-2016 GT (greyscale 0/255) is read as object 1, as the remapped official run."""
    ref = expected["davis16_real"]
    report = score_folders(
        require_shared(DAVIS16),
        require_shared(METRICS / "davis16_real" / "pred"),
        sequences=["blackswan", "car-shadow", "motocross-jump"],
        workers=1,
    )
    _check_sequences(report, ref["gt_255_remapped_to_1"]["davis2017_semi"]["sequences"])
    _check_global(report, ref["gt_255_remapped_to_1"]["davis2017_semi"]["global"])
    for key, value in ref["davis2016_original_functions"]["average_over_sequences"].items():
        assert _close(report.summary.as_dict()[key], value, STAT_TOL), key


# --------------------------------------------------------------------------------------------
# Quirks


def _quirk(name: str) -> tuple[Path, Path]:
    base = require_shared(METRICS / "quirks" / name)
    return base / "gt", base / "pred"


@pytest.mark.parametrize("name", ["pred_missing_first_last", "void_255"])
def test_quirks_scored_as_official(expected: dict[str, Any], name: str) -> None:
    ref = expected["quirks"][name]["davis2017_semi"]
    report = score_folders(*_quirk(name), workers=1)
    _check_sequences(report, ref["sequences"])
    _check_global(report, ref["global"])


def test_quirk_long_sequence_decay(expected: dict[str, Any]) -> None:
    """300 evaluated frames: the official uint8 bin overflow gives NaN decay (reproducible
    with uint8_decay_wrap); by default the decay uses the intended bins."""
    ref = expected["quirks"]["long_302frames"]["davis2017_semi"]
    official = score_folders(*_quirk("long_302frames"), workers=1, uint8_decay_wrap=True)
    _check_sequences(official, ref["sequences"])
    _check_global(official, ref["global"])
    assert math.isnan(official.summary.j_decay) and math.isnan(official.summary.f_decay)

    report = score_folders(*_quirk("long_302frames"), workers=1)
    obj = report.sequences[0].objects[0]
    want = ref["sequences"]["seq"]["objects"]["1"]
    assert list(obj.j) == want["J"] and list(obj.f) == want["F"]
    j = np.asarray(want["J"])
    manual = j[0:76].mean() - j[224:300].mean()  # bins 0 and 3 of 300 values: 0..75, 224..299
    assert abs(obj.j_stats.decay - manual) <= STAT_TOL
    assert abs(report.summary.j_mean - ref["global"]["J-Mean"]) <= STAT_TOL


@pytest.mark.parametrize("name", ["binary_0_255_gt", "pred_0_255"])
def test_quirk_greyscale_0_255_is_object_1(name: str) -> None:
    """0/255 greyscale masks (DAVIS 2016 GT, binary predictions) are object 1. The official
    DAVIS 2017 tool stops on them ('index higher than the number of objects')."""
    gt_root, pred_root = _quirk(name)
    report = score_folders(gt_root, pred_root, workers=1)
    seq = report.sequences[0]
    assert len(seq.objects) == 1
    for t, frame in enumerate(seq.frames):
        with (
            Image.open(gt_root / "seq" / f"{frame}.png") as g,
            Image.open(pred_root / "seq" / f"{frame}.png") as p,
        ):
            gt, pred = np.asarray(g) > 0, np.asarray(p) > 0
        assert seq.objects[0].j[t] == jaccard(gt, pred)
        assert seq.objects[0].f[t] == f_measure(gt, pred)


def _message_ok(message: str, path_part: str) -> None:
    assert "\n" not in message
    assert message.startswith(str(path_part)), message
    assert message.endswith(")") and " (" in message, message


def test_quirk_missing_prediction_frame() -> None:
    gt_root, pred_root = _quirk("missing_pred_frame")
    with pytest.raises(InputError) as err:
        score_folders(gt_root, pred_root, workers=1)
    _message_ok(str(err.value), str(pred_root / "seq" / "00003.png"))
    assert "not found" in str(err.value)


def test_quirk_size_mismatch() -> None:
    gt_root, pred_root = _quirk("size_mismatch")
    with pytest.raises(InputError) as err:
        score_folders(gt_root, pred_root, workers=1)
    _message_ok(str(err.value), str(pred_root / "seq" / "00001.png"))
    assert "90x60" in str(err.value) and "96x64" in str(err.value)


def test_quirk_two_frames() -> None:
    gt_root, pred_root = _quirk("two_frames")
    with pytest.raises(DatasetError) as err:
        score_folders(gt_root, pred_root, workers=1)
    _message_ok(str(err.value), str(gt_root / "seq"))


def test_quirk_prediction_id_not_in_first_frame() -> None:
    gt_root, pred_root = _quirk("pred_label_not_in_first_gt_frame")
    with pytest.raises(InputError) as err:
        score_folders(gt_root, pred_root, workers=2)  # error crosses the process pool
    _message_ok(str(err.value), str(pred_root / "seq" / "00005.png"))
    assert "object id 2" in str(err.value)


# --------------------------------------------------------------------------------------------
# Layout errors and small cases


def _write(path: Path, labels: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), "L")
    if mode == "P":
        image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    elif mode == "RGB":
        image = image.convert("RGB")
    image.save(path)


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="ground-truth folder not found"):
        score_folders(tmp_path / "nope", tmp_path)
    (tmp_path / "gt").mkdir()
    _write(tmp_path / "gt" / "00000.png", np.zeros((4, 4)))
    with pytest.raises(DatasetError, match="pass its parent folder"):
        score_folders(tmp_path / "gt", tmp_path)
    frame = np.zeros((8, 8))
    frame[2:5, 2:5] = 1
    for t in range(3):
        _write(tmp_path / "gt2" / "a" / f"{t:05d}.png", frame)
    with pytest.raises(InputError, match="prediction folder not found"):
        score_folders(tmp_path / "gt2", tmp_path / "nope")
    (tmp_path / "pred").mkdir()
    with pytest.raises(InputError, match="no predictions for sequence 'a'"):
        score_folders(tmp_path / "gt2", tmp_path / "pred")
    _write(tmp_path / "pred" / "a" / "00001.png", frame, mode="RGB")
    with pytest.raises(InputError, match="is a RGB-mode image"):
        score_folders(tmp_path / "gt2", tmp_path / "pred")
    (tmp_path / "pred" / "a" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot be read as a PNG mask"):
        score_folders(tmp_path / "gt2", tmp_path / "pred")


def test_first_frame_without_objects(tmp_path: Path) -> None:
    """N = 0 (nothing in the first GT frame): nothing scored, a note, NaN sequence numbers."""
    empty, obj = np.zeros((8, 8)), np.zeros((8, 8))
    obj[2:5, 2:5] = 1
    for t, labels in enumerate((empty, obj, obj)):
        _write(tmp_path / "gt" / "a" / f"{t:05d}.png", labels)
        _write(tmp_path / "pred" / "a" / f"{t:05d}.png", empty)
    report = score_folders(tmp_path / "gt", tmp_path / "pred")
    assert report.sequences[0].objects == ()
    assert math.isnan(report.summary.jf_mean) and report.summary.num_objects == 0
    assert any("no objects" in note for note in report.notes)


def test_extra_prediction_sequences_are_ignored(tmp_path: Path) -> None:
    gt_root, pred_root = _quirk("void_255")
    shutil.copytree(pred_root, tmp_path / "pred")
    shutil.copytree(pred_root / "seq", tmp_path / "pred" / "other")
    report = score_folders(gt_root, tmp_path / "pred")
    assert [s.name for s in report.sequences] == ["seq"]
