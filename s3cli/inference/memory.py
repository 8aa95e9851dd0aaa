"""Working, long-term and sensory memory, and the memory readout.

The readout follows the official ``MemoryManager`` (Cutie ``ec5cdd4``, S3 ``eedf595``; both
compute identically) operation by operation: the fixtures contain near-ties in the top-k cut
and in the prototype choice that a reordered computation could flip.

Shapes: B batch (2 with flip augmentation), N objects, CK key channels (64), CV value channels
(256), Q object-summary slots, T memory tokens, HW query tokens (stride-16 grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from s3cli.inference.config import InferenceConfig
from s3cli.inference.kv_store import KeyValueStore, Permanence

if TYPE_CHECKING:
    from s3cli.inference.engine import VOSNetworkProtocol

__all__ = [
    "BucketStats",
    "ConsolidationEvent",
    "EvictionEvent",
    "MemoryEvent",
    "MemoryManager",
    "MemoryStats",
    "get_similarity",
    "do_softmax",
    "read_values",
]


def get_similarity(
    mem_key: torch.Tensor,
    mem_shrinkage: torch.Tensor | None,
    query_key: torch.Tensor,
    query_selection: torch.Tensor | None,
) -> torch.Tensor:
    """Anisotropic L2 similarity (XMem), memory tokens x query tokens.

    mem_key: (B, CK, T); mem_shrinkage: (B, 1, T); query_key, query_selection: (B, CK, HW).
    Returns (B, T, HW) = -sum_c e_q,c (k_m,c - k_q,c)^2 * s_m / sqrt(CK), computed in the
    expanded three-term form ``-a^2 + 2ab - b^2`` exactly as the official code does.
    """
    num_channels = mem_key.shape[1]
    mem_key = mem_key.flatten(start_dim=2)
    shrink = mem_shrinkage.flatten(start_dim=1).unsqueeze(2) if mem_shrinkage is not None else None
    query_key = query_key.flatten(start_dim=2)
    if query_selection is not None:
        query_selection = query_selection.flatten(start_dim=2)
        mem_key_t = mem_key.transpose(1, 2)  # (B, T, CK)
        a_sq = mem_key_t.pow(2) @ query_selection  # (B, T, HW)
        two_ab = 2 * (mem_key_t @ (query_key * query_selection))  # (B, T, HW)
        b_sq = (query_selection * query_key.pow(2)).sum(1, keepdim=True)  # (B, 1, HW)
        similarity = -a_sq + two_ab - b_sq
    else:
        a_sq = mem_key.pow(2).sum(1).unsqueeze(2)  # (B, T, 1)
        two_ab = 2 * (mem_key.transpose(1, 2) @ query_key)  # (B, T, HW)
        similarity = -a_sq + two_ab
    if shrink is not None:
        return similarity * shrink / math.sqrt(num_channels)
    return similarity / math.sqrt(num_channels)


def do_softmax(similarity: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Softmax over memory tokens (dim 1) of a (B, T, HW) similarity.

    With ``top_k``, only the ``top_k`` largest entries per query column are kept and
    exponentiated **without** subtracting the maximum (as the official code); the rest are 0.
    Without it, a plain max-subtracted softmax.
    """
    if top_k is not None:
        k = min(top_k, similarity.shape[1])
        values, indices = torch.topk(similarity, k=k, dim=1)  # (B, k, HW)
        x_exp = values.exp_()
        x_exp /= torch.sum(x_exp, dim=1, keepdim=True)
        return torch.zeros_like(similarity).scatter_(1, indices, x_exp)  # (B, T, HW)
    maxes = torch.max(similarity, dim=1, keepdim=True)[0]
    x_exp = torch.exp(similarity - maxes)
    return x_exp / torch.sum(x_exp, dim=1, keepdim=True)


