"""The streaming engine: one ``Tracker`` per video drives a network frame by frame.

The network is only a :class:`VOSNetworkProtocol` here (the stage methods of Cutie/S3); this
package imports neither ``s3cli.model`` nor ``s3cli.io``. Per frame the tracker encodes the image,
reads memory and segments (unless a complete mask is given), merges a given mask, memorises
every ``mem_every`` frames, and returns per-object probabilities at the input size.

Shapes: B batch (1, or 2 with flip augmentation), N objects, H, W padded internal size,
h, w the stride-16 grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from s3cli.inference.allocator import HEAP_THRESHOLD, fix_mmap_threshold, release_freed_memory
from s3cli.inference.config import InferenceConfig
from s3cli.inference.memory import MemoryManager
from s3cli.inference.objects import (
    ObjectRegistry,
    index_mask_to_one_hot,
    probabilities_to_binary_masks,
    probabilities_to_index_mask,
)
from s3cli.inference.transforms import (
    Padding,
    aggregate,
    hflip,
    image_to_tensor,
    index_mask_to_tensor,
    pad_to_multiple,
    resize_image,
    resize_index_mask,
    resize_probabilities,
    short_side_size,
    unpad,
)

__all__ = ["Tracker", "TrackerState", "VOSNetworkProtocol"]


class VOSNetworkProtocol(Protocol):
    """What the engine needs from a network (the stage methods of the official ``CUTIE``).

    Shapes: images (B, 3, H, W) in [0, 1], padded to ``pad_divisor``; masks (B, N, H, W);
    sensory (B, N, sensory_dim, h, w); object memory (B, N, T, Q, C + 1).
    """

    pad_divisor: int
    key_dim: int
    value_dim: int
    sensory_dim: int
    pixel_dim: int

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def encode_image(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> ([f16, f8, f4], pix_feat (B, pixel_dim, h, w))."""
        ...

    def transform_key(
        self, f16: torch.Tensor, need_sk: bool = True, need_ek: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (key (B, CK, h, w), shrinkage (B, 1, h, w), selection (B, CK, h, w))."""
        ...

    def encode_mask(
        self,
        image: torch.Tensor,
        pix_feat: torch.Tensor,
        sensory: torch.Tensor,
        masks: torch.Tensor,
        *,
        deep_update: bool = True,
        chunk_size: int = -1,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (mask value (B, N, CV, h, w), new sensory, summaries (B, N, Q, C + 1), logits)."""
        ...

    def pixel_fusion(
        self,
        pix_feat: torch.Tensor,
        pixel: torch.Tensor,
        sensory: torch.Tensor,
        last_mask: torch.Tensor,
        *,
        chunk_size: int = -1,
    ) -> torch.Tensor:
        """-> (B, N, C, h, w)."""
        ...

    def readout_query(
        self,
        pixel_readout: torch.Tensor,
        obj_memory: torch.Tensor,
        *,
        selector: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """-> (readout (B, N, C, h, w), auxiliary outputs)."""
        ...

    def segment(
        self,
        ms_features: Sequence[torch.Tensor],
        readout: torch.Tensor,
        sensory: torch.Tensor,
        *,
        chunk_size: int = -1,
        update_sensory: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (new sensory, logits (B, N + 1, H, W), probabilities (B, N + 1, H, W))."""
        ...


@dataclass
class TrackerState:
    """Everything one video accumulates (the network itself holds no per-video state)."""

    memory: MemoryManager
    objects: ObjectRegistry
    frame_index: int = -1  # index of the last frame stepped
    last_mem_index: int = 0  # index of the last memorised frame
    last_mask: torch.Tensor | None = None  # (B, N, H, W) probabilities of the last frame
    input_size: tuple[int, int] | None = None  # (height, width) of the frames given


@dataclass
class _Features:
    ms_features: list[torch.Tensor]  # [f16, f8, f4], each (B, C, H / s, W / s)
    pix_feat: torch.Tensor  # (B, C, h, w)
    key: torch.Tensor  # (B, CK, h, w)
    shrinkage: torch.Tensor  # (B, 1, h, w)
    selection: torch.Tensor  # (B, CK, h, w)


def _stagger_offsets(mem_every: int, stagger_updates: int) -> frozenset[int]:
    """Frame distances (to the last memory frame) at which the decoder updates sensory memory."""
    if stagger_updates >= mem_every:
        return frozenset(range(1, mem_every + 1))
    return frozenset(
        int(x) for x in np.round(np.linspace(1, mem_every, stagger_updates)).astype(int)
    )


class Tracker:
    """Segments one video, one frame at a time.

    ``Tracker(network, config, **options)``: options are ``InferenceConfig`` fields (the official
    evaluation-config names: ``mem_every``, ``top_k``, ``use_long_term``, ``max_mem_frames``,
    ``long_term`` (mapping or ``LongTermConfig``), ``stagger_updates``, ``chunk_size``,
    ``max_internal_size``, ``flip_aug``) and override ``config``. Device and dtype follow the
    network's parameters.
    """

    def __init__(
        self,
        network: VOSNetworkProtocol,
        config: InferenceConfig | None = None,
        **options: Any,
    ) -> None:
        if config is not None and not isinstance(config, InferenceConfig):
            raise TypeError(f"config must be an InferenceConfig, got {type(config).__name__}")
        base = config if config is not None else InferenceConfig()
        self.config = base.replace(**options) if options else base
        self.network = network
        param = next(iter(network.parameters()))
        self.device = param.device
        self.dtype = param.dtype
        self._stagger = _stagger_offsets(self.config.mem_every, self.config.stagger_updates)
        self.state = self._init_state()
        if self.config.use_long_term and self.device.type == "cpu":
            # Long videos: allocations of 32 MiB and more memory-mapped, the heap kept from
            # fragmenting as the memory grows and its pages kept for the next frame (allocator.py)
            fix_mmap_threshold(HEAP_THRESHOLD)

    def _init_state(self) -> TrackerState:
        memory = MemoryManager(self.config, sensory_dim=self.network.sensory_dim)
        return TrackerState(memory=memory, objects=ObjectRegistry())

    def reset(self) -> None:
        """Forget the video: memory, objects and frame count."""
        self.state = self._init_state()

    @property
    def object_ids(self) -> list[int]:
        """Tracked object ids in channel order (channel ``i + 1`` of ``step``'s output)."""
        return list(self.state.objects.object_ids)

    @property
    def frame_index(self) -> int:
        """Index of the last frame stepped (-1 before the first)."""
        return self.state.frame_index

    @property
    def memory(self) -> MemoryManager:
        return self.state.memory

    # ------------------------------------------------------------------ helpers
    def _encode(self, image: torch.Tensor) -> _Features:
        ms_features, pix_feat = self.network.encode_image(image)
        key, shrinkage, selection = self.network.transform_key(ms_features[0])
        return _Features(list(ms_features), pix_feat, key, shrinkage, selection)

    def _segment(
        self, feats: _Features, object_ids: list[int], *, update_sensory: bool
    ) -> torch.Tensor:
        """Probabilities (N + 1, H, W) from memory; channel 0 is the background."""
        state = self.state
        assert state.last_mask is not None
        memory = state.memory
        readout = memory.read(
            self.network, feats.pix_feat, feats.key, feats.selection, state.last_mask, object_ids
        )  # (B, N, C, h, w)
        sensory, _, prob = self.network.segment(
            feats.ms_features,
            readout,
            memory.get_sensory(object_ids),
            chunk_size=self.config.chunk_size,
            update_sensory=update_sensory,
        )  # prob: (B, N + 1, H, W)
        if update_sensory:
            memory.update_sensory(sensory, object_ids)
        if self.config.flip_aug:
            return (prob[0] + hflip(prob[1])) / 2
        return prob[0]

    def _memorise(self, image: torch.Tensor, feats: _Features, object_ids: list[int]) -> None:
        state = self.state
        memory = state.memory
        assert state.last_mask is not None
        memory.initialize_sensory(feats.key, object_ids)
        value, sensory, summaries, _ = self.network.encode_mask(
            image,
            feats.pix_feat,
            memory.get_sensory(object_ids),
            state.last_mask,
            deep_update=True,
            chunk_size=self.config.chunk_size,
        )
        memory.add(
            feats.key,
            feats.shrinkage,
            value,
            summaries,
            object_ids,
            feats.selection,
            permanence="first",
        )
        state.last_mem_index = state.frame_index
        memory.update_sensory(sensory, object_ids)
        if self.device.type == "cpu":
            release_freed_memory()  # keep resident memory bounded as memory sizes change

    def _prepare_mask(
        self,
        mask: np.ndarray | torch.Tensor | None,
        objects: Sequence[int] | None,
        size: tuple[int, int],
    ) -> tuple[torch.Tensor | None, list[int]]:
        if mask is None:
            if objects is not None:
                raise ValueError("objects were given without a mask")
            return None, []
        mask_t = index_mask_to_tensor(mask, device=self.device)
        if tuple(mask_t.shape) != size:
            raise ValueError(f"mask is {tuple(mask_t.shape)} but the image is {size}")
        if objects is None:
            ids = [int(v) for v in torch.unique(mask_t).tolist() if v != 0]
        else:
            ids = [int(v) for v in objects]
            if any(v <= 0 for v in ids) or len(set(ids)) != len(ids):
                raise ValueError(f"objects must be unique positive ids, got {list(objects)}")
        if not ids:
            return None, []
        return mask_t, ids

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def step(
        self,
        image: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
        objects: Sequence[int] | None = None,
        end: bool = False,
    ) -> torch.Tensor:
        """Process the next frame.

        image: (H, W, 3) uint8 array or (3, H, W) float tensor in [0, 1].
        mask: optional (H, W) integer index mask; ``objects`` lists the ids it defines (default:
        its non-zero values, sorted). Labels not in ``objects`` are ignored. A mask naming every
        tracked object replaces the prediction; otherwise the frame is segmented, the named
        objects take their given masks, the other objects are zeroed under them, and new objects
        get new channels in the order listed.
        end: the last frame; nothing is memorised (except objects that have no memory yet).

        Returns (1 + N, H, W) float32 probabilities: channel 0 background, then the objects in
        ``object_ids`` order.
        """
        config = self.config
        state = self.state
        network = self.network
        img = image_to_tensor(image, device=self.device, dtype=self.dtype)  # (3, H, W)
        size = (int(img.shape[-2]), int(img.shape[-1]))
        if state.input_size is not None and state.input_size != size:
            raise ValueError(f"frame size changed from {state.input_size} to {size}")
        mask_t, given = self._prepare_mask(mask, objects, size)
        state.input_size = size

        internal_size = short_side_size(size[0], size[1], config.max_internal_size)
        if internal_size is not None:
            img = resize_image(img, internal_size)
            if mask_t is not None:
                mask_t = resize_index_mask(mask_t, internal_size)

        state.frame_index += 1
        t = state.frame_index
        tracked = list(state.objects.object_ids)
        img, pad = pad_to_multiple(img, network.pad_divisor)
        batch = img.unsqueeze(0)  # (1, 3, H, W)
        if config.flip_aug:
            batch = torch.cat([batch, hflip(batch)], dim=0)  # (2, 3, H, W)

        is_mem_frame = (t - state.last_mem_index >= config.mem_every or mask_t is not None) and (
            not end
        )
        # Segment unless the given mask covers every tracked object.
        need_segment = len(tracked) > 0 and (mask_t is None or not set(tracked) <= set(given))
        update_sensory = (t - state.last_mem_index) in self._stagger and not end

        if mask_t is None and not tracked:
            # Nothing to track yet: everything is background.
            return torch.ones((1, *size), dtype=torch.float32, device=self.device)

        feats: _Features | None = None
        prob: torch.Tensor | None = None  # (N + 1, H, W)
        if need_segment:
            feats = self._encode(batch)
            prob = self._segment(feats, tracked, update_sensory=update_sensory)

        if mask_t is not None:
            new_ids = state.objects.add(given)
            mask_p, _ = pad_to_multiple(mask_t, network.pad_divisor)  # (H, W)
            if prob is not None:
                merged = self._merge(prob[1:], mask_p, tracked, given, new_ids)
            else:
                merged = index_mask_to_one_hot(mask_p, state.objects.object_ids)  # (N, H, W)
            prob = torch.softmax(aggregate(merged, dim=0), dim=0)
        assert prob is not None

        last_mask = prob[1:].unsqueeze(0).to(self.dtype)  # (1, N, H, W)
        if config.flip_aug:
            last_mask = torch.cat([last_mask, hflip(last_mask)], dim=0)  # (2, N, H, W)
        state.last_mask = last_mask

        all_ids = list(state.objects.object_ids)
        unmemorised = [obj for obj in all_ids if not state.memory.has_memory(obj)]
        if all_ids and (is_mem_frame or unmemorised):
            if feats is None:
                feats = self._encode(batch)
            self._memorise(batch, feats, all_ids)

        return self._to_output(prob, pad, size, internal_size is not None)

    @staticmethod
    def _merge(
        pred: torch.Tensor,
        mask: torch.Tensor,
        tracked: list[int],
        given: list[int],
        new_ids: list[int],
    ) -> torch.Tensor:
        """Merge predictions (N_old, H, W) with a mask that misses some tracked objects.

        Objects named in the mask take their given binary masks; the other tracked objects are
        zeroed where the given objects are; new objects are appended. Returns (N, H, W).
        """
        given_masks = index_mask_to_one_hot(mask, given).to(pred.dtype)  # (n, H, W)
        merged = pred.clone()
        merged[:, given_masks.sum(dim=0) > 0] = 0
        for j, obj in enumerate(given):
            if obj in tracked:
                merged[tracked.index(obj)] = given_masks[j]
        new = [given_masks[given.index(obj)].unsqueeze(0) for obj in new_ids]
        return torch.cat([merged, *new], dim=0)

    def _to_output(
        self, prob: torch.Tensor, pad: Padding, size: tuple[int, int], resized: bool
    ) -> torch.Tensor:
        out = unpad(prob, pad)  # (N + 1, h_internal, w_internal)
        if resized:
            out = resize_probabilities(out.float(), size)
        # A copy: the state keeps a view of ``prob`` as the last mask.
        return out.to(torch.float32, copy=True)

    @torch.inference_mode()
    def delete_objects(self, ids: int | Sequence[int]) -> None:
        """Stop tracking ``ids`` (unknown ids are ignored); later channels shift down."""
        id_list = [ids] if isinstance(ids, int) else list(ids)
        state = self.state
        removed = state.objects.delete(id_list)
        state.memory.purge_except(state.objects.object_ids)
        if state.last_mask is not None and removed:
            keep = [i for i in range(state.last_mask.shape[1]) if i not in removed]
            state.last_mask = state.last_mask[:, keep]

    @torch.inference_mode()
    def to_index_mask(self, prob: torch.Tensor) -> torch.Tensor:
        """``step`` output (1 + N, H, W) -> (H, W) int64 object ids (0 = background)."""
        return probabilities_to_index_mask(prob, self.state.objects.object_ids)

    @torch.inference_mode()
    def to_binary_masks(self, prob: torch.Tensor) -> dict[int, torch.Tensor]:
        """``step`` output -> {object id: (H, W) bool mask}, from the per-pixel argmax."""
        masks = probabilities_to_binary_masks(prob)  # (N, H, W)
        return {obj: masks[i] for i, obj in enumerate(self.state.objects.object_ids)}
