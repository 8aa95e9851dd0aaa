"""``load_model``: a preset name or a checkpoint path -> a network ready for inference."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from s3cli.errors import CheckpointError
from s3cli.model.checkpoint import (
    check_state_dict,
    detect_model,
    file_digest,
    read_checkpoint,
    widen_single_object,
)
from s3cli.model.network import VOSNetwork
from s3cli.model.registry import PRESETS, build_network_from_state_dict, model_config

__all__ = ["KnownCheckpoint", "KNOWN_CHECKPOINTS", "weights_dirs", "find_checkpoint", "load_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownCheckpoint:
    """An official checkpoint file: its model, and size/hash/address where published."""

    filename: str
    model: str
    url: str | None = None
    md5: str | None = None
    size: int | None = None


_CUTIE_RELEASE = "https://github.com/hkchengrex/Cutie/releases/download/v1.0/"
KNOWN_CHECKPOINTS: tuple[KnownCheckpoint, ...] = (
    KnownCheckpoint(
        "cutie-base-mega.pth",
        "cutie-base",
        _CUTIE_RELEASE + "cutie-base-mega.pth",
        "a6071de6136982e396851903ab4c083a",
        140_443_788,
    ),
    KnownCheckpoint("cutie-base-wmose.pth", "cutie-base"),
    KnownCheckpoint("cutie-base-nomose.pth", "cutie-base"),
    KnownCheckpoint("cutie-small-mega.pth", "cutie-small"),
    KnownCheckpoint("cutie-small-wmose.pth", "cutie-small"),
    KnownCheckpoint("cutie-small-nomose.pth", "cutie-small"),
    # No S3 checkpoint has been published; trained ones are looked for under these names.
    KnownCheckpoint("s3-base.pth", "s3-base"),
    KnownCheckpoint("s3-base.safetensors", "s3-base"),
)


def weights_dirs() -> list[Path]:
    """Where checkpoints are looked for: ``$S3_WEIGHTS`` (a folder or a file's folder), then
    ``./weights``."""
    dirs = []
    env = os.environ.get("S3_WEIGHTS")
    if env:
        p = Path(env)
        dirs.append(p if p.is_dir() or not p.suffix else p.parent)
    dirs.append(Path("weights"))
    return dirs


def find_checkpoint(model: str | None = None) -> Path | None:
    """The first known checkpoint file present (for ``model``, or any model)."""
    for d in weights_dirs():
        for known in KNOWN_CHECKPOINTS:
            if model is not None and known.model != model:
                continue
            p = d / known.filename
            if p.is_file():
                return p
    return None


def _verify_known(path: Path) -> None:
    for known in KNOWN_CHECKPOINTS:
        if known.filename == path.name and known.md5 is not None:
            if known.size is not None and path.stat().st_size != known.size:
                raise CheckpointError(
                    f"{path}: is {path.stat().st_size} bytes, the official file is "
                    f"{known.size} (incomplete download? fetch it again with "
                    f"`s3 weights fetch {known.filename}`)"
                )
            if file_digest(path) != known.md5:
                raise CheckpointError(
                    f"{path}: checksum differs from the official {known.filename} (corrupt "
                    f"file? fetch it again with `s3 weights fetch {known.filename}`)"
                )


def load_network_from_file(path: str | Path, expect: str | None = None) -> VOSNetwork:
    """Build the network a checkpoint file belongs to and load it strictly."""
    path = Path(path)
    if path.is_file():
        _verify_known(path)
    sd = read_checkpoint(path)
    model = detect_model(sd, path)
    if expect is not None and expect != model:
        raise CheckpointError(f"{path}: is a {model} checkpoint, not {expect}")
    with torch.device("meta"):
        expected = VOSNetwork(model_config(model)).state_dict()
    sd = widen_single_object(sd, model_config(model).sensory_dim)
    check_state_dict(sd, expected, path, model)
    sd = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    return build_network_from_state_dict(model, sd)


def load_model(
    name_or_path: str | Path = "auto",
    device: str | torch.device = "cpu",
) -> VOSNetwork:
    """A network in eval mode on ``device``.

    ``name_or_path`` is a checkpoint file, or a preset (``s3-base``, ``cutie-base``,
    ``cutie-small``) whose checkpoint is looked for in ``$S3_WEIGHTS`` and ``./weights``, or
    ``auto`` for the first checkpoint found there.
    """
    name = str(name_or_path)
    if name in PRESETS or name == "auto":
        model = None if name == "auto" else name
        path = find_checkpoint(model)
        if path is None:
            where = ", ".join(str(d) for d in weights_dirs())
            names = [k.filename for k in KNOWN_CHECKPOINTS if model in (None, k.model)]
            raise CheckpointError(
                f"{where}: no checkpoint for {model or 'any model'} (expected one of "
                f"{', '.join(names[:3])}; see `s3 weights`)"
            )
        net = load_network_from_file(path, expect=model)
    else:
        net = load_network_from_file(name)
    log.info("loaded %s", name)
    return net.to(device)
