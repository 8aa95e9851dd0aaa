"""Point-sampled segmentation loss (PointRend-style sampling, as Cutie trains).

For each sequence, the logits of the segmented frames (T - 1, N + 1 classes incl. background) are
sampled at ``points`` locations: ``oversample_ratio * points`` random candidates, of which the
``importance_ratio`` share with the least margin between the two best classes are kept, the rest
uniformly random. At those points the loss is soft cross-entropy plus dice (foreground classes),
each summed over frames and averaged over points/objects, then averaged over the batch. The
sensory and query auxiliary logits (stride 16) get the same loss, weighted (0.01 each).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "point_sample",
    "uncertainty",
    "sample_uncertain_points",
    "soft_ce_loss",
    "dice_loss",
    "LossComputer",
]


def point_sample(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``values`` (B, C, H, W) at ``coords`` (B, P, 2) in [0, 1]^2 (x, y),
    -> (B, C, P)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (B, P, 1, 2)
    return F.grid_sample(values, grid, align_corners=False).squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, P) -> (B, P): minus the margin between the best and second-best class logit (the
    most uncertain points score highest)."""
    if logits.shape[1] == 2:
        return -logits[:, 1].abs()
    top2 = logits.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


@torch.no_grad()
def sample_uncertain_points(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_ratio: float
) -> torch.Tensor:
    """Point coordinates (B, P, 2) for ``logits`` (B, C, H, W)."""
    b = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(b, num_candidates, 2, device=logits.device)
    scores = uncertainty(point_sample(logits.float(), candidates))  # (B, K)
    num_uncertain = int(importance_ratio * num_points)
    idx = scores.topk(num_uncertain, dim=1).indices  # (B, U)
    chosen = torch.gather(candidates, 1, idx.unsqueeze(2).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(b, num_random, 2, device=logits.device)], dim=1)
    return chosen


def soft_ce_loss(logits: torch.Tensor, soft_gt: torch.Tensor) -> torch.Tensor:
    """logits, soft_gt (T, C, P) -> cross-entropy summed over T, averaged over points."""
    return F.cross_entropy(logits, soft_gt, reduction="none").sum(0).mean()


def dice_loss(prob: torch.Tensor, soft_gt: torch.Tensor) -> torch.Tensor:
    """prob, soft_gt (T, C, P) -> dice loss of the foreground classes (1:), summed over T,
    averaged over objects."""
    prob = prob[:, 1:]
    gt = soft_gt[:, 1:].float()
    numerator = 2 * (prob * gt).sum(-1)
    denominator = prob.sum(-1) + gt.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum(0).mean()


@dataclass(frozen=True)
class LossComputer:
    """Loss terms of a training forward pass (see the module docstring)."""

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_ratio: float = 0.75
    sensory_weight: float = 0.01
    query_weight: float = 0.01

    def mask_loss(self, logits: torch.Tensor, soft_gt: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (T, C, h, w) at any resolution; soft_gt (T, C, H, W) one-hot."""
        logits = logits.float()
        coords = sample_uncertain_points(
            logits, self.num_points, self.oversample_ratio, self.importance_ratio
        )
        with torch.no_grad():
            labels = point_sample(soft_gt, coords)
        point_logits = point_sample(logits, coords)
        return soft_ce_loss(point_logits, labels), dice_loss(point_logits.softmax(dim=1), labels)

    def __call__(
        self, out: Mapping[str, torch.Tensor], cls_gt: torch.Tensor, num_objects: list[int]
    ) -> dict[str, torch.Tensor]:
        """``out`` from :class:`~s3cli.train.wrapper.TrainWrapper` (``logits`` (B, T-1, N+1,
        H, W), ``sensory_logits`` (B, T-1, N+1, h, w), ``query_logits`` (B, T-1, N+1, L, h,
        w)); ``cls_gt`` (B, T, 1, H, W); ``num_objects`` per sequence."""
        batch = cls_gt.shape[0]
        losses: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            losses[name] = losses[name] + value if name in losses else value

        for bi in range(batch):
            n = num_objects[bi] + 1
            gt = cls_gt[bi, 1:]  # (T-1, 1, H, W): the first frame is given
            soft_gt = torch.zeros(
                gt.shape[0], n, *gt.shape[-2:], device=gt.device, dtype=torch.float32
            ).scatter_(1, gt, 1.0)
            ce, dice = self.mask_loss(out["logits"][bi, :, :n], soft_gt)
            add("loss_ce", ce / batch)
            add("loss_dice", dice / batch)
            if "sensory_logits" in out and self.sensory_weight > 0:
                ce, dice = self.mask_loss(out["sensory_logits"][bi, :, :n], soft_gt)
                add("aux_sensory_ce", ce / batch * self.sensory_weight)
                add("aux_sensory_dice", dice / batch * self.sensory_weight)
            if "query_logits" in out and self.query_weight > 0:
                q = out["query_logits"][bi, :, :n]  # (T-1, n, L, h, w)
                for level in range(q.shape[2]):
                    ce, dice = self.mask_loss(q[:, :, level], soft_gt)
                    add(f"aux_query_ce_l{level}", ce / batch * self.query_weight)
                    add(f"aux_query_dice_l{level}", dice / batch * self.query_weight)
        losses["total_loss"] = torch.stack(list(losses.values())).sum()
        return losses
