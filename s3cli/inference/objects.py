"""Object bookkeeping: user object ids <-> probability channels, and output helpers.

Object ids are the user's labels (any positive integers, not necessarily contiguous). Channel 0
of a probability map is the background; channel ``i >= 1`` belongs to ``object_ids[i - 1]``,
objects being kept in order of first appearance. Deleting an object shifts the later channels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "ObjectRegistry",
    "channel_argmax",
    "index_mask_to_one_hot",
    "probabilities_to_binary_masks",
    "probabilities_to_index_mask",
]


def _as_ids(ids: Iterable[int]) -> list[int]:
    out = []
    for obj in ids:
        value = int(obj)
        if value != obj or value <= 0:
            raise ValueError(f"object ids must be positive integers, got {obj!r}")
        out.append(value)
    if len(set(out)) != len(out):
        raise ValueError(f"object ids must be unique, got {out}")
    return out


@dataclass
class ObjectRegistry:
    """The tracked objects in channel order (order of first appearance)."""

    object_ids: list[int] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    def __contains__(self, obj: object) -> bool:
        return obj in self.object_ids

    def channel_of(self, obj: int) -> int:
        """Index of ``obj`` among the object channels (0-based, background excluded)."""
        return self.object_ids.index(obj)

    def has_all(self, ids: Iterable[int]) -> bool:
        return all(obj in self.object_ids for obj in ids)

    def add(self, ids: Sequence[int]) -> list[int]:
        """Track the ids not yet tracked (in the given order); return the new ones."""
        new = [obj for obj in _as_ids(ids) if obj not in self.object_ids]
        self.object_ids.extend(new)
        return new

    def delete(self, ids: Iterable[int]) -> list[int]:
        """Stop tracking ``ids``; return the channel indices (0-based) that were removed.

        Ids that are not tracked are ignored.
        """
        drop = set(_as_ids(ids))
        removed = [i for i, obj in enumerate(self.object_ids) if obj in drop]
        self.object_ids = [obj for obj in self.object_ids if obj not in drop]
        return removed


def index_mask_to_one_hot(mask: torch.Tensor, object_ids: Sequence[int]) -> torch.Tensor:
    """(H, W) index mask -> (N, H, W) float binary masks, one per id in ``object_ids``."""
    if len(object_ids) == 0:
        return torch.zeros((0, *mask.shape), dtype=torch.float32, device=mask.device)
    return torch.stack([mask == obj for obj in object_ids], dim=0).float()  # (N, H, W)


def channel_argmax(prob: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(prob, dim=0)`` of (C, H, W) probabilities, as (H, W) int64.

    One comparison pass per channel instead of a reduction across the outer dimension, which
    PyTorch's CPU kernel runs ~10x slower (39 vs 3.8 ms for 2 x 480 x 854 on one thread). Ties
    go to the lower channel, as with argmax (the comparison is strict).
    """
    if prob.shape[0] == 1 or prob.device.type != "cpu":
        return torch.argmax(prob, dim=0)
    best = prob[0].clone()
    index = torch.zeros(prob.shape[1:], dtype=torch.int64, device=prob.device)
    for c in range(1, prob.shape[0]):
        higher = prob[c] > best
        index.masked_fill_(higher, c)
        torch.where(higher, prob[c], best, out=best)
    return index


def probabilities_to_index_mask(prob: torch.Tensor, object_ids: Sequence[int]) -> torch.Tensor:
    """(1 + N, H, W) probabilities -> (H, W) int64 index mask of object ids (0 = background).

    Each pixel takes the id of its most probable channel.
    """
    if prob.shape[0] != len(object_ids) + 1:
        raise ValueError(
            f"probabilities have {prob.shape[0]} channels, expected 1 + {len(object_ids)} objects"
        )
    channel = channel_argmax(prob)  # (H, W)
    lut = torch.tensor([0, *object_ids], dtype=torch.int64, device=prob.device)
    return lut[channel]


def probabilities_to_binary_masks(prob: torch.Tensor) -> torch.Tensor:
    """(1 + N, H, W) probabilities -> (N, H, W) bool masks, each pixel in at most one object
    (the argmax channel; background pixels are in none)."""
    channel = channel_argmax(prob)  # (H, W)
    ids = torch.arange(1, prob.shape[0], device=prob.device)  # (N,)
    return channel.unsqueeze(0) == ids[:, None, None]  # (N, H, W)
