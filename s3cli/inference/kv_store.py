"""Key/value memory buckets: tensor bookkeeping only (no network, no policy).

Objects that first appear in the same frame share a *bucket*: one key/shrinkage tensor and one
value tensor per object, all laid out along the last (token) dimension. Each bucket is a
permanent part (first tokens) followed by a temporary part; selection and usage counters exist
for the temporary part only.

Shapes: B batch (2 with flip augmentation), CK key channels, CV value channels, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["Bucket", "KeyValueStore", "MemorySlice", "Permanence"]

Permanence = Literal["no", "first", "all"]


BufferName = str | tuple[str, int]


def _room(buffers: dict[BufferName, torch.Tensor], name: BufferName, x: torch.Tensor,
          extra: int) -> torch.Tensor | None:
    """The buffer ``x`` is a prefix of (along the last dimension), when it has room for
    ``extra`` more entries; else None."""
    base = buffers.get(name)
    if base is None or base.data_ptr() != x.data_ptr() or base.stride() != x.stride():
        return None
    if base.shape[:-1] != x.shape[:-1] or base.shape[-1] < x.shape[-1] + extra:
        return None
    return base


def _cat(
    buffers: dict[BufferName, torch.Tensor],
    name: BufferName,
    old: torch.Tensor | None,
    new: torch.Tensor,
    *,
    prepend: bool,
    reserve: int = 0,
) -> torch.Tensor:
    """``old`` and ``new`` along the last dimension (``new`` first with ``prepend``).

    Results are prefixes of buffers (``buffers[name]``) of at least ``reserve`` entries:
    appending within the buffer writes in place instead of allocating and copying the whole
    memory again.
    """
    n = 0 if old is None else old.shape[-1]
    m = new.shape[-1]
    base = _room(buffers, name, old, m) if old is not None else None
    if base is not None and not prepend:
        base[..., n : n + m] = new
        return base[..., : n + m]
    base = new.new_empty((*new.shape[:-1], max(n + m, reserve)))
    buffers[name] = base
    if old is None:
        base[..., :m] = new
    else:
        first, second = (new, old) if prepend else (old, new)
        base[..., : first.shape[-1]] = first
        base[..., first.shape[-1] : n + m] = second
    return base[..., : n + m]


def _drop_range(
    buffers: dict[BufferName, torch.Tensor], name: BufferName, x: torch.Tensor, start: int,
    stop: int
) -> torch.Tensor:
    """``x`` without last-dimension entries ``start:stop`` (in place within its buffer)."""
    base = _room(buffers, name, x, 0)
    if base is None:
        return torch.cat([x[..., :start], x[..., stop:]], dim=-1)
    kept = x.shape[-1] - (stop - start)
    base[..., start:kept] = x[..., stop:].clone()
    return base[..., :kept]


def _keep(
    buffers: dict[BufferName, torch.Tensor], name: BufferName, x: torch.Tensor,
    picked: torch.Tensor
) -> torch.Tensor:
    """``picked`` (a selection of ``x``'s entries) stored in ``x``'s buffer where it has one."""
    base = _room(buffers, name, x, 0)
    if base is None or picked.shape[:-1] != x.shape[:-1]:
        return picked
    base[..., : picked.shape[-1]] = picked
    return base[..., : picked.shape[-1]]


@dataclass
class Bucket:
    """One group of objects sharing keys."""

    object_ids: list[int]
    key: torch.Tensor  # (B, CK, T)
    shrinkage: torch.Tensor  # (B, 1, T)
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> (B, CV, T)
    perm_size: int = 0
    selection: torch.Tensor | None = None  # (B, CK, T - perm_size)
    use_count: torch.Tensor | None = None  # (B, T - perm_size)
    life_count: torch.Tensor | None = None  # (B, T - perm_size)
    buffers: dict[BufferName, torch.Tensor] = field(default_factory=dict, repr=False)
    """The reserved buffers the tensors above are prefixes of (see ``KeyValueStore.reserve``)."""

    @property
    def size(self) -> int:
        return self.key.shape[-1]

    @property
    def non_perm_size(self) -> int:
        return self.size - self.perm_size


@dataclass
class MemorySlice:
    """A range of a bucket's temporary tokens (views, not copies)."""

    key: torch.Tensor  # (B, CK, M)
    shrinkage: torch.Tensor  # (B, 1, M)
    selection: torch.Tensor | None  # (B, CK, M)
    values: dict[int, torch.Tensor]  # id -> (B, CV, M)
    usage: torch.Tensor | None  # (B, M), use count / life count


class KeyValueStore:
    """Buckets of keys and per-object values (working or long-term memory).

    ``save_selection`` keeps the query-selection of temporary tokens (needed to consolidate them);
    ``save_usage`` keeps use/life counters of temporary tokens.
    """

    def __init__(self, *, save_selection: bool = False, save_usage: bool = False) -> None:
        self.save_selection = save_selection
        self.save_usage = save_usage
        self.buckets: dict[int, Bucket] = {}
        self.reserve = 0
        """Tokens to reserve per bucket buffer (the most the owner will keep): memory then
        grows in place up to this size instead of being reallocated as it fills."""
        self._next_bucket_id = 0  # never reused, even after buckets are removed

    # ------------------------------------------------------------------ queries
    def engaged(self, bucket_id: int | None = None) -> bool:
        if bucket_id is None:
            return len(self.buckets) > 0
        return bucket_id in self.buckets

    def size(self, bucket_id: int) -> int:
        bucket = self.buckets.get(bucket_id)
        return 0 if bucket is None else bucket.size

    def perm_size(self, bucket_id: int) -> int:
        bucket = self.buckets.get(bucket_id)
        return 0 if bucket is None else bucket.perm_size

    def non_perm_size(self, bucket_id: int) -> int:
        return self.size(bucket_id) - self.perm_size(bucket_id)

    def bucket_of(self, obj: int) -> int | None:
        for bucket_id, bucket in self.buckets.items():
            if obj in bucket.object_ids:
                return bucket_id
        return None

    @property
    def object_ids(self) -> list[int]:
        return [obj for bucket in self.buckets.values() for obj in bucket.object_ids]

    def get_usage(self, bucket_id: int) -> torch.Tensor:
        """Normalised usage (use count / life count) of the temporary tokens, (B, T - perm)."""
        if not self.save_usage:
            raise RuntimeError("this store does not count usage")
        bucket = self.buckets[bucket_id]
        if bucket.use_count is None or bucket.life_count is None:
            return bucket.key.new_zeros((bucket.key.shape[0], 0))
        return bucket.use_count / bucket.life_count

    # ------------------------------------------------------------------ writes
    def add(
        self,
        key: torch.Tensor,
        values: dict[int, torch.Tensor],
        shrinkage: torch.Tensor,
        selection: torch.Tensor | None = None,
        *,
        bucket_id: int | None = None,
        permanence: Permanence = "no",
    ) -> None:
        """Add ``N`` tokens.

        key: (B, CK, N); values: id -> (B, CV, N); shrinkage: (B, 1, N); selection: (B, CK, N).

        Without ``bucket_id``, tracked objects extend their bucket and all untracked objects
        together form one new bucket; every touched bucket receives the key. With ``bucket_id``
        (long-term memory mirroring a working bucket) everything goes to that bucket.
        ``permanence``: ``"no"`` temporary; ``"first"`` permanent only for a bucket that has no
        permanent tokens yet; ``"all"`` permanent.
        """
        if key.ndim != 3 or shrinkage.ndim != 3:
            raise ValueError("key and shrinkage must be (B, C, N)")
        if self.save_selection and selection is None and permanence != "all":
            raise ValueError("this store keeps the selection of temporary tokens; pass it")
        bs, num_new = key.shape[0], key.shape[-1]

        touched: list[int] = []
        created: set[int] = set()
        if bucket_id is not None:
            if bucket_id not in self.buckets:
                self.buckets[bucket_id] = Bucket(list(values), key[..., :0], shrinkage[..., :0])
                created.add(bucket_id)
                self._next_bucket_id = max(self._next_bucket_id, bucket_id + 1)
            touched.append(bucket_id)
        else:
            new_bucket: int | None = None
            for obj in values:
                owner = self.bucket_of(obj)
                if owner is None:
                    if new_bucket is None:
                        new_bucket = self._next_bucket_id
                        self._next_bucket_id += 1
                        self.buckets[new_bucket] = Bucket([], key[..., :0], shrinkage[..., :0])
                        created.add(new_bucket)
                        touched.append(new_bucket)
                    self.buckets[new_bucket].object_ids.append(obj)
                elif owner not in touched:
                    touched.append(owner)

        for bid in touched:
            bucket = self.buckets[bid]
            as_perm = permanence == "all" or (permanence == "first" and bucket.perm_size == 0)
            # A fresh bucket holds nothing yet: plain assignment keeps the incoming layout.
            fresh = bid in created
            r, buf = self.reserve, bucket.buffers
            bucket.key = _cat(
                buf, "key", None if fresh else bucket.key, key, prepend=as_perm, reserve=r
            )
            bucket.shrinkage = _cat(
                buf, "shrinkage", None if fresh else bucket.shrinkage, shrinkage,
                prepend=as_perm, reserve=r,
            )
            for obj in bucket.object_ids:
                if obj in values:
                    bucket.values[obj] = _cat(
                        buf, ("value", obj), bucket.values.get(obj), values[obj],
                        prepend=as_perm, reserve=r,
                    )
            if as_perm:
                bucket.perm_size += num_new
                continue
            if self.save_selection:
                bucket.selection = _cat(
                    buf, "selection", bucket.selection, selection, prepend=False, reserve=r
                )
            if self.save_usage:
                count = torch.zeros((bs, num_new), device=key.device, dtype=torch.float32)
                life = torch.zeros((bs, num_new), device=key.device, dtype=torch.float32) + 1e-7
                bucket.use_count = _cat(
                    buf, "use", bucket.use_count, count, prepend=False, reserve=r
                )
                bucket.life_count = _cat(
                    buf, "life", bucket.life_count, life, prepend=False, reserve=r
                )

    def update_usage(self, bucket_id: int, usage: torch.Tensor) -> None:
        """Add a read's usage (B, T) over all tokens; every temporary token ages by one read."""
        if not self.save_usage:
            return
        bucket = self.buckets[bucket_id]
        usage = usage[:, bucket.perm_size :]
        if usage.shape[-1] == 0 or bucket.use_count is None or bucket.life_count is None:
            return
        bucket.use_count += usage.view_as(bucket.use_count)
        bucket.life_count += 1

    def slice_temporary(self, bucket_id: int, start: int, end: int) -> MemorySlice:
        """Temporary tokens ``start:end`` (``end <= 0`` counts from the end; 0 = to the end)."""
        if start < 0 or end > 0:
            raise ValueError(f"need start >= 0 and end <= 0, got {start}, {end}")
        bucket = self.buckets[bucket_id]
        p = bucket.perm_size
        stop = bucket.size if end == 0 else bucket.size + end
        t_stop = stop - p
        usage = self.get_usage(bucket_id)[:, start:t_stop] if self.save_usage else None
        selection = bucket.selection[..., start:t_stop] if bucket.selection is not None else None
        return MemorySlice(
            key=bucket.key[..., p + start : stop],
            shrinkage=bucket.shrinkage[..., p + start : stop],
            selection=selection,
            values={obj: v[..., p + start : stop] for obj, v in bucket.values.items()},
            usage=usage,
        )

    def sieve_by_range(self, bucket_id: int, start: int, end: int, *, min_size: int) -> None:
        """Drop temporary tokens ``start:end`` (as in ``slice_temporary``); buckets with at most
        ``min_size`` temporary tokens are left alone."""
        if start < 0 or end > 0:
            raise ValueError(f"need start >= 0 and end <= 0, got {start}, {end}")
        bucket = self.buckets[bucket_id]
        if bucket.non_perm_size <= min_size:
            return
        p = bucket.perm_size
        stop = bucket.size if end == 0 else bucket.size + end
        buf = bucket.buffers
        bucket.key = _drop_range(buf, "key", bucket.key, p + start, stop)
        bucket.shrinkage = _drop_range(buf, "shrinkage", bucket.shrinkage, p + start, stop)
        bucket.values = {
            obj: _drop_range(buf, ("value", obj), v, p + start, stop)
            for obj, v in bucket.values.items()
        }
        if bucket.selection is not None:
            bucket.selection = _drop_range(buf, "selection", bucket.selection, start, stop - p)
        if bucket.use_count is not None and bucket.life_count is not None:
            bucket.use_count = _drop_range(buf, "use", bucket.use_count, start, stop - p)
            bucket.life_count = _drop_range(buf, "life", bucket.life_count, start, stop - p)

    def remove_old(self, bucket_id: int, max_len: int) -> None:
        """First in, first out: keep at most the newest ``max_len`` temporary tokens."""
        self.sieve_by_range(bucket_id, 0, -max_len, min_size=max_len)

    def remove_obsolete(self, bucket_id: int, keep: int) -> torch.Tensor:
        """Keep the ``keep`` most used tokens (in descending usage); return their indices (B, keep).

        Only for stores without permanent tokens (long-term memory). Without usage counters the
        newest ``keep`` tokens survive.
        """
        bucket = self.buckets[bucket_id]
        if bucket.perm_size != 0:
            raise ValueError("remove_obsolete needs a bucket without permanent tokens")
        bs = bucket.key.shape[0]
        keep = min(keep, bucket.size)
        if self.save_usage:
            usage = self.get_usage(bucket_id)
            survivors = torch.stack(
                [torch.topk(usage[bi], k=keep).indices.flatten() for bi in range(bs)], dim=0
            )  # (B, keep)
        else:
            newest = torch.arange(bucket.size - keep, bucket.size, device=bucket.key.device)
            survivors = newest.unsqueeze(0).expand(bs, -1)  # (B, keep)

        def pick(x: torch.Tensor) -> torch.Tensor:
            # x: (B, C, T) -> (B, C, keep)
            return torch.stack([x[bi, :, survivors[bi]] for bi in range(bs)], dim=0)

        def pick_flat(x: torch.Tensor) -> torch.Tensor:
            # x: (B, T) -> (B, keep)
            return torch.stack([x[bi, survivors[bi]] for bi in range(bs)], dim=0)

        buf = bucket.buffers
        bucket.key = _keep(buf, "key", bucket.key, pick(bucket.key))
        bucket.shrinkage = _keep(buf, "shrinkage", bucket.shrinkage, pick(bucket.shrinkage))
        if bucket.selection is not None:
            bucket.selection = _keep(buf, "selection", bucket.selection, pick(bucket.selection))
        bucket.values = {
            obj: _keep(buf, ("value", obj), v, pick(v)) for obj, v in bucket.values.items()
        }
        if bucket.use_count is not None and bucket.life_count is not None:
            bucket.use_count = _keep(buf, "use", bucket.use_count, pick_flat(bucket.use_count))
            bucket.life_count = _keep(
                buf, "life", bucket.life_count, pick_flat(bucket.life_count)
            )
        return survivors

    def purge_except(self, keep_ids: list[int]) -> None:
        """Forget every object not in ``keep_ids``; drop buckets left without objects."""
        keep = set(keep_ids)
        for bucket_id in list(self.buckets):
            bucket = self.buckets[bucket_id]
            bucket.object_ids = [obj for obj in bucket.object_ids if obj in keep]
            bucket.values = {obj: v for obj, v in bucket.values.items() if obj in keep}
            for name in [n for n in bucket.buffers if isinstance(n, tuple) and n[1] not in keep]:
                del bucket.buffers[name]
            if not bucket.object_ids:
                del self.buckets[bucket_id]

    def clear_temporary(self) -> None:
        """Drop every temporary token."""
        for bucket_id in self.buckets:
            self.sieve_by_range(bucket_id, 0, 0, min_size=0)
