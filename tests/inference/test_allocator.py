"""The allocator settings that keep resident memory bounded on long videos."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from s3cli.inference import engine
from s3cli.inference.allocator import fix_mmap_threshold, release_freed_memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


@glibc
def test_freed_large_blocks_leave_resident_memory() -> None:
    assert fix_mmap_threshold()
    release_freed_memory()
    before = _rss_mib()
    blocks = [np.ones(5 << 17) for _ in range(16)]  # 16 blocks of 5 MiB, touched
    during = _rss_mib()
    del blocks
    after = _rss_mib()
    assert during - before > 70
    assert after - before < 8, (before, during, after)


class _Stub(nn.Module):
    sensory_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("long_term", [True, False])
def test_engine_fixes_threshold_for_long_term_memory(monkeypatch, long_term: bool) -> None:
    calls: list[int] = []
    monkeypatch.setattr(engine, "fix_mmap_threshold", lambda: calls.append(1))
    engine.Tracker(_Stub(), use_long_term=long_term)
    assert calls == ([1] if long_term else [])
