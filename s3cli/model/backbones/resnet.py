"""ResNet trunks (He et al.) laid out like torchvision's, as used by Cutie.

``ResNetEncoder`` is Cutie's pixel encoder: the stem and layers 1-3 of a ResNet-50 (base) or
ResNet-18 (small), returning features at strides 16, 8 and 4. ``ResNetTrunk`` is the shared
builder; the mask encoder uses it with extra input channels for the masks.
"""

from __future__ import annotations

import torch
from torch import nn

from s3cli.model.layers.conv_bn import conv_bn, conv_bn_sequential

__all__ = ["BasicBlock", "Bottleneck", "make_layer", "ResNetEncoder", "RESNET_LAYERS"]

# Blocks per stage and the block type of each depth (layer 4 is never used here).
RESNET_LAYERS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6)),
}


def _downsample(downsample: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """The block's shortcut: ``x`` or its (conv, batch norm) projection."""
    if downsample is None:
        return x
    conv, bn = downsample  # nn.Sequential(Conv2d, BatchNorm2d): keys downsample.0 / .1
    return conv_bn(conv, bn, x)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a shortcut; every conv + BN (+ add, ReLU) runs fused
    at inference (:func:`~s3cli.model.layers.conv_bn.conv_bn`)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = _downsample(self.downsample, x)
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        return conv_bn(self.conv2, self.bn2, out, residual=skip, relu=True)


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 conv + BN layers with a shortcut (stride on the 3x3, as torchvision's)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = _downsample(self.downsample, x)
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        out = conv_bn(self.conv2, self.bn2, out, relu=True)
        return conv_bn(self.conv3, self.bn3, out, residual=skip, relu=True)


def make_layer(kind: str, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage; returns the stage (its output has planes * expansion channels)."""
    block = Bottleneck if kind == "bottleneck" else BasicBlock
    layers = [block(inplanes, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """Cutie's pixel encoder: ResNet stem + layers 1-3 -> (f16, f8, f4).

    Shapes: (B, 3, H, W) normalised image -> [(B, C16, H/16, W/16), (B, C8, H/8, W/8),
    (B, C4, H/4, W/4)] with (C16, C8, C4) = ``ms_dims``. Batch norms always use running
    statistics (the backbone is frozen in training too).
    """

    def __init__(self, depth: str = "resnet50") -> None:
        super().__init__()
        kind, blocks = RESNET_LAYERS[depth]
        exp = 4 if kind == "bottleneck" else 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.res2 = make_layer(kind, 64, 64, blocks[0], 1)
        self.layer2 = make_layer(kind, 64 * exp, 128, blocks[1], 2)
        self.layer3 = make_layer(kind, 128 * exp, 256, blocks[2], 2)
        self.ms_dims = (256 * exp, 128 * exp, 64 * exp)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # The whole trunk runs channels-last (oneDNN's convolutions skip their layout reorders:
        # 193 -> 158 ms bf16, 335 -> 283 ms fp32 for ResNet-50 at 480p on two cores); the
        # features go back to the contiguous layout the rest of the network uses.
        x = x.contiguous(memory_format=torch.channels_last)
        x = conv_bn_sequential((self.conv1, self.bn1, self.relu, self.maxpool), x)
        f4 = self.res2(x)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return [f16.contiguous(), f8.contiguous(), f4.contiguous()]

    def train(self, mode: bool = True) -> ResNetEncoder:
        super().train(False)
        return self
