"""Deterministic synthetic weights, regenerated from key names alone.

The golden fixtures in ``shared/fixtures`` were produced by the official code with weights that
follow this rule, so the same rule lets our networks reproduce them without any real checkpoint.
Benchmarks use it too: speed does not depend on the weights' values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["synthetic_tensor", "synthetic_state_dict", "fill_synthetic_"]

# Fixed tables of the model that keep their constructed values.
EXEMPT_SUFFIXES = ("spatial_pe.inv_freq", "pos_enc.inv_freq")


def synthetic_tensor(key: str, like: torch.Tensor) -> torch.Tensor:
    """The value the fixture rule assigns to state_dict entry ``key`` shaped like ``like``."""
    shape = tuple(like.shape)
    if not like.is_floating_point():
        return torch.zeros(shape, dtype=like.dtype)
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    if key.endswith("running_var"):
        return 1 + 0.1 * torch.rand(shape, generator=g)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1 and key.endswith(".weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) <= 1:
        return 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))


def synthetic_state_dict(
    reference: dict[str, torch.Tensor], exempt: Iterable[str] = EXEMPT_SUFFIXES
) -> dict[str, torch.Tensor]:
    """Synthetic values for every entry of ``reference`` (exempt keys keep their values)."""
    exempt = tuple(exempt)
    return {
        k: (v.clone() if k.endswith(exempt) else synthetic_tensor(k, v).to(v.dtype))
        for k, v in reference.items()
    }


def fill_synthetic_(model: nn.Module) -> nn.Module:
    """Overwrite ``model``'s parameters and buffers in place with the synthetic rule."""
    model.load_state_dict(synthetic_state_dict(model.state_dict()), strict=True)
    return model
