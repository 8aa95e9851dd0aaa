"""Dataset layouts and the eval runner: protocols, resume, zip, scoring.

The runner is driven through the real ``segment_video`` with :class:`EchoTracker` in place of a
network (it keeps every given mask unchanged), so these tests check what each protocol feeds the
model, which frames are written, and the files, in well under a second per case. The builders
here also serve ``tests/cli/test_eval_cli.py``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import s3cli.api as api
from s3cli.errors import DatasetError, OutputError
from s3cli.eval.datasets import load_dataset
from s3cli.eval.runner import DONE_MARKER, EvalOptions, run_eval, write_zip
from s3cli.io.masks import davis_palette

H, W = 64, 96

# --------------------------------------------------------------------------------------------
# Synthetic datasets


def scene(t: int, *, late: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t``: noise with a static red box (object 1) and, from frame ``late`` on, a blue
    box (object 2). Returns (RGB image, index mask)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    image[16:40, 10:34] = (255, 0, 0)
    mask[16:40, 10:34] = 1
    if late is not None and t >= late:
        image[40:60, 60:84] = (0, 0, 255)
        mask[40:60, 60:84] = 2
    return image, mask


def save_mask(path: Path, mask: np.ndarray, *, binary: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if binary:  # DAVIS 2016 style: greyscale 0/255
        Image.fromarray(((mask > 0) * 255).astype(np.uint8), mode="L").save(path)
        return
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(davis_palette())
    im.save(path)


def save_frame(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def make_davis(
    root: Path,
    seqs: Iterable[str] = ("one", "two"),
    *,
    frames: int = 5,
    dense: bool = True,
    binary: bool = False,
    late: int | None = None,
) -> Path:
    """``JPEGImages/480p/<seq>/%05d.jpg`` and ``Annotations/480p/<seq>/%05d.png`` (every frame
    when ``dense``, else the first only, as DAVIS test-dev)."""
    for s, seq in enumerate(seqs):
        for t in range(frames):
            image, mask = scene(t, late=late, seed=s)
            save_frame(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", image)
            if dense or t == 0:
                save_mask(root / "Annotations" / "480p" / seq / f"{t:05d}.png", mask, binary=binary)
    return root


def make_youtube(
    root: Path,
    seqs: Iterable[str] = ("aaa", "bbb"),
    *,
    split: str = "valid",
    frames: int = 8,
    first: int = 0,
    late: int = 4,
) -> Path:
    """YouTube-VOS: frames ``00000``..; object 1 annotated at frame ``first``, object 2 only at
    frame ``late`` where it appears (its mask holds only it); ``meta.json`` lists every second
    frame from each object's first one."""
    folder = root / split
    meta: dict = {"videos": {}}
    for s, seq in enumerate(seqs):
        for t in range(frames):
            image, _ = scene(t, late=late, seed=s)
            save_frame(folder / "JPEGImages" / seq / f"{t:05d}.jpg", image)
        _, m0 = scene(first, seed=s)
        save_mask(folder / "Annotations" / seq / f"{first:05d}.png", m0)
        _, ml = scene(late, late=late, seed=s)
        save_mask(folder / "Annotations" / seq / f"{late:05d}.png", np.where(ml == 2, 2, 0))
        meta["videos"][seq] = {
            "objects": {
                "1": {"category": "box", "frames": [f"{t:05d}" for t in range(first, frames, 2)]},
                "2": {"category": "box", "frames": [f"{t:05d}" for t in range(late, frames, 2)]},
            }
        }
    (folder / "meta.json").write_text(json.dumps(meta))
    return root


def make_generic(root: Path, seqs: Iterable[str] = ("g1",), *, frames: int = 5,
                 late: int | None = 2, dense: bool = True, sub: str = "") -> Path:  # fmt: skip
    """``[sub/]JPEGImages/<seq>``, ``[sub/]Annotations/<seq>``: dense ground truth (object 2
    appearing at ``late``) or only the masks where objects appear."""
    folder = root / sub if sub else root
    for s, seq in enumerate(seqs):
        for t in range(frames):
            image, mask = scene(t, late=late, seed=s)
            save_frame(folder / "JPEGImages" / seq / f"{t:05d}.jpg", image)
            if dense:
                save_mask(folder / "Annotations" / seq / f"{t:05d}.png", mask)
            elif t == 0:
                save_mask(folder / "Annotations" / seq / f"{t:05d}.png", mask)
            elif t == late:
                save_mask(folder / "Annotations" / seq / f"{t:05d}.png", np.where(mask == 2, 2, 0))
    return root


