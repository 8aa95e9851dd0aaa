"""Tensors derived from parameters (folded weights), computed once and cached on a module.

Inference folds several chains of linear maps into one (a batch norm into the convolution before
it, a batch norm and a 1x1 projection into the maps that feed them). The folded tensors depend
only on parameters and buffers, so they are computed on first use and kept on the module that
owns them (in its ``__dict__``: not a parameter or buffer, so never in ``state_dict``), keyed on
the version counter, storage, dtype and device of every source tensor. Loading a checkpoint,
an in-place update or moving the module therefore invalidates them. Inference tensors have no
version counter; with one among the sources the value is recomputed on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

__all__ = ["cached_derived", "version_key"]

T = TypeVar("T")
Key = tuple[tuple[int, int, torch.dtype, torch.device], ...]


def version_key(sources: Sequence[torch.Tensor | None]) -> Key | None:
    """What identifies the current contents of ``sources`` (``None`` entries skipped), or
    ``None`` when one of them is an inference tensor (no version counter to tell a change by)."""
    present = [t for t in sources if t is not None]
    if any(t.is_inference() for t in present):
        return None
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in present)


def cached_derived(
    owner: nn.Module, slot: str, sources: Sequence[torch.Tensor | None], make: Callable[[], T]
) -> T:
    """``make()``, cached on ``owner`` under ``slot`` until a tensor of ``sources`` changes."""
    key = version_key(sources)
    if key is None:
        return make()
    cached = owner.__dict__.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = make()
    owner.__dict__[slot] = (key, value)
    return value
