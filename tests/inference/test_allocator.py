"""The allocator call that keeps resident memory bounded on long videos."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh process (as the CLI is), so that the heap holds only what the child puts there.
# Blocks of 64 KiB come from the heap (below glibc's default mmap threshold); freeing every
# other one leaves 50 MiB of free pages that the heap cannot shrink past on its own.
_CHILD = """
import ctypes
from s3cli.inference.allocator import release_freed_memory

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20

before = rss()
blocks = []
for _ in range(1600):  # 1,600 blocks of 64 KiB, touched
    blocks.append(libc.malloc(64 << 10))
    ctypes.memset(blocks[-1], 1, 64 << 10)
during = rss()
for block in blocks[::2]:  # every other one: each freed block lies between two live ones
    libc.free(block)
freed = rss()
released = release_freed_memory()
after = rss()
print(before, during, freed, after, int(released))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_heap_pages_go_back_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    before, during, freed, after, released = map(float, out.split())
    assert during - before > 90  # 100 MiB were resident
    assert freed - before > 90, "freed heap blocks stay resident until trimmed"
    assert released == 1
    assert freed - after > 40, (before, during, freed, after)  # the 50 MiB went back