def png_ids(path: Path) -> set[int]:
    return {int(v) for v in np.unique(np.array(Image.open(path))) if v}


# --------------------------------------------------------------------------------------------
# A tracker that echoes its masks


class EchoTracker:
    """Keeps the given masks: each object stays where it was last given (an oracle for the
    static boxes of :func:`scene`). Records which frames got masks and with which ids."""

    calls: list[tuple[str, int, tuple[int, ...]]] = []

    def __init__(self, source: str) -> None:
        self.source = source
        self.ids: list[int] = []
        self.index: np.ndarray | None = None
        self.t = -1

    @property
    def object_ids(self) -> list[int]:
        return list(self.ids)

    def step(self, image, mask=None, objects=None, end=False) -> torch.Tensor:
        self.t += 1
        h, w = image.shape[:2]
        if self.index is None:
            self.index = np.zeros((h, w), np.int64)
        if mask is not None:
            given = [int(i) for i in (objects or [])]
            EchoTracker.calls.append((self.source, self.t, tuple(given)))
            for i in given:
                if i not in self.ids:
                    self.ids.append(i)
            self.index[np.isin(self.index, given)] = 0
            keep = np.isin(mask, given)
            self.index[keep] = np.asarray(mask)[keep]
        prob = torch.zeros((1 + len(self.ids), h, w))
        prob[0] = torch.from_numpy(self.index == 0)
        for c, i in enumerate(self.ids):
            prob[c + 1] = torch.from_numpy(self.index == i)
        return prob

    def to_index_mask(self, prob: torch.Tensor) -> torch.Tensor:
        lut = torch.tensor([0, *self.ids], dtype=torch.int64)
        return lut[prob.argmax(0)]


@pytest.fixture
def echo(monkeypatch) -> type[EchoTracker]:
    """Replace model loading and the tracker with :class:`EchoTracker`."""
    EchoTracker.calls = []
    monkeypatch.setattr(api, "load_tracking_model", lambda model, weights, device: (None, "echo"))
    monkeypatch.setattr(
        api, "make_tracker", lambda net, name, options: EchoTracker(Path(options.source).name)
    )
    return EchoTracker


def _given(echo: type[EchoTracker], seq: str) -> list[tuple[int, tuple[int, ...]]]:
    return [(t, ids) for s, t, ids in echo.calls if s == seq]


def _opts(dataset: str, root: Path, out: Path, **kw) -> EvalOptions:
    return EvalOptions(dataset=dataset, root=root, output=out, device="cpu", **kw)


# --------------------------------------------------------------------------------------------
# Layouts


