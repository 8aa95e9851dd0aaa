"""Geometry and value transforms of the per-frame loop: input conversion, resize to a shorter
side, pad to a multiple and back, horizontal flip, and probability aggregation.

All functions are pure; images are (3, H, W) or (B, 3, H, W) floats in [0, 1], index masks
(H, W) integers, probabilities (C, H, W) or (B, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Padding",
    "aggregate",
    "hflip",
    "image_to_tensor",
    "index_mask_to_tensor",
    "pad_to_multiple",
    "resize_image",
    "resize_index_mask",
    "resize_probabilities",
    "short_side_size",
    "unpad",
]


@dataclass(frozen=True)
class Padding:
    """Zeros added on each side; the smaller half goes before (left/top)."""

    left: int
    right: int
    top: int
    bottom: int

    @property
    def as_f_pad(self) -> tuple[int, int, int, int]:
        """The order ``torch.nn.functional.pad`` expects for the last two dimensions."""
        return (self.left, self.right, self.top, self.bottom)


def _split(size: int, divisor: int) -> tuple[int, int]:
    missing = (-size) % divisor
    before = missing // 2
    return before, missing - before


def pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, Padding]:
    """Zero-pad the last two dimensions up to multiples of ``divisor``.

    The missing amount is split with ``floor(missing / 2)`` before and the rest after, as the
    official ``pad_divide_by``.
    """
    h, w = x.shape[-2:]
    top, bottom = _split(h, divisor)
    left, right = _split(w, divisor)
    pad = Padding(left=left, right=right, top=top, bottom=bottom)
    if left == right == top == bottom == 0:
        return x, pad
    return F.pad(x, pad.as_f_pad), pad


def unpad(x: torch.Tensor, pad: Padding) -> torch.Tensor:
    """Remove ``pad`` from the last two dimensions."""
    h, w = x.shape[-2:]
    return x[..., pad.top : h - pad.bottom, pad.left : w - pad.right]


def short_side_size(height: int, width: int, max_size: int) -> tuple[int, int] | None:
    """The size with the shorter side reduced to ``max_size``, or ``None`` when no resize is
    needed (``max_size <= 0`` or the shorter side is already at most ``max_size``)."""
    short = min(height, width)
    if max_size <= 0 or short <= max_size:
        return None
    return int(height / short * max_size), int(width / short * max_size)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (no antialiasing, ``align_corners=False``) of a (3, H, W) image."""
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]


def resize_index_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest ("nearest-exact") resize of an (H, W) index mask; keeps the dtype."""
    out = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return out.round().to(mask.dtype)


def resize_probabilities(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (C, H, W) probabilities back to ``size``."""
    return F.interpolate(prob.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip the last (width) dimension."""
    return torch.flip(x, dims=[-1])


def aggregate(prob: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-object probabilities -> logits with a background channel first.

    The background is ``prod(1 - p)`` over ``dim``; everything is clamped to
    ``[1e-7, 1 - 1e-7]`` and turned into ``log(p / (1 - p))``. Computed in float32.
    """
    prob = prob.float()
    background = torch.prod(1 - prob, dim=dim, keepdim=True)
    new_prob = torch.cat([background, prob], dim).clamp(1e-7, 1 - 1e-7)
    return torch.log(new_prob / (1 - new_prob))


def image_to_tensor(
    image: np.ndarray | torch.Tensor, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """An (H, W, 3) uint8 array, or a (3, H, W) float tensor in [0, 1], as a (3, H, W) tensor.

    uint8 input is divided by 255 in float32 before any cast to ``dtype``.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8, got {image.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W)
        tensor = tensor.to(device=device).float() / 255
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            tensor = image.to(device=device).float() / 255
        elif image.is_floating_point():
            tensor = image.to(device=device)
        else:
            raise ValueError(f"image tensor must be uint8 or floating point, got {image.dtype}")
    else:
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image)}")
    return tensor.to(dtype=dtype)


def index_mask_to_tensor(mask: np.ndarray | torch.Tensor, *, device: torch.device) -> torch.Tensor:
    """An (H, W) integer index mask (numpy or torch) as an int64 tensor on ``device``."""
    if isinstance(mask, np.ndarray):
        if mask.dtype.kind not in "iub":
            raise ValueError(f"index mask must be an integer array, got {mask.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64, copy=False))
    elif isinstance(mask, torch.Tensor):
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"index mask must be an integer tensor, got {mask.dtype}")
        tensor = mask.long()
    else:
        raise TypeError(f"mask must be a numpy array or a torch tensor, got {type(mask)}")
    if tensor.ndim != 2:
        raise ValueError(f"index mask must be (H, W), got shape {tuple(tensor.shape)}")
    return tensor.to(device=device)
