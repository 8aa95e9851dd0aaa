"""Reading checkpoints and turning them into a network's state_dict.

All key handling lives here: CPU load with ``weights_only=True``, unwrapping training
checkpoints, stripping wrapper prefixes, detecting the model from its keys, the official
single- to multi-object widening, and a strict comparison that names what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from s3cli.errors import CheckpointError

__all__ = [
    "read_checkpoint",
    "unwrap_state_dict",
    "detect_model",
    "widen_single_object",
    "check_state_dict",
    "file_digest",
]

_WRAPPER_KEYS = ("weights", "model", "state_dict", "network", "module")
_PREFIXES = ("module.", "_orig_mod.")


def file_digest(path: Path, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``.pth``/``.pt``/``.safetensors`` file on the CPU and return its flat state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (check the path)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(
                f"{path}: reading .safetensors needs the safetensors package (pip install "
                "safetensors)"
            ) from exc
        try:
            return unwrap_state_dict(load_file(str(path), device="cpu"), path)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types for damaged files
        first = str(e).splitlines()[0] if str(e) else ""
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({reason[:200]})"
        ) from e
    return unwrap_state_dict(obj, path)


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_state_dict(obj: object, path: Path | str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Find the flat state_dict in ``obj`` (training checkpoints wrap it, e.g. ``{"weights":
    ...}``) and strip ``module.`` / ``_orig_mod.`` prefixes."""
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{path}: holds no state_dict of tensors (not a model checkpoint)")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():  # type: ignore[union-attr]
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def detect_model(sd: Mapping[str, torch.Tensor], path: Path | str = "<checkpoint>") -> str:
    """The preset a state_dict belongs to, from its keys and shapes."""
    if "pixel_encoder.vit_module.cls_token" in sd:
        return "s3-base"
    if "pixel_encoder.res2.0.conv3.weight" in sd:
        return "cutie-base"
    w = sd.get("pixel_encoder.res2.0.conv1.weight")
    if w is not None and tuple(w.shape[-2:]) == (3, 3):
        return "cutie-small"
    if any(k.startswith("_conv_stem") for k in sd):
        raise CheckpointError(
            f"{path}: is an EfficientNet backbone file, not an S3 or Cutie checkpoint"
        )
    raise CheckpointError(
        f"{path}: not an S3 or Cutie checkpoint (no known pixel encoder keys; first keys: "
        f"{', '.join(list(sd)[:3])})"
    )


def widen_single_object(
    sd: dict[str, torch.Tensor], sensory_dim: int = 256
) -> dict[str, torch.Tensor]:
    """Official single-object -> multi-object conversion: append an input channel (for the
    "other objects" mask) to ``mask_encoder.conv1.weight`` (4 -> 5) and
    ``pixel_fuser.sensory_compress.weight`` (sensory + 1 -> sensory + 2).

    The official code fills the new channel randomly (orthogonal init); we use zeros, which
    keeps the single-object model's outputs exactly and makes loading deterministic.
    """
    sd = dict(sd)
    for key, single in (
        ("mask_encoder.conv1.weight", 4),
        ("pixel_fuser.sensory_compress.weight", sensory_dim + 1),
    ):
        w = sd.get(key)
        if w is not None and w.shape[1] == single:
            sd[key] = torch.cat([w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], 1)
    return sd


def check_state_dict(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: Path | str,
    model: str,
    *,
    show: int = 3,
) -> None:
    """Raise ``CheckpointError`` naming the first few missing, unexpected or mis-shaped keys."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f" and {len(items) - show} more" if len(items) > show else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:show])}{more}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {model}: {'; '.join(problems)}")