def test_davis_layout_split_file_and_ground_truth(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", ("one", "two", "three"))
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("two\none\n")
    ds = load_dataset("davis17", root)
    assert [s.name for s in ds.sequences] == ["one", "two"]  # the file's, sorted (as Cutie)
    assert ds.split == "val" and ds.label == "davis17-val"
    assert ds.ground_truth == root / "Annotations" / "480p"
    assert ds.zip_layout is None
    seq = ds.sequences[0]
    assert seq.frames == ("00000", "00001", "00002", "00003", "00004")
    assert seq.first_mask == root / "Annotations" / "480p" / "one" / "00000.png"
    assert ds.protocol.masks == "first" and ds.protocol.size == "480"
    assert ds.protocol.mem_every == 5 and ds.protocol.long_term is False
    # davis16 reads ImageSets/2016, or DAVIS 2016's own frame-pair lists
    (root / "ImageSets" / "480p").mkdir(parents=True)
    (root / "ImageSets" / "480p" / "val.txt").write_text(
        "/JPEGImages/480p/three/00000.jpg /Annotations/480p/three/00000.png\n"
        "/JPEGImages/480p/three/00001.jpg /Annotations/480p/three/00001.png\n"
    )
    assert [s.name for s in load_dataset("davis16", root).sequences] == ["three"]
    # no split file: every annotated sequence; --sequences keeps the order given
    (root / "ImageSets" / "480p" / "val.txt").unlink()
    assert [s.name for s in load_dataset("davis16", root).sequences] == ["one", "three", "two"]
    sub = load_dataset("davis16", root, sequences=["two", "one"])
    assert [s.name for s in sub.sequences] == ["two", "one"]


def test_davis_test_dev_has_no_ground_truth_and_zips_flat(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", dense=False)
    ds = load_dataset("davis17", root)
    assert ds.ground_truth is None and ds.zip_layout == "flat"
    assert ds.notes and "not dense" in ds.notes[0]


def test_youtube_layout_meta_frames(tmp_path: Path) -> None:
    root = make_youtube(tmp_path / "y", first=2)
    ds = load_dataset("ytvos18", root)
    assert ds.split == "valid" and ds.ground_truth is None and ds.zip_layout == "annotations"
    assert ds.protocol.masks == "all" and ds.protocol.long_term is False
    seq = ds.sequences[0]
    assert seq.mask_frames == ("00002", "00004")
    assert seq.start == 2
    assert seq.save == frozenset({"00002", "00004", "00006"})
    assert seq.expected_outputs == ("00002", "00004", "00006")
    assert seq.images == root / "valid" / "JPEGImages" / "aaa"
    assert load_dataset("ytvos18", root, "val").split == "valid"  # either spelling
    # the dense all_frames copy is preferred (Cutie's setting); --split val finds valid
    dense = root / "all_frames" / "valid_all_frames" / "JPEGImages"
    (dense / "aaa").mkdir(parents=True)
    (dense / "bbb").mkdir(parents=True)
    for seq_name in ("aaa", "bbb"):
        for t in range(8):
            save_frame(dense / seq_name / f"{t:05d}.jpg", scene(t)[0])
    assert load_dataset("ytvos19", root).sequences[0].images == dense / "aaa"


def test_mose_and_lvos_layouts(tmp_path: Path) -> None:
    mose = make_generic(tmp_path / "m", ("m1", "m2"), dense=False, sub="valid")
    ds = load_dataset("mose", mose)
    assert ds.zip_layout == "flat" and ds.ground_truth is None and ds.protocol.masks == "first"
    lvos = make_generic(tmp_path / "l", ("l1", "l2"), dense=True, sub="valid")
    ds = load_dataset("lvos", lvos)
    assert ds.zip_layout == "annotations" and ds.ground_truth is None
    assert ds.protocol.masks == "first-appearance" and ds.protocol.long_term is True
    # a meta file lists the sequences; Annotations_first_only is preferred when present
    (lvos / "valid" / "valid_meta.json").write_text(
        json.dumps({"videos": {"l2": {"objects": {"1": {"frame_range": {"start": "0"}}}}}})
    )
    first_only = lvos / "valid" / "Annotations_first_only" / "l2"
    _, m0 = scene(0)
    save_mask(first_only / "00000.png", m0)
    ds = load_dataset("lvos", lvos)
    assert [s.name for s in ds.sequences] == ["l2"]
    assert ds.sequences[0].masks == first_only


def test_generic_layout(tmp_path: Path) -> None:
    dense = load_dataset("generic", make_generic(tmp_path / "a", dense=True))
    assert dense.ground_truth == tmp_path / "a" / "Annotations" and dense.split is None
    assert dense.label == "generic" and dense.protocol.long_term is True
    sparse = load_dataset("generic", make_generic(tmp_path / "b", dense=False))
    assert sparse.ground_truth is None and sparse.notes
    assert sparse.sequences[0].mask_frames == ("00000", "00002")


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing-root", "dataset root not found"),
        ("davis-in-youtube", "use --dataset davis16 or davis17"),
        ("youtube-no-meta", "meta.json: not found"),
        ("youtube-meta-lacks-seq", "sequence bbb is not listed"),
        ("youtube-meta-bad-json", "is not valid JSON"),
        ("youtube-meta-frame-missing", "frame 00099 is listed in the meta file"),
        ("mask-without-frame", "no frame of this name"),
        ("no-masks", "no PNG masks"),
        ("unknown-sequence", "no sequence named nope"),
        ("split-file-missing", "split file not found"),
        ("generic-split", "generic datasets have no splits"),
        ("frames-missing", "frame folder not found"),
        ("davis16-multi-object", "holds 2 objects but DAVIS 2016 annotates one"),
    ],
)
def test_wrong_layouts_raise_dataset_errors(tmp_path: Path, case: str, needle: str) -> None:
    name, split, seqs = "ytvos19", None, None
    root = tmp_path / "r"
    if case == "missing-root":
        name = "davis17"
    elif case == "davis-in-youtube":
        make_davis(root)
    elif case.startswith("youtube"):
        make_youtube(root)
        meta = root / "valid" / "meta.json"
        data = json.loads(meta.read_text())
        if case == "youtube-no-meta":
            meta.unlink()
        elif case == "youtube-meta-lacks-seq":
            del data["videos"]["bbb"]
            meta.write_text(json.dumps(data))
        elif case == "youtube-meta-bad-json":
            meta.write_text("{")
        else:
            data["videos"]["aaa"]["objects"]["1"]["frames"].append("00099")
            meta.write_text(json.dumps(data))
    elif case == "mask-without-frame":
        name = "davis17"
        make_davis(root)
        save_mask(root / "Annotations" / "480p" / "one" / "00042.png", scene(0)[1])
    elif case == "no-masks":
        name = "davis17"
        make_davis(root)
        for p in (root / "Annotations" / "480p" / "two").iterdir():
            p.unlink()
    elif case == "unknown-sequence":
        name, seqs = "davis16", ["nope"]
        make_davis(root)
    elif case == "split-file-missing":
        name, split = "davis17", "test-dev"
        make_davis(root)
    elif case == "generic-split":
        name, split = "generic", "val"
        make_generic(root)
    elif case == "davis16-multi-object":
        name = "davis16"
        make_davis(root, late=0)
    elif case == "frames-missing":
        name = "generic"
        make_generic(root, ("g1", "g2"))
        for p in (root / "JPEGImages" / "g2").iterdir():
            p.unlink()
        (root / "JPEGImages" / "g2").rmdir()
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root, split, seqs)
    message = str(info.value)
    assert needle in message
    # <path>: <what is wrong> (<what to do>)
    assert message.startswith(str(tmp_path)) and message.endswith(")"), message


