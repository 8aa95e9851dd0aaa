"""Training forward pass: segment T - 1 frames from the first frame's masks, with memory.

Back-propagation runs through time over the whole sequence, as in the official
``CutieTrainWrapper``: the first frame's ground-truth masks are encoded into memory; each later
frame is segmented by reading memory (anisotropic L2 affinity with a full softmax over all memory
tokens -- training uses no top-k, like the official ``get_affinity``), pixel fusion with the
sensory memory and the previous mask, the object (query) transformer reading the object memory,
and the mask decoder; its predicted masks (not the ground truth) are encoded into memory for the
next frames, with a deep sensory update with probability ``deep_update_prob``. Up to
``mem_frames`` memory frames are read: all while there are at most that many, then a random
choice of that many per sequence.

The auxiliary outputs the loss needs are computed here from the network's stages: the sensory
logits (``aux_computer.sensory_aux`` on the pixel feature and the sensory memory before the
frame's update) and the query transformer's per-block mask logits, both soft-aggregated with a
background channel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from s3cli.inference.memory import do_softmax, get_similarity, read_values
from s3cli.model.layers.aggregate import aggregate
from s3cli.model.network import VOSNetwork

__all__ = ["TrainWrapper", "add_drop_path", "drop_path", "forward_batch", "set_train_mode"]


def drop_path(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``p`` (scaling the
    kept ones by 1 / (1 - p))."""
    if p <= 0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep, generator=generator)
    return x * mask / keep


