"""Checkpoint loading: round trips, official layouts, and one clear error for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from s3cli.errors import CheckpointError
from s3cli.model.checkpoint import (
    check_state_dict,
    detect_model,
    unwrap_state_dict,
    widen_single_object,
)
from s3cli.model.loading import load_model, load_network_from_file
from s3cli.model.registry import build_network


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    return build_network("cutie-small", synthetic=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["cutie-small", "cutie-base"])
def test_pth_round_trip(tmp_path: Path, name: str) -> None:
    net = build_network(name, synthetic=True)
    path = tmp_path / "model.pth"
    torch.save(net.state_dict(), path)
    loaded = load_model(path)
    assert loaded.cfg.name == name
    assert not loaded.training
    _same(loaded.state_dict(), net.state_dict())


def test_s3_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    net = build_network("s3-base", synthetic=True)
    path = tmp_path / "s3.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_model(path)
    assert loaded.cfg.name == "s3-base" and loaded.pad_divisor == 32
    _same(loaded.state_dict(), net.state_dict())


def test_training_checkpoint_with_prefixes(tmp_path: Path, small) -> None:
    sd = {f"module.{k}": v for k, v in small.state_dict().items()}
    path = tmp_path / "train.pth"
    torch.save({"it": 10, "weights": sd, "optimizer": {"lr": 1e-4}}, path)
    _same(load_model(path).state_dict(), small.state_dict())


def test_single_object_checkpoint_is_widened_with_zeros(tmp_path: Path, small) -> None:
    sd = dict(small.state_dict())
    sd["mask_encoder.conv1.weight"] = sd["mask_encoder.conv1.weight"][:, :4].clone()
    sd["pixel_fuser.sensory_compress.weight"] = sd["pixel_fuser.sensory_compress.weight"][
        :, :257
    ].clone()
    path = tmp_path / "single.pth"
    torch.save(sd, path)
    loaded = load_model(path).state_dict()
    w = loaded["mask_encoder.conv1.weight"]
    assert w.shape[1] == 5 and torch.equal(w[:, :4], sd["mask_encoder.conv1.weight"])
    assert not w[:, 4].any()
    assert loaded["pixel_fuser.sensory_compress.weight"].shape[1] == 258


def test_widen_is_pure() -> None:
    sd = {"mask_encoder.conv1.weight": torch.ones(64, 4, 7, 7)}
    out = widen_single_object(sd)
    assert sd["mask_encoder.conv1.weight"].shape[1] == 4
    assert out["mask_encoder.conv1.weight"].shape[1] == 5


def test_detect_model(small) -> None:
    assert detect_model(small.state_dict()) == "cutie-small"
    with pytest.raises(CheckpointError, match="not an S3 or Cutie checkpoint"):
        detect_model({"foo.weight": torch.zeros(1)}, "x.pth")


def test_unwrap_rejects_non_tensor_dicts() -> None:
    with pytest.raises(CheckpointError, match="x.pth: holds no state_dict"):
        unwrap_state_dict({"it": 3}, "x.pth")


def test_mismatch_names_first_keys(small) -> None:
    expected = small.state_dict()
    sd = dict(expected)
    del sd["mask_decoder.pred.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["key_proj.key_proj.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(sd, expected, "ck.pth", "cutie-small")
    msg = str(err.value)
    assert msg.startswith("ck.pth: does not fit cutie-small")
    assert "1 missing: mask_decoder.pred.weight" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "key_proj.key_proj.bias (3,) (expected (64,))" in msg
    assert "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "nope.pth")


def test_truncated_file(tmp_path: Path, small) -> None:
    full = tmp_path / "full.pth"
    torch.save(small.state_dict(), full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable PyTorch checkpoint"):
        load_model(cut)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello, this is text\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable PyTorch checkpoint"):
        load_model(path)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    """weights_only loading never runs code stored in a checkpoint."""
    path = tmp_path / "evil.pth"
    torch.save({"weights": {"a": torch.zeros(1)}, "cfg": Path("x")}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_model(path)


def test_wrong_model(tmp_path: Path, small) -> None:
    path = tmp_path / "small.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(CheckpointError, match="is a cutie-small checkpoint, not cutie-base"):
        load_network_from_file(path, expect="cutie-base")


def test_preset_lookup_in_weights_dir(tmp_path: Path, small, monkeypatch) -> None:
    monkeypatch.setenv("S3_WEIGHTS", str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint for cutie-small"):
        load_model("cutie-small")
    torch.save(small.state_dict(), tmp_path / "cutie-small-mega.pth")
    assert load_model("cutie-small").cfg.name == "cutie-small"
    assert load_model("auto").cfg.name == "cutie-small"


def test_official_name_is_checksum_verified(tmp_path: Path, small) -> None:
    path = tmp_path / "cutie-base-mega.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(CheckpointError, match="official file is 140443788"):
        load_model(path)