# --------------------------------------------------------------------------------------------
# Runs


def test_davis_run_uses_first_mask_only_scores_and_resumes(
    tmp_path: Path, echo, monkeypatch
) -> None:
    root = make_davis(tmp_path / "d", binary=True)
    out = tmp_path / "out"
    result = run_eval(_opts("davis16", root, out))
    # only the first mask is given, though every frame is annotated
    assert _given(echo, "one") == [(0, (1,))] and _given(echo, "two") == [(0, (1,))]
    for seq in ("one", "two"):
        names = sorted(p.name for p in (out / "Annotations" / seq).iterdir())
        assert names == [DONE_MARKER, *(f"{t:05d}.png" for t in range(5))]
        marker = json.loads((out / "Annotations" / seq / DONE_MARKER).read_text())
        assert marker["frames"] == 5 and marker["eval"]["size"] == "480"
    assert result.zip_path is None and result.frames == 10 and not any(
        s.resumed for s in result.sequences
    )
    assert result.model == "echo"
    assert result.report is not None
    assert result.report.summary.jf_mean == pytest.approx(1.0)
    assert [s.name for s in result.report.sequences] == ["one", "two"]

    # a second run finds both done: nothing is loaded, the score is the same
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded for a finished run")

    monkeypatch.setattr(api, "load_tracking_model", boom)
    again = run_eval(_opts("davis16", root, out))
    assert all(s.resumed for s in again.sequences) and again.frames == 10
    assert again.model == "echo"
    assert again.report is not None and again.report.summary.jf_mean == pytest.approx(1.0)


def test_resume_runs_only_unfinished_sequences(tmp_path: Path, echo) -> None:
    root = make_davis(tmp_path / "d", ("one", "two", "three"))
    out = tmp_path / "out"
    run_eval(_opts("davis17", root, out))
    (out / "Annotations" / "two" / DONE_MARKER).unlink()  # as if stopped during "two"
    (out / "Annotations" / "three" / "00003.png").unlink()  # marked done but incomplete
    echo.calls = []
    result = run_eval(_opts("davis17", root, out))
    assert sorted({s for s, _, _ in echo.calls}) == ["three", "two"]
    assert [s.resumed for s in result.sequences] == [True, False, False]
    assert (out / "Annotations" / "three" / "00003.png").is_file()


