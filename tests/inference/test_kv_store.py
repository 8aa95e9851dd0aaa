"""KeyValueStore bookkeeping: buckets, permanence, FIFO, usage, eviction, purge."""

from __future__ import annotations

import pytest
import torch

from s3cli.inference.kv_store import KeyValueStore

CK, CV, HW = 3, 2, 4


def _frame(tag: float, bs: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """key, shrinkage, selection of one frame; every entry carries ``tag`` to follow it."""
    key = torch.full((bs, CK, HW), tag)
    shrink = torch.full((bs, 1, HW), tag)
    sel = torch.full((bs, CK, HW), tag)
    return key, shrink, sel


def _values(tag: float, ids: list[int], bs: int = 1) -> dict[int, torch.Tensor]:
    return {obj: torch.full((bs, CV, HW), tag + obj / 100) for obj in ids}


def _tags(store: KeyValueStore, bucket_id: int) -> list[float]:
    return store.buckets[bucket_id].key[0, 0, ::HW].tolist()


def test_first_frame_is_permanent_and_fifo_keeps_newest() -> None:
    store = KeyValueStore()
    for t in range(6):
        key, shrink, _ = _frame(float(t))
        store.add(key, _values(float(t), [1, 2]), shrink, permanence="first")
        store.remove_old(0, 2 * HW)
    assert list(store.buckets) == [0]
    assert store.perm_size(0) == HW and store.size(0) == 3 * HW
    assert _tags(store, 0) == [0.0, 4.0, 5.0]
    bucket = store.buckets[0]
    assert bucket.values[2][0, 0, ::HW].tolist() == pytest.approx([0.02, 4.02, 5.02])
    assert bucket.shrinkage.shape == (1, 1, 3 * HW)


def test_new_objects_get_a_new_bucket_and_share_later_keys() -> None:
    store = KeyValueStore()
    key, shrink, _ = _frame(0.0)
    store.add(key, _values(0.0, [1]), shrink, permanence="first")
    key, shrink, _ = _frame(1.0)
    store.add(key, _values(1.0, [1, 5, 9]), shrink, permanence="first")
    assert {b: s.object_ids for b, s in store.buckets.items()} == {0: [1], 1: [5, 9]}
    assert _tags(store, 0) == [0.0, 1.0] and store.perm_size(0) == HW
    assert _tags(store, 1) == [1.0] and store.perm_size(1) == HW
    assert store.bucket_of(9) == 1 and store.bucket_of(3) is None

    store.purge_except([1, 9])
    assert store.buckets[1].object_ids == [9] and set(store.buckets[1].values) == {9}
    store.purge_except([9])
    assert list(store.buckets) == [1]
    # bucket ids are never reused
    key, shrink, _ = _frame(2.0)
    store.add(key, _values(2.0, [4]), shrink, permanence="first")
    assert list(store.buckets) == [1, 2]


def test_usage_counts_only_temporary_tokens() -> None:
    store = KeyValueStore(save_selection=True, save_usage=True)
    for t in range(3):
        key, shrink, sel = _frame(float(t))
        store.add(key, _values(float(t), [1]), shrink, sel, permanence="first")
    bucket = store.buckets[0]
    assert bucket.selection is not None and bucket.selection.shape == (1, CK, 2 * HW)
    assert torch.all(bucket.use_count == 0) and torch.allclose(
        bucket.life_count, torch.tensor(1e-7)
    )
    usage = torch.arange(3 * HW, dtype=torch.float32).unsqueeze(0)  # (1, T) over all tokens
    store.update_usage(0, usage)
    store.update_usage(0, usage)
    assert torch.equal(bucket.use_count, 2 * usage[:, HW:])
    assert torch.allclose(bucket.life_count, torch.full((1, 2 * HW), 2 + 1e-7))
    norm = store.get_usage(0)
    assert torch.allclose(norm, usage[:, HW:], rtol=1e-6)

    sl = store.slice_temporary(0, 0, -HW)
    assert sl.key.shape == (1, CK, HW) and sl.key[0, 0, 0] == 1.0
    assert sl.selection is not None and sl.selection[0, 0, 0] == 1.0
    assert sl.usage is not None and sl.usage.shape == (1, HW)
    store.sieve_by_range(0, 0, -HW, min_size=HW)
    assert _tags(store, 0) == [0.0, 2.0]
    assert bucket.selection is not None and bucket.selection[0, 0, ::HW].tolist() == [2.0]
    assert bucket.use_count is not None and bucket.use_count.shape == (1, HW)
    # min_size protects small buckets
    store.sieve_by_range(0, 0, 0, min_size=HW)
    assert store.size(0) == 2 * HW
    store.clear_temporary()
    assert store.size(0) == HW and store.non_perm_size(0) == 0


def test_remove_obsolete_keeps_most_used_in_order() -> None:
    store = KeyValueStore(save_usage=True)
    key = torch.arange(6, dtype=torch.float32).view(1, 1, 6).repeat(1, CK, 1)  # (1, CK, 6)
    shrink = key[:, :1].clone()
    store.add(key, {3: key[:, :CV].clone()}, shrink, bucket_id=4)
    assert list(store.buckets) == [4] and store.perm_size(4) == 0
    store.update_usage(4, torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.5]]))
    survivors = store.remove_obsolete(4, 3)
    assert survivors.tolist() == [[1, 3, 5]]
    bucket = store.buckets[4]
    assert bucket.key[0, 0].tolist() == [1.0, 3.0, 5.0]
    assert bucket.values[3][0, 1].tolist() == [1.0, 3.0, 5.0]
    assert bucket.use_count is not None and bucket.use_count[0].tolist() == pytest.approx(
        [0.9, 0.8, 0.5]
    )
    # the long-term path appends to an existing bucket
    store.add(key[..., :2], {3: key[:, :CV, :2]}, shrink[..., :2], bucket_id=4)
    assert store.size(4) == 5


def test_remove_obsolete_without_usage_keeps_newest() -> None:
    store = KeyValueStore()
    key = torch.arange(5, dtype=torch.float32).view(1, 1, 5)
    store.add(key, {1: key.clone()}, key.clone(), bucket_id=0)
    assert store.remove_obsolete(0, 2).tolist() == [[3, 4]]
    assert store.buckets[0].key[0, 0].tolist() == [3.0, 4.0]


def test_batch_of_two_keeps_per_sample_choices() -> None:
    store = KeyValueStore(save_usage=True)
    key = torch.arange(8, dtype=torch.float32).view(2, 1, 4)
    store.add(key, {1: key.clone()}, key.clone(), bucket_id=0)
    store.update_usage(0, torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 3.0, 0.0, 1.0]]))
    assert store.remove_obsolete(0, 2).tolist() == [[2, 0], [1, 3]]
    assert store.buckets[0].key[:, 0].tolist() == [[2.0, 0.0], [5.0, 7.0]]
