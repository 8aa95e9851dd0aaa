"""Mask encoder: image + object mask (+ other objects' masks) -> per-object memory value."""

from __future__ import annotations

import torch
from torch import nn

from s3cli.model.backbones.resnet import make_layer
from s3cli.model.layers.conv_bn import conv_bn_sequential
from s3cli.model.layers.group import GroupFeatureFusionBlock
from s3cli.model.sensory import SensoryDeepUpdater

__all__ = ["MaskEncoder"]


class MaskEncoder(nn.Module):
    """ResNet-18 trunk on [image, mask, others] (5 channels, 4 for single-object models), fused
    with the pixel feature; optionally also updates the sensory memory ("deep update").

    Shapes: image (B, 3, H, W) normalised; pix_feat (B, Cp, H/16, W/16); sensory
    (B, N, Cs, H/16, W/16); masks, others (B, N, H, W) -> value (B, N, Cv, H/16, W/16) and the
    new sensory.
    """

    def __init__(
        self,
        pixel_dim: int,
        value_dim: int,
        sensory_dim: int,
        final_dim: int = 256,
        single_object: bool = False,
    ) -> None:
        super().__init__()
        self.single_object = single_object
        extra = 1 if single_object else 2
        self.conv1 = nn.Conv2d(3 + extra, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_layer("basic", 64, 64, 2, 1)
        self.layer2 = make_layer("basic", 64, 128, 2, 2)
        self.layer3 = make_layer("basic", 128, 256, 2, 2)
        self.fuser = GroupFeatureFusionBlock(pixel_dim, final_dim, value_dim)
        self.sensory_update = SensoryDeepUpdater(value_dim, sensory_dim)

    def _trunk(self, g: torch.Tensor) -> torch.Tensor:
        # Official order: conv, BN, max-pool, then ReLU; ReLU commutes with the max-pool
        # exactly, so it runs fused into the convolution. Channels-last throughout, as the
        # pixel encoder's trunk (ResNetEncoder.forward); the result goes back to contiguous.
        g = g.contiguous(memory_format=torch.channels_last)
        g = conv_bn_sequential((self.conv1, self.bn1, self.relu, self.maxpool), g)
        return self.layer3(self.layer2(self.layer1(g))).contiguous()

    def forward(
        self,
        image: torch.Tensor,
        pix_feat: torch.Tensor,
        sensory: torch.Tensor,
        masks: torch.Tensor,
        others: torch.Tensor | None,
        *,
        deep_update: bool = True,
        chunk_size: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.single_object or others is None:
            g = masks.unsqueeze(2)  # (B, N, 1, H, W)
        else:
            g = torch.stack([masks, others], dim=2)  # (B, N, 2, H, W)
        b, n = g.shape[:2]
        g = torch.cat([image.unsqueeze(1).expand(-1, n, -1, -1, -1), g], dim=2)  # (B, N, 5, H, W)

        if chunk_size < 1 or chunk_size >= n:
            chunk_size = n
        values: list[torch.Tensor] = []
        new_sensory: list[torch.Tensor] = []
        for i in range(0, n, chunk_size):
            chunk = g[:, i : i + chunk_size]
            k = chunk.shape[1]
            v = self._trunk(chunk.flatten(0, 1))
            v = self.fuser(pix_feat, v.view(b, k, *v.shape[1:]))  # (B, k, Cv, h, w)
            values.append(v)
            if deep_update:
                new_sensory.append(self.sensory_update(v, sensory[:, i : i + chunk_size]))
        value = values[0] if len(values) == 1 else torch.cat(values, dim=1)
        if not deep_update:
            return value, sensory
        sens = new_sensory[0] if len(new_sensory) == 1 else torch.cat(new_sensory, dim=1)
        return value, sens

    def train(self, mode: bool = True) -> MaskEncoder:
        # Batch norms keep their running statistics, as in the official training.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self