def add_drop_path(net: VOSNetwork, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Drop-path on the residual ConvFFN branch of every adapter extractor of an S3 network
    (the official adapter's ``drop_path``), added as forward hooks so the network's modules and
    state_dict stay unchanged. Active only in training mode. Returns the hook handles."""
    from s3cli.model.backbones.vit_adapter import Extractor

    handles = []
    if p <= 0:
        return handles
    for module in net.pixel_encoder.modules():
        if isinstance(module, Extractor):
            ffn = module.ffn

            def hook(mod: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
                return drop_path(output, p, mod.training)

            handles.append(ffn.register_forward_hook(hook))
    return handles


def set_train_mode(net: VOSNetwork, mode: bool = True) -> None:
    """Training mode as the official code: frozen batch norms in the ResNet backbones and mask
    encoder (the network's own ``train``); for S3, the adapter trains (its batch norms use batch
    statistics) while the frozen ViT stays in eval mode."""
    net.train(mode)
    if mode and net.cfg.pixel_encoder.type == "vit_adapter":
        net.pixel_encoder.train(True)
        net.pixel_encoder.vit_module.eval()


def _aux_aggregate(logits: torch.Tensor, selector: torch.Tensor) -> torch.Tensor:
    """Per-object logits (B, N, ...) -> soft-aggregated (B, N + 1, ...) logits."""
    return aggregate(torch.sigmoid(logits) * selector, dim=1)


class TrainWrapper(nn.Module):
    """Holds the network (``self.net``) and runs the training forward pass.

    ``forward(rgb, first_frame_gt, selector)`` with rgb (B, T, 3, H, W) in [0, 1],
    first_frame_gt (B, 1, N, H, W), selector (B, N) returns
    ``logits`` (B, T-1, N+1, H, W), ``masks`` (B, T-1, N, H, W) probabilities,
    ``sensory_logits`` (B, T-1, N+1, h, w) and ``query_logits`` (B, T-1, N+1, L, h, w).
    """

    def __init__(self, net: VOSNetwork, *, mem_frames: int = 3, deep_update_prob: float = 0.2,
                 amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.net = net
        self.mem_frames = mem_frames
        self.deep_update_prob = deep_update_prob
        self.amp_dtype = amp_dtype  # None: no autocast

    def _autocast(self, device: torch.device, enabled: bool = True) -> torch.autocast:
        on = enabled and self.amp_dtype is not None
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=on)

    def forward(self, rgb: torch.Tensor, first_frame_gt: torch.Tensor, selector: torch.Tensor,
                ) -> dict[str, torch.Tensor]:
        net = self.net
        device = rgb.device
        b, t = rgb.shape[:2]
        num_objects = first_frame_gt.shape[2]
        first_gt = first_frame_gt[:, 0].float()  # (B, N, H, W)
        sel = selector.view(b, num_objects, 1, 1).float()

        with self._autocast(device):
            ms_flat, pix_flat = net.encode_image(rgb.flatten(0, 1))
            with self._autocast(device, enabled=False):
                keys, shrinkages, selections = net.transform_key(ms_flat[0].float())
            assert shrinkages is not None and selections is not None
            ms_feat = [f.view(b, t, *f.shape[1:]) for f in ms_flat]
            pix_feat = pix_flat.view(b, t, *pix_flat.shape[1:])
            h, w = keys.shape[-2:]
            # (B, C, T, h, w), the official memory layout
            keys = keys.view(b, t, *keys.shape[1:]).transpose(1, 2)
            shrinkages = shrinkages.view(b, t, *shrinkages.shape[1:]).transpose(1, 2)
            selections = selections.view(b, t, *selections.shape[1:]).transpose(1, 2)

            sensory = torch.zeros(b, num_objects, net.sensory_dim, h, w, device=device)
            value, sensory, summaries, _ = net.encode_mask(rgb[:, 0], pix_feat[:, 0], sensory,
                                                           first_gt)
            values = [value]  # each (B, N, CV, h, w)
            obj_memory = [summaries]  # each (B, N, Q, C + 1)
            masks = first_gt

            logits_out, masks_out, sensory_out, query_out = [], [], [], []
            for ti in range(1, t):
                mem_keys, mem_shrink, mem_values = self._memory(keys, shrinkages, values, ti)
                with self._autocast(device, enabled=False):
                    similarity = get_similarity(
                        mem_keys.float(), mem_shrink.float(), keys[:, :, ti].float(),
                        selections[:, :, ti].float(),
                    )
                    affinity = do_softmax(similarity)  # (B, T'hw, hw), no top-k in training
                    readout = read_values(affinity, mem_values.float())  # (B, N, CV, hw)
                readout = readout.view(b, num_objects, -1, h, w)
                fused = net.pixel_fusion(pix_feat[:, ti], readout, sensory, masks)
                obj_mem = torch.stack(obj_memory, dim=2)  # (B, N, T', Q, C + 1)
                mem_readout, aux = net.readout_query(fused, obj_mem, selector=sel)
                sensory_logits = net.aux_computer.sensory_aux(pix_feat[:, ti], sensory)
                sensory_out.append(_aux_aggregate(sensory_logits, sel))
                query_out.append(_aux_aggregate(torch.stack(aux["logits"], dim=2),
                                                sel.unsqueeze(2)))
                sensory, logits, prob = net.segment(
                    [f[:, ti] for f in ms_feat], mem_readout, sensory, selector=sel
                )
                masks = prob[:, 1:]
                if ti < t - 1:
                    deep = bool(torch.rand(()) < self.deep_update_prob)
                    value, sensory, summaries, _ = net.encode_mask(
                        rgb[:, ti], pix_feat[:, ti], sensory, masks, deep_update=deep
                    )
                    values.append(value)
                    obj_memory.append(summaries)
                logits_out.append(logits)
                masks_out.append(masks)

        return {
            "logits": torch.stack(logits_out, dim=1).float(),
            "masks": torch.stack(masks_out, dim=1),
            "sensory_logits": torch.stack(sensory_out, dim=1).float(),
            "query_logits": torch.stack(query_out, dim=1).float(),
        }

    def _memory(self, keys: torch.Tensor, shrinkages: torch.Tensor, values: list[torch.Tensor],
                ti: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory of frame ``ti``: keys (B, CK, T'hw), shrinkage (B, 1, T'hw), values
        (B, N, CV, T'hw) of all ``ti`` earlier frames, or of ``mem_frames`` random ones."""
        b = keys.shape[0]
        vals = torch.stack(values, dim=3)  # (B, N, CV, ti, h, w)
        if ti <= self.mem_frames:
            k, s, v = keys[:, :, :ti], shrinkages[:, :, :ti], vals
        else:
            idx = [torch.randperm(ti)[: self.mem_frames].to(keys.device) for _ in range(b)]
            k = torch.stack([keys[i, :, idx[i]] for i in range(b)])
            s = torch.stack([shrinkages[i, :, idx[i]] for i in range(b)])
            v = torch.stack([vals[i, :, :, idx[i]] for i in range(b)])
        return k.flatten(2), s.flatten(2), v.flatten(3)


def forward_batch(wrapper: nn.Module, batch: Mapping[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Run ``wrapper`` (possibly DDP-wrapped) on a collated batch, trimming padded objects to the
    batch's largest object count as the official code does."""
    num = [int(n) for n in batch["num_objects"].tolist()]
    keep = max(num)
    return wrapper(batch["rgb"], batch["first_frame_gt"][:, :, :keep], batch["selector"][:, :keep])

