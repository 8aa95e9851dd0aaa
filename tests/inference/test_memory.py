"""MemoryManager: similarity/softmax numerics, FIFO and long-term bookkeeping, bounds, events."""

from __future__ import annotations

import math

import pytest
import torch

from s3cli.inference.config import InferenceConfig
from s3cli.inference.memory import (
    ConsolidationEvent,
    EvictionEvent,
    MemoryManager,
    _Affinity,
    _block_similarity,
    dense_affinity,
    do_softmax,
    get_similarity,
    query_chunk,
    read_values,
    topk_affinity,
)

CK, CV, Q, H, W = 4, 6, 2, 2, 3  # 6 tokens per frame


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_similarity_is_negative_weighted_distance() -> None:
    g = torch.Generator().manual_seed(0)
    mk = torch.randn(2, CK, 7, generator=g)
    ms = 1 + torch.rand(2, 1, 7, generator=g)
    qk = torch.randn(2, CK, 5, generator=g)
    qe = torch.rand(2, CK, 5, generator=g)
    sim = get_similarity(mk, ms, qk, qe)
    diff = mk.unsqueeze(-1) - qk.unsqueeze(2)  # (B, CK, T, HW)
    direct = -(qe.unsqueeze(2) * diff.pow(2)).sum(1) * ms.transpose(1, 2) / math.sqrt(CK)
    assert sim.shape == (2, 7, 5)
    assert torch.allclose(sim, direct, atol=1e-5)
    # without selection/shrinkage: STCN-style (the b^2 term is dropped, constant per query)
    plain = get_similarity(mk, None, qk, None)
    ref = (-(mk.pow(2).sum(1)).unsqueeze(2) + 2 * mk.transpose(1, 2) @ qk) / math.sqrt(CK)
    assert torch.allclose(plain, ref)


def test_inference_similarity_is_bit_identical_to_the_official_form() -> None:
    """The readout's in-place similarity rounds exactly as ``-a^2 + 2ab - b^2`` (a reordered
    computation could flip the near-ties the fixture runs contain)."""
    g = torch.Generator().manual_seed(3)
    mk = torch.randn(2, CK, 1000, generator=g) * 3
    ms = 1 + torch.rand(2, 1, 1000, generator=g) * 5
    qk = torch.randn(2, CK, 300, generator=g) * 3
    qe = torch.rand(2, CK, 300, generator=g)
    mk_t = mk.transpose(1, 2)
    block = _block_similarity(mk_t, mk_t.pow(2), ms.transpose(1, 2), qk, qe)
    assert torch.equal(block, get_similarity(mk, ms, qk, qe))
    weights, indices = topk_affinity(mk, ms, qk, qe, 30)
    top, idx = torch.topk(get_similarity(mk, ms, qk, qe), k=30, dim=1)
    assert torch.equal(indices, idx)
    assert torch.equal(weights, top.exp() / top.exp().sum(dim=1, keepdim=True))


def test_top_k_softmax_keeps_k_entries_without_max_subtraction() -> None:
    sim = torch.tensor([[[-1.0], [-3.0], [-2.0], [-0.5]]])  # (1, T=4, HW=1)
    aff = do_softmax(sim.clone(), top_k=2)
    kept = torch.tensor([-1.0, -0.5]).exp()
    assert aff[0, :, 0].tolist() == [kept[0] / kept.sum(), 0.0, 0.0, kept[1] / kept.sum()]
    full = do_softmax(sim)
    assert torch.allclose(full, torch.softmax(sim, dim=1))
    assert torch.allclose(do_softmax(sim, top_k=10), full)  # k is clamped to the memory size