def test_resume_with_other_settings_is_refused(tmp_path: Path, echo) -> None:
    root = make_davis(tmp_path / "d", ("one",))
    out = tmp_path / "out"
    run_eval(_opts("davis17", root, out))
    with pytest.raises(OutputError, match=r"other settings: size '480' \(now '64'\)"):
        run_eval(_opts("davis17", root, out, size="64"))
    with pytest.raises(OutputError, match="mem_every 5"):
        run_eval(_opts("davis17", root, out, mem_every=3))


def test_youtube_run_all_masks_meta_frames_and_zip(tmp_path: Path, echo) -> None:
    root = make_youtube(tmp_path / "y", ("aaa", "bbb"), first=0, late=4)
    # bbb starts later: its first mask is at frame 2
    for p in (root / "valid" / "Annotations" / "bbb").iterdir():
        p.unlink()
    save_mask(root / "valid" / "Annotations" / "bbb" / "00002.png", scene(2)[1])
    save_mask(
        root / "valid" / "Annotations" / "bbb" / "00004.png",
        np.where(scene(4, late=4)[1] == 2, 2, 0),
    )
    meta_path = root / "valid" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["bbb"]["objects"]["1"]["frames"] = ["00002", "00004", "00006"]
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "out"
    result = run_eval(_opts("ytvos19", root, out))
    # every given mask is used; the object of frame 4 joins there; frames before the first
    # mask are not processed
    assert _given(echo, "aaa") == [(0, (1,)), (4, (2,))]
    assert _given(echo, "bbb") == [(0, (1,)), (2, (2,))]  # tracker frame 0 is video frame 2
    assert result.frames == 8 + 6
    assert result.report is None
    pred = out / "Annotations"
    assert sorted(p.name for p in (pred / "aaa").glob("*.png")) == [
        "00000.png", "00002.png", "00004.png", "00006.png"
    ]
    assert sorted(p.name for p in (pred / "bbb").glob("*.png")) == [
        "00002.png", "00004.png", "00006.png"
    ]
    assert png_ids(pred / "aaa" / "00002.png") == {1}
    assert png_ids(pred / "aaa" / "00006.png") == {1, 2}
    assert result.zip_path == out / "ytvos19-valid.zip"
    with zipfile.ZipFile(result.zip_path) as zf:
        assert sorted(zf.namelist()) == [
            "Annotations/aaa/00000.png", "Annotations/aaa/00002.png",
            "Annotations/aaa/00004.png", "Annotations/aaa/00006.png",
            "Annotations/bbb/00002.png", "Annotations/bbb/00004.png",
            "Annotations/bbb/00006.png",
        ]  # fmt: skip
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_generic_dense_annotations_give_first_appearances(tmp_path: Path, echo) -> None:
    root = make_generic(tmp_path / "g", ("g1",), frames=5, late=2, dense=True)
    out = tmp_path / "out"
    result = run_eval(_opts("generic", root, out))
    # each object once, at the frame where it first appears, holding only the new object
    assert _given(echo, "g1") == [(0, (1,)), (2, (2,))]
    derived = out / ".inputs" / "g1"
    assert sorted(p.name for p in derived.iterdir()) == ["00000.png", "00002.png"]
    assert png_ids(derived / "00002.png") == {2}
    assert png_ids(out / "Annotations" / "g1" / "00004.png") == {1, 2}
    # DAVIS scoring knows only the objects of the first frame: a late object stops it
    assert result.report is None and result.zip_path is None
    assert any("objects appear after the first annotated frame" in n for n in result.notes)


def test_generic_dense_annotations_are_scored(tmp_path: Path, echo) -> None:
    root = make_generic(tmp_path / "g", ("g1", "g2"), frames=4, late=None, dense=True)
    result = run_eval(_opts("generic", root, tmp_path / "out"))
    assert _given(echo, "g1") == [(0, (1,))]
    assert result.report is not None and result.report.summary.jf_mean == pytest.approx(1.0)
    assert [s.name for s in result.report.sequences] == ["g1", "g2"]


