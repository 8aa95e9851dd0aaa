"""The allocator settings that keep resident memory bounded on long videos."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from s3cli.inference import allocator, engine

# In a fresh process (as the CLI is): in a long-lived one the heap may already hold free blocks
# big enough for the test's arrays, which glibc then serves from the heap whatever the threshold.
_RSS = """
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20
"""

_CHILD = _RSS + """
import numpy as np
from s3cli.inference.allocator import fix_mmap_threshold

assert fix_mmap_threshold()
before = rss()
blocks = [np.ones(5 << 17) for _ in range(16)]  # 16 blocks of 5 MiB, touched
during = rss()
del blocks
after = rss()
print(before, during, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_large_blocks_leave_resident_memory() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    before, during, after = map(float, out.split())
    assert during - before > 70
    assert after - before < 8, (before, during, after)


_CHILD_HEAP = _RSS + """
import numpy as np
from s3cli.inference.allocator import HEAP_THRESHOLD, fix_mmap_threshold, release_freed_memory

assert fix_mmap_threshold(HEAP_THRESHOLD)
before = rss()
blocks = [np.ones(5 << 17) for _ in range(32)]  # 32 blocks of 5 MiB on the heap, touched
during = rss()
del blocks
kept = rss()
release_freed_memory()
after = rss()
print(before, during, kept, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_heap_keeps_freed_pages_until_released() -> None:
    """Below the engine's mmap threshold, a frame's freed activations (here 160 MiB) stay
    resident for the next frame instead of being faulted in afresh; releasing returns them."""
    out = subprocess.run([sys.executable, "-c", _CHILD_HEAP], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    before, during, kept, after = map(float, out.split())
    assert during - before > 150
    assert during - kept < 8, (before, during, kept, after)
    assert after - before < 8, (before, during, kept, after)


class _Stub(nn.Module):
    sensory_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("long_term", [True, False])
def test_engine_fixes_threshold_for_long_term_memory(monkeypatch, long_term: bool) -> None:
    calls: list[int] = []
    monkeypatch.setattr(engine, "fix_mmap_threshold", lambda t: calls.append(t))
    engine.Tracker(_Stub(), use_long_term=long_term)
    assert calls == ([allocator.HEAP_THRESHOLD] if long_term else [])
