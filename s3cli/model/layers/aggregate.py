"""Soft aggregation of independent per-object probabilities into multi-class logits."""

from __future__ import annotations

import torch

__all__ = ["aggregate"]


def aggregate(prob: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-object probabilities -> logits with a background channel prepended along ``dim``.

    Background = prod(1 - p); everything is clamped to [1e-7, 1 - 1e-7] and mapped to
    log(p / (1 - p)), so a softmax over ``dim`` gives normalised multi-object probabilities.
    Shapes: (B, N, H, W) -> (B, N + 1, H, W) for ``dim=1``. Always computed in float32.
    """
    prob = prob.float()
    background = torch.prod(1 - prob, dim=dim, keepdim=True)
    new_prob = torch.cat([background, prob], dim).clamp(1e-7, 1 - 1e-7)
    return torch.log(new_prob / (1 - new_prob))