def test_lvos_and_mose_zips(tmp_path: Path, echo) -> None:
    lvos = make_generic(tmp_path / "l", ("l1",), dense=False, late=2, sub="valid")
    result = run_eval(_opts("lvos", lvos, tmp_path / "lo"))
    # sparse first-appearance masks are used as they are, not copied
    assert not (tmp_path / "lo" / ".inputs").exists()
    assert _given(echo, "l1") == [(0, (1,)), (2, (2,))]
    with zipfile.ZipFile(result.zip_path) as zf:
        assert sorted(zf.namelist()) == [f"Annotations/l1/{t:05d}.png" for t in range(5)]
    mose = make_generic(tmp_path / "m", ("m1",), dense=False, late=2, sub="valid")
    echo.calls = []
    result = run_eval(_opts("mose", mose, tmp_path / "mo"))
    assert _given(echo, "m1") == [(0, (1,))]  # the first mask only
    assert result.zip_path == tmp_path / "mo" / "mose-valid.zip"
    with zipfile.ZipFile(result.zip_path) as zf:
        assert sorted(zf.namelist()) == [f"m1/{t:05d}.png" for t in range(5)]


def test_write_zip_refuses_missing_predictions(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", ("one",), dense=False)
    ds = load_dataset("davis17", root)
    pred = tmp_path / "pred"
    (pred / "one").mkdir(parents=True)
    for t in range(4):
        save_mask(pred / "one" / f"{t:05d}.png", scene(t)[1])
    target = tmp_path / "sub.zip"
    with pytest.raises(OutputError, match=r"one/00004.png: prediction missing"):
        write_zip(target, pred, ds.sequences)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "pred"]  # nothing left behind
    save_mask(pred / "one" / "00004.png", scene(4)[1])
    write_zip(target, pred, ds.sequences)
    with zipfile.ZipFile(target) as zf:
        assert zf.namelist() == [f"one/{t:05d}.png" for t in range(5)]


def test_output_over_the_dataset_is_refused(tmp_path: Path, echo) -> None:
    root = make_generic(tmp_path / "g", dense=False)
    with pytest.raises(OutputError, match="would overwrite the dataset's masks"):
        run_eval(_opts("generic", root, root))
    yt = make_youtube(tmp_path / "y")
    with pytest.raises(OutputError, match="would overwrite the dataset's masks"):
        run_eval(_opts("ytvos19", yt, yt / "valid"))
    assert echo.calls == []


def test_lvos_split_is_scored_over_frame_ranges(tmp_path: Path, echo) -> None:
    from s3cli.eval.lvos_scoring import LvosReport
    from tests.eval.lvos_synth import make_lvos

    root = make_lvos(tmp_path / "l")
    result = run_eval(_opts("lvos", root, tmp_path / "out"))
    # each object starts from its first mask: id 4 of R3UJGYwy at frame 3, id 5 of bbbb0002 at 2
    assert _given(echo, "R3UJGYwy") == [(0, (1,)), (3, (4,))]
    assert _given(echo, "bbbb0002") == [(0, (2,)), (2, (5,))]
    report = result.report
    assert isinstance(report, LvosReport)
    names = [o.name for o in report.objects]
    assert names == ["R3UJGYwy_1", "R3UJGYwy_2", "aaaa0001_1", "aaaa0001_2", "bbbb0002_1",
                     "bbbb0002_2"]
    # the first scored frame of aaaa0001 object 1 is frame 00000005: its J is the IoU there
    obj = report.objects[2]
    gt = np.array(Image.open(root / "valid" / "Annotations" / "aaaa0001" / "00000005.png")) == 1
    pred = np.array(Image.open(result.predictions / "aaaa0001" / "00000005.png")) == 1
    assert obj.frames[0] == "00000005"
    assert obj.j[0] == pytest.approx((gt & pred).sum() / (gt | pred).sum(), abs=1e-12)
    assert 0 < report.summary["J&F-Mean"] < 1 and not result.notes
    with zipfile.ZipFile(result.zip_path) as zf:
        assert "Annotations/R3UJGYwy/00000045.png" in zf.namelist()
