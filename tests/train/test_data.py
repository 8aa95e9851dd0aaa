"""Training data: layouts and their errors, sampling rules, augmentation, determinism."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.errors import DatasetError
from s3cli.train.config import DataSpec, TrainConfig
from s3cli.train.data import (
    SampleKey,
    SequenceSampler,
    VOSTrainDataset,
    collate,
    cut_and_paste,
    geometry,
    scan_dataset,
    warp_mask,
)
from s3cli.train.losses import LossComputer, dice_loss, point_sample
from s3cli.train.wrapper import add_drop_path, drop_path
from tests.conftest import SHARED, require_shared
from tests.train.synth import make_ytvos

DAVIS_MINI = SHARED / "data" / "davis16-mini"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_ytvos(tmp_path_factory.mktemp("synth"), videos=2, frames=5, objects=2)


def _dataset(sources, **kw) -> VOSTrainDataset:
    values = dict(seq_length=3, crop_size=48, num_objects=3, merge_prob=0.5, seed=1, rank=0,
                  local_batch=2, world_size=1, max_skip_at=lambda it: 5)
    values.update(kw)
    return VOSTrainDataset(sources, **values)


def test_scan_ytvos_layouts(synth):
    for root in (synth, synth / "train"):
        src = scan_dataset(DataSpec("ytvos", str(root)), seq_length=3)
        assert [v.name for v in src.videos] == ["vid00", "vid01"]
        assert src.frame_interval == 5 and src.repeat == 1 and src.num_frames == 10
    # too-short sequences are left out; none left is an error
    with pytest.raises(DatasetError, match="no sequence has 6 annotated frames"):
        scan_dataset(DataSpec("ytvos", str(synth)), seq_length=6)


def test_scan_davis_mini_and_subset(tmp_path):
    data = require_shared(DAVIS_MINI)
    src = scan_dataset(DataSpec("davis", str(data)), seq_length=8, davis_repeat=5)
    assert len(src.videos) == 7 and src.repeat == 5 and src.frame_interval == 2
    assert SequenceSampler([src], seq_length=8, crop_size=32).item_source.size == 5 * 483
    # a DAVIS root with ImageSets/2017/train.txt trains on those sequences only
    root = tmp_path / "davis"
    for sub in ("JPEGImages/480p", "Annotations/480p"):
        (root / sub).mkdir(parents=True)
        for seq in ("blackswan", "camel"):
            (root / sub / seq).symlink_to(data / sub / seq)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "train.txt").write_text("camel\n")
    src = scan_dataset(DataSpec("davis", str(root)), seq_length=3)
    assert [v.name for v in src.videos] == ["camel"]


@pytest.mark.parametrize(
    "kind, make, needle",
    [
        ("ytvos", lambda r: None, "no such folder"),
        ("ytvos", lambda r: (r / "JPEGImages" / "480p").mkdir(parents=True),
         "looks like a DAVIS root: use --data davis=DIR"),
        ("davis", lambda r: (r / "train" / "JPEGImages").mkdir(parents=True),
         "not a DAVIS training layout"),
        ("ytvos", lambda r: (r / "valid" / "JPEGImages").mkdir(parents=True), "only valid/"),
        ("mose", lambda r: (r / "JPEGImages" / "v").mkdir(parents=True),
         "Annotations: missing beside"),
    ],
)
def test_wrong_layout_errors(tmp_path, kind, make, needle):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(DatasetError) as exc:
        scan_dataset(DataSpec(kind, str(root)), seq_length=3)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and msg.startswith(str(root))


def test_missing_masks_and_mismatched_names(synth, tmp_path):
    root = tmp_path / "y"
    shutil.copytree(synth, root)
    shutil.rmtree(root / "train" / "Annotations" / "vid01")
    with pytest.raises(DatasetError, match="vid01: missing"):
        scan_dataset(DataSpec("ytvos", str(root)), seq_length=3)
    (root / "train" / "Annotations" / "vid01").mkdir()
    Image.new("P", (4, 4)).save(root / "train" / "Annotations" / "vid01" / "frame.png")
    with pytest.raises(DatasetError, match="no mask is named like a frame"):
        scan_dataset(DataSpec("ytvos", str(root)), seq_length=3)


def test_cli_reports_bad_layout_in_one_line(tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--data", f"ytvos={tmp_path}", "--model", "cutie-small", "--output",
        str(tmp_path / "o"), "--crop-size", "64",
    ])
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not a YouTube-VOS training layout" in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_frames_respect_max_skip():
    sampler = SequenceSampler.__new__(SequenceSampler)
    sampler.seq_length = 8
    rng = np.random.default_rng(0)
    for skip in (1, 2, 3):
        for _ in range(200):
            frames = sampler._frames(rng, 40, int(rng.integers(40)), skip)
            ordered = sorted(frames)
            assert len(set(frames)) == 8 and frames in (ordered, ordered[::-1])
            assert max(np.diff(ordered)) <= skip


def test_samples_shapes_determinism(synth):
    src = scan_dataset(DataSpec("ytvos", str(synth)), seq_length=3)
    ds = _dataset([src])
    a, b = ds[SampleKey(3, 1)], ds[SampleKey(3, 1)]
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    c = ds[SampleKey(4, 0)]
    assert not torch.equal(a["rgb"], c["rgb"])
    assert a["rgb"].shape == (3, 3, 48, 48) and a["rgb"].dtype == torch.float32
    assert 0 <= float(a["rgb"].min()) and float(a["rgb"].max()) <= 1
    assert a["cls_gt"].shape == (3, 1, 48, 48) and a["first_frame_gt"].shape == (1, 3, 48, 48)
    for s in (a, c):
        n = int(s["num_objects"])
        assert 1 <= n <= 3
        assert s["selector"].tolist() == [1.0] * n + [0.0] * (3 - n)
        # the first frame shows every kept object; cls_gt and first_frame_gt agree
        for i in range(n):
            assert torch.equal(s["first_frame_gt"][0, i] > 0, s["cls_gt"][0, 0] == i + 1)
            assert s["first_frame_gt"][0, i].any()
        assert int(s["cls_gt"].max()) <= n
    batch = collate([a, c])
    assert batch["rgb"].shape == (2, 3, 3, 48, 48) and len(batch["name"]) == 2


def test_at_most_num_objects_and_cut_and_paste(synth):
    src = scan_dataset(DataSpec("ytvos", str(synth)), seq_length=3)
    ds = _dataset([src], num_objects=1, merge_prob=1.0)
    counts = {int(ds[SampleKey(i, 0)]["num_objects"]) for i in range(4)}
    assert counts == {1}
    images = np.zeros((2, 16, 16, 3), np.float32)
    masks = np.zeros((2, 16, 16), np.int32)
    masks[:, :4, :4] = 1
    images2 = np.ones_like(images)
    masks2 = np.zeros_like(masks)
    masks2[:, 8:, 8:] = 3
    cut_and_paste(images, masks, images2, masks2)
    assert set(np.unique(masks)) == {0, 1, 2}  # the pasted object gets a new id
    assert images[0, 12, 12, 0] > 0.9 and images[0, 0, 0, 0] < 0.1


def test_geometry_keeps_masks_aligned():
    rng = np.random.default_rng(3)
    mask = np.zeros((60, 90), np.uint16)
    mask[20:40, 30:60] = 2
    image = np.zeros((60, 90, 3), np.float32)
    image[mask == 2] = 1.0
    for _ in range(10):
        m = geometry(rng, 60, 90, 32)
        warped_img = cv2.warpAffine(image, m, (32, 32), flags=cv2.INTER_NEAREST)
        warped = warp_mask(mask, m, 32)
        assert set(np.unique(warped)) <= {0, 2}
        assert np.array_equal(warped == 2, warped_img[..., 0] == 1.0)


def test_loss_pieces():
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1, :, 2:] = 5.0
    coords = torch.tensor([[[0.1, 0.5], [0.8, 0.5]]])
    sampled = point_sample(logits, coords)
    assert sampled.shape == (1, 2, 2) and float(sampled[0, 1, 1]) == pytest.approx(5.0)
    gt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (T=1, C=2, P=2)
    assert float(dice_loss(gt, gt)) == pytest.approx(0.0)
    cls_gt = torch.zeros(1, 3, 1, 8, 8, dtype=torch.int64)
    cls_gt[:, :, :, :, 4:] = 1
    good = torch.full((1, 2, 2, 8, 8), -8.0)
    good[:, :, 0, :, :4] = 8.0
    good[:, :, 1, :, 4:] = 8.0
    loss = LossComputer(num_points=64)
    torch.manual_seed(0)
    low = loss({"logits": good}, cls_gt, [1])["total_loss"]
    high = loss({"logits": -good}, cls_gt, [1])["total_loss"]
    assert 5 * float(low) < float(high)  # boundary points (sampled most) cost in both


def test_drop_path_hook():
    from s3cli.model.backbones.vit_adapter import Extractor

    ext = Extractor(32, 4, 2, 0.25)
    net = SimpleNamespace(pixel_encoder=torch.nn.Sequential(ext))
    handles = add_drop_path(net, 0.5)  # type: ignore[arg-type]
    assert len(handles) == 1
    x = torch.randn(64, 5, 32)
    ext.ffn.eval()
    assert torch.equal(ext.ffn(x, 1, 1), ext.ffn.forward(x, 1, 1))  # forward() skips hooks
    ext.ffn.train()
    out = ext.ffn(x, 1, 1)
    dropped = (out.flatten(1) == 0).all(dim=1).float().mean()
    assert 0.25 < float(dropped) < 0.75
    y = torch.ones(10000, 1)
    assert float(drop_path(y, 0.2, True).mean()) == pytest.approx(1.0, abs=0.05)


def test_config_schedules():
    cfg = TrainConfig(data=(DataSpec("davis", "d"), DataSpec("ytvos", "y")))
    assert cfg.total_iterations == 150_000
    assert TrainConfig(data=(DataSpec("mose", "m"),)).total_iterations == 190_000
    cfg = TrainConfig(data=(DataSpec("davis", "d"),), iterations=100)
    assert [cfg.max_skip_at(i) for i in (0, 9, 10, 29, 30, 79, 80, 99)] == [5, 5, 10, 10, 15,
                                                                             15, 5, 5]
    assert cfg.lr_milestones() == [80, 92]


def test_backbone_and_init_weights(tmp_path):
    from s3cli.errors import CheckpointError
    from s3cli.model.backbones.resnet import ResNetEncoder
    from s3cli.model.backbones.vit import VisionTransformer
    from s3cli.model.registry import build_network
    from s3cli.train.trainer import _load_vit, build_training_network, load_backbone_weights

    # torchvision ResNet-18 layout: layer1 (our res2), plus layer4 and fc that are not used
    tv = {k.replace("res2.", "layer1."): v for k, v in ResNetEncoder("resnet18").state_dict()
          .items()}
    tv["layer4.0.conv1.weight"] = torch.zeros(512, 256, 3, 3)
    tv["fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "resnet18.pth"
    torch.save(tv, path)
    net = build_network("cutie-small")
    assert load_backbone_weights(net, path).startswith("pixel encoder and mask encoder")
    assert torch.equal(net.pixel_encoder.res2[0].conv1.weight, tv["layer1.0.conv1.weight"])
    assert torch.equal(net.mask_encoder.conv1.weight[:, :3], tv["conv1.weight"])
    assert net.mask_encoder.conv1.weight.shape[1] == 5
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="fits neither"):
        load_backbone_weights(net, tmp_path / "bad.pth")

    # a DINOv2-style ViT with 14x14 patches under "pretrained." is resized to 16x16
    vit = VisionTransformer(embed_dim=32, depth=2, num_heads=2, mlp_hidden=64, pos_grid=4)
    src = {f"pretrained.{k}": v.clone() for k, v in vit.state_dict().items()}
    src["pretrained.patch_embed.proj.weight"] = torch.randn(32, 3, 14, 14)
    src["depth_head.x"] = torch.zeros(1)
    fake = SimpleNamespace(pixel_encoder=SimpleNamespace(vit_module=vit))
    from s3cli.train.trainer import _read_weights_file

    torch.save(src, tmp_path / "vit.pth")
    _load_vit(fake, _read_weights_file(tmp_path / "vit.pth"), tmp_path / "vit.pth")  # type: ignore[arg-type]
    assert vit.patch_embed.proj.weight.shape[-1] == 16

    # --init: a checkpoint of another model is refused before anything is built
    ckpt = tmp_path / "small.pth"
    torch.save({"weights": build_network("cutie-small", synthetic=True).state_dict()}, ckpt)
    cfg = TrainConfig(model="cutie-base", data=(DataSpec("davis", "d"),), init=str(ckpt))
    with pytest.raises(CheckpointError, match="is a cutie-small checkpoint, not cutie-base"):
        build_training_network(cfg)
    cfg = TrainConfig(model="cutie-small", data=(DataSpec("davis", "d"),), init=str(ckpt))
    net = build_training_network(cfg)
    ref = build_network("cutie-small", synthetic=True).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