def test_blockwise_and_sparse_readout_equal_the_dense_one() -> None:
    """Long videos read memory in query blocks (bounded transient memory) or sparsely; both
    give the dense official readout within float rounding, and blocks only where needed."""
    g = torch.Generator().manual_seed(1)
    tokens, queries, k = 300, 200, 30
    mk = torch.randn(2, 16, tokens, generator=g)
    ms = 1 + torch.rand(2, 1, tokens, generator=g)
    qk = torch.randn(2, 16, queries, generator=g)
    qe = torch.rand(2, 16, queries, generator=g)
    value = torch.randn(2, 3, 8, tokens, generator=g)  # (B, N, CV, T)
    dense = do_softmax(get_similarity(mk, ms, qk, qe), top_k=k)  # (B, T, HW)
    expected = read_values(dense, value)

    assert query_chunk(tokens, queries) == queries  # small: whole, as the official code
    step = query_chunk(tokens, queries, chunk_elements=tokens * 70)
    assert step == 64 and step < queries
    weights, indices = topk_affinity(mk, ms, qk, qe, k, step)
    assert weights.shape == indices.shape == (2, k, queries)
    torch.testing.assert_close(dense_affinity(weights, indices, tokens), dense)
    for sparse in (False, True):
        aff = _Affinity(weights, indices, tokens, step, sparse)
        torch.testing.assert_close(aff.read(value), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(aff.usage(), dense.sum(dim=2), atol=1e-5, rtol=1e-5)
    whole = _Affinity(*topk_affinity(mk, ms, qk, qe, k), tokens, queries, False)
    assert torch.equal(whole.read(value), expected)  # bit for bit when not split


def _frame(manager: MemoryManager, ids: list[int], seed: int, bs: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(bs, CK, H, W, generator=g)
    shrink = 1 + torch.rand(bs, 1, H, W, generator=g)
    sel = torch.rand(bs, CK, H, W, generator=g)
    value = torch.randn(bs, len(ids), CV, H, W, generator=g)
    summaries = torch.rand(bs, len(ids), Q, 5, generator=g)
    manager.add(key, shrink, value, summaries, ids, sel)


class _Readout:
    """Enough of the network for ``MemoryManager.read``: passes the visual readout through."""

    def pixel_fusion(self, pix_feat, pixel, sensory, last_mask, *, chunk_size=-1):
        return pixel

    def readout_query(self, pixel_readout, obj_memory, *, selector=None, need_weights=False):
        return pixel_readout, None


def _read(manager: MemoryManager, ids: list[int], seed: int = 99) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    manager.initialize_sensory(torch.zeros(1, CK, H, W), ids)
    key = torch.randn(1, CK, H, W, generator=g)
    sel = torch.rand(1, CK, H, W, generator=g)
    last_mask = torch.rand(1, len(ids), 4 * H, 4 * W, generator=g)
    return manager.read(_Readout(), torch.zeros(1, 3, H, W), key, sel, last_mask, ids)


def test_fifo_bounds_working_memory() -> None:
    manager = MemoryManager(InferenceConfig(max_mem_frames=3), sensory_dim=2)
    for t in range(50):
        _frame(manager, [1, 2], t)
        stats = manager.stats().buckets[0]
        assert stats.work_perm_size == H * W
        assert stats.work_size == H * W * min(t + 1, 3)
    out = _read(manager, [2, 1])
    assert out.shape == (1, 2, CV, H, W)
    # object memory accumulates summaries (sums and areas)
    assert manager.object_memory[1].shape == (1, Q, 5)


def test_object_summaries_are_summed() -> None:
    manager = MemoryManager(InferenceConfig(), sensory_dim=2)
    total = torch.zeros(1, Q, 5)
    for t in range(3):
        g = torch.Generator().manual_seed(t)
        summaries = torch.rand(1, 1, Q, 5, generator=g)
        total = total + summaries[:, 0]
        manager.add(
            torch.randn(1, CK, H, W),
            torch.ones(1, 1, H, W),
            torch.randn(1, 1, CV, H, W),
            summaries,
            [1],
            torch.rand(1, CK, H, W),
        )
    assert torch.allclose(manager.object_memory[1], total)


def test_long_term_consolidation_and_eviction_counts() -> None:
    cfg = InferenceConfig.from_options(
        use_long_term=True,
        long_term={
            "max_mem_frames": 3,
            "min_mem_frames": 2,
            "num_prototypes": 4,
            "max_num_tokens": 14,
            "buffer_tokens": 3,
        },
    )
    manager = MemoryManager(cfg, sensory_dim=2)
    events: list[ConsolidationEvent | EvictionEvent] = []
    manager.listeners.append(events.append)
    hw = H * W
    for t in range(200):
        _frame(manager, [3], t)
        _read(manager, [3], seed=1000 + t)  # reads give usage
        stats = manager.stats().buckets[0]
        # working memory: permanent frame + at most (max_mem_frames - 1) temporary frames
        assert stats.work_size <= hw + 2 * hw
        assert stats.long_size <= 14
    cons = [e for e in events if isinstance(e, ConsolidationEvent)]
    evict = [e for e in events if isinstance(e, EvictionEvent)]
    # Consolidation whenever 2 temporary frames are in memory: frames 2, 3, 4, ... (one
    # temporary frame stays), i.e. 198 times; each candidate set is one frame of 6 tokens.
    assert len(cons) == 198
    assert all(e.candidate_usage.shape == (1, hw) for e in cons)
    assert all(e.prototype_indices.shape == (1, 4) for e in cons)
    # Long-term grows by 4 per compression; at >= 10 tokens it first shrinks to 7.
    assert len(evict) > 0 and all(e.survivors.shape == (1, 7) for e in evict)
    for e in cons:
        usage = e.candidate_usage[0]
        chosen = usage[e.prototype_indices[0]]
        assert torch.all(chosen[:-1] >= chosen[1:])  # descending usage
        rest = torch.ones_like(usage, dtype=torch.bool)
        rest[e.prototype_indices[0]] = False
        assert chosen.min() >= usage[rest].max()
        assert e.prototype_values[3].shape == (1, CV, 4)
    final = manager.stats().buckets[0]
    assert final.work_perm_size == hw and final.long_size <= 14


def test_long_term_reads_put_long_term_tokens_first_and_count_usage() -> None:
    cfg = InferenceConfig.from_options(
        use_long_term=True,
        long_term={"max_mem_frames": 2, "min_mem_frames": 1, "num_prototypes": 2},
    )
    manager = MemoryManager(cfg, sensory_dim=2)
    _frame(manager, [1], 0)
    _read(manager, [1])
    _frame(manager, [1], 1)  # one temporary frame = max -> compressed to 2 prototypes
    assert manager.long is not None and manager.long.size(0) == 2
    assert manager.work.non_perm_size(0) == 0
    _read(manager, [1])
    long_bucket = manager.long.buckets[0]
    assert long_bucket.life_count is not None
    assert torch.allclose(long_bucket.life_count, torch.full((1, 2), 1 + 1e-7))


def test_purge_and_sensory() -> None:
    manager = MemoryManager(InferenceConfig(), sensory_dim=2)
    _frame(manager, [1, 2], 0)
    _frame(manager, [1, 2, 5], 1)
    manager.initialize_sensory(torch.zeros(1, CK, H, W), [1, 2, 5])
    assert manager.get_sensory([5, 1]).shape == (1, 2, 2, H, W)
    manager.purge_except([5])
    assert list(manager.work.buckets) == [1]
    assert set(manager.sensory) == {5} and set(manager.object_memory) == {5}
    assert manager.has_memory(5) and not manager.has_memory(1)
    manager.purge_except([])
    assert not manager.engaged