def read_values(affinity: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Values times affinity. affinity: (B, T, HW); value: (B, C, T) or (B, N, C, T)."""
    if value.ndim == 3:
        return value @ affinity  # (B, C, HW)
    bs, num_objects, channels, tokens = value.shape
    out = value.view(bs, num_objects * channels, tokens) @ affinity  # (B, N * C, HW)
    return out.view(bs, num_objects, channels, -1)  # (B, N, C, HW)


@dataclass(frozen=True)
class ConsolidationEvent:
    """Working-memory tokens were compressed into long-term prototypes."""

    bucket_id: int
    candidate_usage: torch.Tensor  # (B, M)
    prototype_indices: torch.Tensor  # (B, P), into the candidates, by descending usage
    prototype_key: torch.Tensor  # (B, CK, P)
    prototype_shrinkage: torch.Tensor  # (B, 1, P)
    prototype_values: dict[int, torch.Tensor]  # id -> (B, CV, P)


@dataclass(frozen=True)
class EvictionEvent:
    """Rarely used long-term tokens were dropped."""

    bucket_id: int
    usage: torch.Tensor  # (B, T) before eviction
    survivors: torch.Tensor  # (B, keep), by descending usage


MemoryEvent = ConsolidationEvent | EvictionEvent


@dataclass(frozen=True)
class BucketStats:
    object_ids: tuple[int, ...]
    work_size: int
    work_perm_size: int
    long_size: int


@dataclass(frozen=True)
class MemoryStats:
    buckets: dict[int, BucketStats]
    num_sensory: int
    num_object_memories: int

    @property
    def total_tokens(self) -> int:
        return sum(b.work_size + b.long_size for b in self.buckets.values())


class MemoryManager:
    """Working memory (permanent first frame + FIFO or consolidation), long-term memory, sensory
    memory and object memory for one video."""

    def __init__(self, config: InferenceConfig, *, sensory_dim: int) -> None:
        self.config = config
        self.sensory_dim = sensory_dim
        self.use_long_term = config.use_long_term
        self.count_long_term_usage = config.long_term.count_usage
        # Frame counts exclude the permanent first frame (hence the - 1, as the official code).
        if self.use_long_term:
            self.max_work_frames = config.long_term.max_mem_frames - 1
            self.min_work_frames = config.long_term.min_mem_frames - 1
        else:
            self.max_work_frames = config.max_mem_frames - 1
            self.min_work_frames = 0

        self.work = KeyValueStore(save_selection=self.use_long_term, save_usage=self.use_long_term)
        self.long: KeyValueStore | None = (
            KeyValueStore(save_usage=self.count_long_term_usage) if self.use_long_term else None
        )
        self.sensory: dict[int, torch.Tensor] = {}  # id -> (B, C, h, w)
        self.object_memory: dict[int, torch.Tensor] = {}  # id -> (B, Q, C + 1): sums, then area
        self.tokens_per_frame: int | None = None
        self.listeners: list[Callable[[MemoryEvent], None]] = []

    # ------------------------------------------------------------------ state
    @property
    def engaged(self) -> bool:
        return self.work.engaged()

    def has_memory(self, obj: int) -> bool:
        return self.work.bucket_of(obj) is not None

    def stats(self) -> MemoryStats:
        buckets = {
            bid: BucketStats(
                object_ids=tuple(b.object_ids),
                work_size=b.size,
                work_perm_size=b.perm_size,
                long_size=self.long.size(bid) if self.long is not None else 0,
            )
            for bid, b in self.work.buckets.items()
        }
        return MemoryStats(buckets, len(self.sensory), len(self.object_memory))

    def _emit(self, event: MemoryEvent) -> None:
        for listener in self.listeners:
            listener(event)

    # ------------------------------------------------------------------ sensory
    def initialize_sensory(self, sample_key: torch.Tensor, object_ids: list[int]) -> None:
        """Zero sensory memory for objects that have none. sample_key: (B, CK, h, w)."""
        bs, _, h, w = sample_key.shape
        for obj in object_ids:
            if obj not in self.sensory:
                self.sensory[obj] = sample_key.new_zeros((bs, self.sensory_dim, h, w))

    def get_sensory(self, object_ids: list[int]) -> torch.Tensor:
        return torch.stack([self.sensory[obj] for obj in object_ids], dim=1)  # (B, N, C, h, w)

    def update_sensory(self, sensory: torch.Tensor, object_ids: list[int]) -> None:
        # sensory: (B, N, C, h, w)
        for i, obj in enumerate(object_ids):
            self.sensory[obj] = sensory[:, i]

    # ------------------------------------------------------------------ read
    def _bucket_values(self, object_ids: list[int], bucket_id: int) -> torch.Tensor:
        bucket = self.work.buckets[bucket_id]
        value = torch.stack([bucket.values[obj] for obj in object_ids], dim=1)  # (B, N, CV, T)
        if self.long is not None and self.long.engaged(bucket_id):
            long_bucket = self.long.buckets[bucket_id]
            long_value = torch.stack([long_bucket.values[obj] for obj in object_ids], dim=1)
            value = torch.cat([long_value, value], dim=-1)  # (B, N, CV, T_long + T)
        return value

    def _affinity(
        self, bucket_id: int, query_key: torch.Tensor, query_selection: torch.Tensor
    ) -> torch.Tensor:
        """Top-k affinity (B, T, HW) of one bucket, updating usage counters.

        Always float32, also under autocast: the top-k cut and the softmax are sensitive.
        """
        with torch.autocast(query_key.device.type, enabled=False):
            return self._affinity_fp32(bucket_id, query_key.float(), query_selection.float())

    def _affinity_fp32(
        self, bucket_id: int, query_key: torch.Tensor, query_selection: torch.Tensor
    ) -> torch.Tensor:
        top_k = self.config.top_k
        work = self.work.buckets[bucket_id]
        if self.long is not None and self.long.engaged(bucket_id):
            long = self.long.buckets[bucket_id]
            long_size = long.size
            mem_key = torch.cat([long.key, work.key], -1).float()  # (B, CK, T_long + T)
            mem_shrinkage = torch.cat([long.shrinkage, work.shrinkage], -1).float()
            similarity = get_similarity(mem_key, mem_shrinkage, query_key, query_selection)
            affinity = do_softmax(similarity, top_k)
            usage = affinity.sum(dim=2)  # (B, T_long + T)
            self.work.update_usage(bucket_id, usage[:, long_size:])
            if self.count_long_term_usage:
                self.long.update_usage(bucket_id, usage[:, :long_size])
            return affinity
        similarity = get_similarity(
            work.key.float(), work.shrinkage.float(), query_key, query_selection
        )
        affinity = do_softmax(similarity, top_k)
        if self.use_long_term:
            self.work.update_usage(bucket_id, affinity.sum(dim=2))
        return affinity

    def read(
        self,
        network: VOSNetworkProtocol,
        pix_feat: torch.Tensor,
        query_key: torch.Tensor,
        query_selection: torch.Tensor,
        last_mask: torch.Tensor,
        object_ids: list[int],
    ) -> torch.Tensor:
        """Memory readout for every object in ``object_ids`` (in that order).

        pix_feat: (B, C, h, w); query_key, query_selection: (B, CK, h, w); last_mask: (B, N, H, W)
        with channels in ``object_ids`` order. Returns (B, N, C, h, w).
        """
        h, w = pix_feat.shape[-2:]
        bs = pix_feat.shape[0]
        query_key = query_key.flatten(start_dim=2)  # (B, CK, HW)
        query_selection = query_selection.flatten(start_dim=2)  # (B, CK, HW)
        chunk_size = self.config.chunk_size

        readouts: dict[int, torch.Tensor] = {}
        for bucket_id, bucket in self.work.buckets.items():
            affinity = self._affinity(bucket_id, query_key, query_selection)
            members = bucket.object_ids
            if chunk_size < 1:
                chunks = [members]
            else:
                chunks = [members[i : i + chunk_size] for i in range(0, len(members), chunk_size)]
            for objects in chunks:
                sensory = self.get_sensory(objects)  # (B, n, C, h, w)
                mask = last_mask[:, [object_ids.index(obj) for obj in objects]]  # (B, n, H, W)
                value = self._bucket_values(objects, bucket_id)  # (B, n, CV, T)
                with torch.autocast(affinity.device.type, enabled=False):
                    visual = read_values(affinity, value.float())  # (B, n, CV, HW)
                visual = visual.view(bs, len(objects), value.shape[2], h, w)  # (B, n, CV, h, w)
                pixel_readout = network.pixel_fusion(pix_feat, visual, sensory, mask)
                obj_mem = torch.stack([self.object_memory[obj] for obj in objects], dim=1)
                obj_mem = obj_mem.unsqueeze(2)  # (B, n, 1, Q, C + 1)
                readout, _ = network.readout_query(pixel_readout, obj_mem)  # (B, n, C, h, w)
                for i, obj in enumerate(objects):
                    readouts[obj] = readout[:, i]
        missing = [obj for obj in object_ids if obj not in readouts]
        if missing:
            raise RuntimeError(f"objects {missing} have no memory to read from")
        return torch.stack([readouts[obj] for obj in object_ids], dim=1)  # (B, N, C, h, w)

    # ------------------------------------------------------------------ write
    def add(
        self,
        key: torch.Tensor,
        shrinkage: torch.Tensor,
        mask_value: torch.Tensor,
        obj_summaries: torch.Tensor,
        object_ids: list[int],
        selection: torch.Tensor | None = None,
        *,
        permanence: Permanence = "first",
    ) -> None:
        """Memorise one frame.

        key, selection: (B, CK, h, w); shrinkage: (B, 1, h, w); mask_value: (B, N, CV, h, w);
        obj_summaries: (B, N, Q, C + 1), object ids in ``object_ids`` order.
        """
        h, w = mask_value.shape[-2:]
        self.tokens_per_frame = h * w
        key = key.flatten(start_dim=2)  # (B, CK, HW)
        shrinkage = shrinkage.flatten(start_dim=2)  # (B, 1, HW)
        mask_value = mask_value.flatten(start_dim=3)  # (B, N, CV, HW)
        if selection is not None:
            selection = selection.flatten(start_dim=2)  # (B, CK, HW)

        # Object memory: running sums of summaries and of their areas, averaged downstream.
        for i, obj in enumerate(object_ids):
            incoming = obj_summaries[:, i]  # (B, Q, C + 1)
            if obj in self.object_memory:
                self.object_memory[obj] = self.object_memory[obj] + incoming
            else:
                self.object_memory[obj] = incoming

        values = {obj: mask_value[:, i] for i, obj in enumerate(object_ids)}
        self.work.add(
            key,
            values,
            shrinkage,
            selection if self.use_long_term else None,
            permanence=permanence,
        )

        max_work_tokens = self.max_work_frames * self.tokens_per_frame
        for bucket_id in list(self.work.buckets):
            if self.long is None:
                self.work.remove_old(bucket_id, max_work_tokens)
            elif self.work.non_perm_size(bucket_id) >= max_work_tokens:
                lt = self.config.long_term
                if self.long.non_perm_size(bucket_id) >= lt.max_num_tokens - lt.num_prototypes:
                    keep = lt.max_num_tokens - lt.num_prototypes - lt.buffer_tokens
                    self._remove_obsolete(bucket_id, keep)
                self._compress(bucket_id)

    def _remove_obsolete(self, bucket_id: int, keep: int) -> None:
        assert self.long is not None
        usage = self.long.get_usage(bucket_id) if self.long.save_usage else None
        survivors = self.long.remove_obsolete(bucket_id, keep)
        if self.listeners:
            if usage is None:
                usage = survivors.new_zeros((survivors.shape[0], 0), dtype=torch.float32)
            self._emit(EvictionEvent(bucket_id, usage, survivors))

    def _compress(self, bucket_id: int) -> None:
        """Consolidate the older temporary working tokens into long-term prototypes."""
        assert self.long is not None and self.tokens_per_frame is not None
        min_work_tokens = self.min_work_frames * self.tokens_per_frame
        cand = self.work.slice_temporary(bucket_id, 0, -min_work_tokens)
        assert cand.selection is not None and cand.usage is not None
        num_prototypes = min(self.config.long_term.num_prototypes, cand.key.shape[-1])

        # Prototypes: the most used candidates, by descending usage.
        bs = cand.key.shape[0]
        indices = []
        proto_key = []
        proto_selection = []
        for bi in range(bs):
            _, top = torch.topk(cand.usage[bi], k=num_prototypes, dim=-1, sorted=True)
            top = top.flatten()
            indices.append(top)
            proto_key.append(cand.key[bi, :, top])
            proto_selection.append(cand.selection[bi, :, top])
        prototype_key = torch.stack(proto_key, dim=0)  # (B, CK, P)
        prototype_selection = torch.stack(proto_selection, dim=0)  # (B, CK, P)

        # Potentiation: every candidate contributes to the prototypes by a plain softmax.
        similarity = get_similarity(cand.key, cand.shrinkage, prototype_key, prototype_selection)
        affinity = do_softmax(similarity)  # (B, M, P)
        prototype_values = {obj: read_values(affinity, v) for obj, v in cand.values.items()}
        prototype_shrinkage = read_values(affinity, cand.shrinkage)  # (B, 1, P)

        if self.listeners:
            self._emit(
                ConsolidationEvent(
                    bucket_id=bucket_id,
                    candidate_usage=cand.usage.clone(),
                    prototype_indices=torch.stack(indices, dim=0),
                    prototype_key=prototype_key,
                    prototype_shrinkage=prototype_shrinkage,
                    prototype_values=prototype_values,
                )
            )

        self.work.sieve_by_range(bucket_id, 0, -min_work_tokens, min_size=min_work_tokens)
        self.long.add(
            prototype_key, prototype_values, prototype_shrinkage, None, bucket_id=bucket_id
        )

    # ------------------------------------------------------------------ removal
    def purge_except(self, keep_ids: list[int]) -> None:
        """Forget everything about objects not in ``keep_ids``."""
        self.work.purge_except(keep_ids)
        if self.long is not None:
            self.long.purge_except(keep_ids)
        keep = set(keep_ids)
        self.sensory = {k: v for k, v in self.sensory.items() if k in keep}
        self.object_memory = {k: v for k, v in self.object_memory.items() if k in keep}

    def clear_temporary(self) -> None:
        """Drop all non-permanent working and long-term tokens."""
        self.work.clear_temporary()
        if self.long is not None:
            self.long.clear_temporary()
