"""Mask decoder: object readout (stride 16) + image skip features -> per-object logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.group import GroupResBlock, resize_groups
from s3cli.model.sensory import SensoryUpdater

__all__ = ["MaskDecoder"]


class _DecoderFeatureProcessor(nn.Module):
    """1x1 projections of the stride-8 and stride-4 image features."""

    def __init__(self, in_dims: tuple[int, int], out_dims: tuple[int, int]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(
            nn.Conv2d(i, o, kernel_size=1) for i, o in zip(in_dims, out_dims, strict=True)
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t(f) for t, f in zip(self.transforms, feats, strict=True)]


class _MaskUpsampleBlock(nn.Module):
    """x2 bilinear upsampling of per-object features, add the skip feature, residual block."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_conv = GroupResBlock(in_dim, out_dim)

    def forward(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = resize_groups(g, 2, "bilinear") + skip.unsqueeze(1)
        return self.out_conv(g)


class MaskDecoder(nn.Module):
    """Shapes: ms_feat [f16, f8, f4]; readout (B, N, C, h, w); sensory (B, N, Cs, h, w) ->
    (new sensory, logits (B, N, 4h, 4w)) at stride 4.

    The stride-8 and stride-4 image features enter through 1x1 projections
    (``decoder_feat_proc``); with ``skips_projected`` the caller has applied them already
    (``ms_feat[1:]`` are then ``(B, up_dims[0], 2h, 2w)`` and ``(B, up_dims[1], 4h, 4w)``).
    """

    def __init__(
        self,
        ms_dims: tuple[int, int, int],
        up_dims: tuple[int, int, int],
        sensory_dim: int,
    ) -> None:
        super().__init__()
        self.sensory_update = SensoryUpdater(
            (up_dims[0], up_dims[1], up_dims[2] + 1), sensory_dim, sensory_dim
        )
        self.decoder_feat_proc = _DecoderFeatureProcessor(
            (ms_dims[1], ms_dims[2]), (up_dims[0], up_dims[1])
        )
        self.up_16_8 = _MaskUpsampleBlock(up_dims[0], up_dims[1])
        self.up_8_4 = _MaskUpsampleBlock(up_dims[1], up_dims[2])
        self.pred = nn.Conv2d(up_dims[2], 1, kernel_size=3, padding=1)

    def forward(
        self,
        ms_feat: list[torch.Tensor],
        readout: torch.Tensor,
        sensory: torch.Tensor,
        *,
        chunk_size: int = -1,
        update_sensory: bool = True,
        skips_projected: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = readout.shape[:2]
        if skips_projected:
            f8, f4 = ms_feat[1], ms_feat[2]
        else:
            f8, f4 = self.decoder_feat_proc(list(ms_feat[1:]))
        if chunk_size < 1 or chunk_size >= n:
            chunk_size = n
        all_logits: list[torch.Tensor] = []
        new_sensory: list[torch.Tensor] = []
        for i in range(0, n, chunk_size):
            p16 = readout[:, i : i + chunk_size]
            k = p16.shape[1]
            p8 = self.up_16_8(p16, f8)
            p4 = self.up_8_4(p8, f4)
            logits = self.pred(F.relu(p4.flatten(0, 1).float()))  # (B*k, 1, H4, W4)
            if update_sensory:
                p4 = torch.cat([p4, logits.view(b, k, 1, *logits.shape[-2:])], 2)
                new_sensory.append(self.sensory_update([p16, p8, p4], sensory[:, i : i + k]))
            all_logits.append(logits.view(b, k, *logits.shape[-2:]))
        logits = all_logits[0] if len(all_logits) == 1 else torch.cat(all_logits, dim=1)
        if not update_sensory:
            return sensory, logits
        sens = new_sensory[0] if len(new_sensory) == 1 else torch.cat(new_sensory, dim=1)
        return sens, logits
