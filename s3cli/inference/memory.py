"""Working, long-term and sensory memory, and the memory readout.

The readout follows the official ``MemoryManager`` (Cutie ``ec5cdd4``, S3 ``eedf595``; both
compute identically) operation by operation: the fixtures contain near-ties in the top-k cut
and in the prototype choice that a reordered computation could flip.

Memory stays bounded on any length: the stores fill reserved buffers in place
(``KeyValueStore.reserve``), the readout reads one [long-term | working] buffer per bucket that
is refilled only when the memory changes, and long videos compute the memory-by-query affinity
in blocks of at most ``READ_CHUNK_ELEMENTS`` (a whole block, as the official code, below that).

Shapes: B batch (2 with flip augmentation), N objects, CK key channels (64), CV value channels
(256), Q object-summary slots, T memory tokens, HW query tokens (stride-16 grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    "dense_affinity",
    "query_chunk",
    "read_topk_values",
    "read_values",
    "topk_affinity",
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


def _block_similarity(
    mem_key_t: torch.Tensor,
    mem_key_sq_t: torch.Tensor,
    mem_shrink: torch.Tensor,
    query_key: torch.Tensor,
    query_selection: torch.Tensor,
) -> torch.Tensor:
    """``get_similarity`` with selection and shrinkage, bit for bit, for inference: in place on
    one fresh (B, T, q) tensor instead of six, the squared memory keys computed once per read.

    mem_key_t, mem_key_sq_t: (B, T, CK) (the keys and their squares, transposed views);
    mem_shrink: (B, T, 1); query_key, query_selection: (B, CK, q). Each step rounds exactly as
    ``-a^2 + 2ab - b^2`` does: ``2 (K^T Q) = K^T (2 Q)`` exactly (a power-of-two scale), and
    ``-a + x`` is ``x - a`` in IEEE arithmetic.
    """
    num_channels = mem_key_t.shape[-1]
    similarity = mem_key_t @ (2 * (query_key * query_selection))  # (B, T, q): 2ab
    similarity.sub_(mem_key_sq_t @ query_selection)  # -a^2 + 2ab
    similarity.sub_((query_selection * query_key.pow(2)).sum(1, keepdim=True))  # - b^2
    return similarity.mul_(mem_shrink).div_(math.sqrt(num_channels))


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


READ_CHUNK_ELEMENTS = 1 << 21
"""Largest memory-by-query block (elements) the readout computes at once: its transient memory
stays bounded whatever the number of memory tokens. Blocks at or under this size (every fixture
run) are computed whole, exactly as the official code does."""


def query_chunk(tokens: int, queries: int, chunk_elements: int = READ_CHUNK_ELEMENTS) -> int:
    """Query columns per readout block: all of them when the block fits in ``chunk_elements``,
    else a multiple of 64 (matrix kernels then give the columns the same sums as whole)."""
    if tokens * queries <= chunk_elements:
        return max(1, queries)
    return max(64, chunk_elements // max(1, tokens) // 64 * 64)


def topk_affinity(
    mem_key: torch.Tensor,
    mem_shrinkage: torch.Tensor | None,
    query_key: torch.Tensor,
    query_selection: torch.Tensor | None,
    top_k: int,
    step: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero part of ``do_softmax(get_similarity(...), top_k)``, as weights and indices.

    mem_key: (B, CK, T); mem_shrinkage: (B, 1, T); query_key, query_selection: (B, CK, HW).
    Returns ``weights`` (B, k, HW) and ``indices`` (B, k, HW) into the T memory tokens, with
    ``k = min(top_k, T)``. The similarity is computed ``step`` query columns at a time
    (default :func:`query_chunk`), so no (B, T, HW) tensor is made on long videos.
    """
    tokens, queries = mem_key.shape[-1], query_key.shape[-1]
    k = min(top_k, tokens)
    step = step or query_chunk(tokens, queries)
    if mem_shrinkage is not None and query_selection is not None:
        selection = query_selection
        mem_key_t = mem_key.flatten(start_dim=2).transpose(1, 2)  # (B, T, CK)
        mem_key_sq_t = mem_key_t.pow(2)  # (B, T, CK), once for every block
        mem_shrink = mem_shrinkage.flatten(start_dim=1).unsqueeze(2)  # (B, T, 1)

        def similarity(q0: int, q1: int) -> torch.Tensor:
            return _block_similarity(
                mem_key_t, mem_key_sq_t, mem_shrink, query_key[..., q0:q1],
                selection[..., q0:q1],
            )
    else:

        def similarity(q0: int, q1: int) -> torch.Tensor:
            sel = query_selection[..., q0:q1] if query_selection is not None else None
            return get_similarity(mem_key, mem_shrinkage, query_key[..., q0:q1], sel)

    weights, indices = [], []
    for q0 in range(0, queries, step):
        q1 = min(queries, q0 + step)
        sim = similarity(q0, q1)  # (B, T, q)
        top, idx = torch.topk(sim, k=k, dim=1)  # (B, k, q)
        del sim
        top = top.exp_()  # no max subtraction, as the official code
        top /= torch.sum(top, dim=1, keepdim=True)
        weights.append(top)
        indices.append(idx)
    if len(weights) == 1:
        return weights[0], indices[0]
    return torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)


def dense_affinity(weights: torch.Tensor, indices: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, k, q) top-k weights and indices -> the dense (B, T, q) affinity of ``do_softmax``."""
    shape = (weights.shape[0], tokens, weights.shape[-1])
    return weights.new_zeros(shape).scatter_(1, indices, weights)


def read_topk_values(
    weights: torch.Tensor, indices: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``read_values`` of a top-k affinity given as ``weights``/``indices`` (B, k, HW), without
    the dense (B, T, HW) matrix. value: (B, N, C, T) -> (B, N, C, HW)."""
    bs, num_objects, channels, _ = value.shape
    flat = value.reshape(bs, num_objects * channels, -1)  # (B, N C, T)
    out = []
    for b in range(bs):
        acc: torch.Tensor | None = None
        for j in range(weights.shape[1]):
            term = flat[b].index_select(1, indices[b, j]) * weights[b, j]  # (N C, HW)
            acc = term if acc is None else acc.add_(term)
        assert acc is not None
        out.append(acc)
    return torch.stack(out).view(bs, num_objects, channels, -1)


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


@dataclass
class _Affinity:
    """A bucket's top-k memory-to-query affinity: weights and token indices (B, k, HW).

    ``read`` with ``sparse`` gathers the k values of each query; otherwise it multiplies the
    values by the dense (B, T, q) affinity block by block as the official code (whole when
    small: that dense affinity is then built once and shared by ``usage`` and every ``read``).
    """

    weights: torch.Tensor  # (B, k, HW)
    indices: torch.Tensor  # (B, k, HW)
    tokens: int
    step: int
    sparse: bool
    _whole: torch.Tensor | None = field(default=None, repr=False)

    @property
    def blocked(self) -> bool:
        """Whether the queries are taken in blocks (long memories) rather than all at once."""
        return self.step < self.weights.shape[-1]

    def whole(self) -> torch.Tensor:
        """The dense (B, T, HW) affinity (only built when not ``blocked``)."""
        if self._whole is None:
            self._whole = dense_affinity(self.weights, self.indices, self.tokens)
        return self._whole

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(q0, q1, dense (B, T, q1 - q0)) affinity blocks."""
        queries = self.weights.shape[-1]
        for q0 in range(0, queries, self.step):
            q1 = min(queries, q0 + self.step)
            w, i = self.weights[..., q0:q1], self.indices[..., q0:q1]
            yield q0, q1, dense_affinity(w, i, self.tokens)

    def usage(self) -> torch.Tensor:
        """Per-token affinity mass (B, T): ``affinity.sum(dim=2)``."""
        if not self.blocked:
            return self.whole().sum(dim=2)  # the official order of summation
        # Long memories: add the top-k weights onto their tokens, no dense affinity needed.
        b = self.weights.shape[0]
        usage = self.weights.new_zeros(b, self.tokens)
        return usage.scatter_add_(1, self.indices.reshape(b, -1), self.weights.reshape(b, -1))

    def read(self, value: torch.Tensor) -> torch.Tensor:
        """value: (B, N, CV, T) -> (B, N, CV, HW)."""
        if self.sparse:
            return read_topk_values(self.weights, self.indices, value)
        if not self.blocked:
            return read_values(self.whole(), value)
        out = value.new_empty((*value.shape[:3], self.weights.shape[-1]))
        for q0, q1, block in self.blocks():
            out[..., q0:q1] = read_values(block, value)
        return out


@dataclass
class _ReadoutMemory:
    """One bucket's memory as the readout sees it: long-term then working tokens, in buffers
    reserved for the most tokens the memory can hold, refilled only when the memory changes
    (not concatenated anew every frame). The tensors handed out are views of the first T."""

    key: torch.Tensor  # (B, CK, capacity)
    shrinkage: torch.Tensor  # (B, 1, capacity)
    values: torch.Tensor  # (B, N, CV, capacity), objects in bucket order
    object_ids: list[int]
    long_size: int = 0
    size: int = 0
    fresh: bool = False

    @property
    def capacity(self) -> int:
        return self.key.shape[-1]


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
        self._readout_memory: dict[int, _ReadoutMemory] = {}
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
    def _token_capacity(self, bucket_id: int) -> int:
        """The most tokens bucket ``bucket_id`` can hold (long-term plus working), as far as
        known now; buffers are reserved at this size so they need not grow."""
        work = self.work.buckets[bucket_id]
        tpf = self.tokens_per_frame or 0
        most = work.perm_size + (self.max_work_frames + 1) * tpf
        if self.long is not None:
            most += self.config.long_term.max_num_tokens
        return max(most, work.size + (self.long.size(bucket_id) if self.long else 0))

    def _readout(self, bucket_id: int) -> _ReadoutMemory:
        """The bucket's [long-term | working] keys, shrinkage and values, refilled if stale."""
        work = self.work.buckets[bucket_id]
        long = (
            self.long.buckets[bucket_id]
            if self.long is not None and self.long.engaged(bucket_id)
            else None
        )
        long_size = long.size if long is not None else 0
        size = long_size + work.size
        ids = list(work.object_ids)
        cache = self._readout_memory.get(bucket_id)
        if cache is not None and cache.fresh and cache.object_ids == ids:
            return cache
        if cache is None or cache.capacity < size or cache.object_ids != ids:
            capacity = self._token_capacity(bucket_id)
            bs, ck = work.key.shape[:2]
            cv = work.values[ids[0]].shape[1]
            f32 = {"dtype": torch.float32, "device": work.key.device}
            cache = _ReadoutMemory(
                key=torch.empty((bs, ck, capacity), **f32),
                shrinkage=torch.empty((bs, 1, capacity), **f32),
                values=torch.empty((bs, len(ids), cv, capacity), **f32),
                object_ids=ids,
            )
            self._readout_memory[bucket_id] = cache
        if long is not None:
            cache.key[..., :long_size] = long.key
            cache.shrinkage[..., :long_size] = long.shrinkage
            for i, obj in enumerate(ids):
                cache.values[:, i, :, :long_size] = long.values[obj]
        cache.key[..., long_size:size] = work.key
        cache.shrinkage[..., long_size:size] = work.shrinkage
        for i, obj in enumerate(ids):
            cache.values[:, i, :, long_size:size] = work.values[obj]
        cache.long_size, cache.size, cache.fresh = long_size, size, True
        return cache

    def _memory_changed(self) -> None:
        for cache in self._readout_memory.values():
            cache.fresh = False

    def _bucket_values(self, object_ids: list[int], bucket_id: int) -> torch.Tensor:
        """(B, n, CV, T) values of ``object_ids`` (members of the bucket), long-term first."""
        cache = self._readout(bucket_id)
        values = cache.values[..., : cache.size]
        if object_ids == cache.object_ids:
            return values
        rows = torch.tensor([cache.object_ids.index(obj) for obj in object_ids])
        return values.index_select(1, rows.to(values.device))

    def _affinity(
        self, bucket_id: int, query_key: torch.Tensor, query_selection: torch.Tensor
    ) -> _Affinity:
        """Top-k affinity of one bucket's memory to the query, updating usage counters.

        Always float32, also under autocast: the top-k cut and the softmax are sensitive.
        """
        with torch.autocast(query_key.device.type, enabled=False):
            return self._affinity_fp32(bucket_id, query_key.float(), query_selection.float())

    def _affinity_fp32(
        self, bucket_id: int, query_key: torch.Tensor, query_selection: torch.Tensor
    ) -> _Affinity:
        top_k = self.config.top_k
        cache = self._readout(bucket_id)
        long_size = cache.long_size
        mem_key = cache.key[..., : cache.size]  # (B, CK, T_long + T)
        mem_shrinkage = cache.shrinkage[..., : cache.size]  # (B, 1, T_long + T)
        tokens, queries = mem_key.shape[-1], query_key.shape[-1]
        step = query_chunk(tokens, queries)
        weights, indices = topk_affinity(
            mem_key, mem_shrinkage, query_key, query_selection, top_k, step
        )  # (B, k, HW) each
        result = _Affinity(weights, indices, tokens, step, self.config.readout == "sparse")
        usage = result.usage() if self.use_long_term else None  # (B, T)
        if usage is not None:
            self.work.update_usage(bucket_id, usage[:, long_size:])
            if long_size > 0 and self.count_long_term_usage:
                assert self.long is not None
                self.long.update_usage(bucket_id, usage[:, :long_size])
        return result

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
                with torch.autocast(pix_feat.device.type, enabled=False):
                    visual = affinity.read(value.float())  # (B, n, CV, HW)
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
        self._memory_changed()
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
        # Reserve the most tokens each store keeps, so that its buffers fill in place.
        self.work.reserve = (self.max_work_frames + 2) * self.tokens_per_frame
        if self.long is not None:
            lt = self.config.long_term
            self.long.reserve = lt.max_num_tokens + lt.num_prototypes
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
        self._readout_memory.clear()
        if self.long is not None:
            self.long.purge_except(keep_ids)
        keep = set(keep_ids)
        self.sensory = {k: v for k, v in self.sensory.items() if k in keep}
        self.object_memory = {k: v for k, v in self.object_memory.items() if k in keep}

    def clear_temporary(self) -> None:
        """Drop all non-permanent working and long-term tokens."""
        self._memory_changed()
        self.work.clear_temporary()
        if self.long is not None:
            self.long.clear_temporary()
