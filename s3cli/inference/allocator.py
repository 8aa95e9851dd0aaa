"""Keep the process's resident memory as bounded as its live tensors.

Tensors whose sizes change as memory fills (the long-term memory grows for its first ~2,000
frames) leave free pages inside glibc's heap that the heap cannot hand back while live blocks
sit above them. :func:`release_freed_memory` asks glibc to return them (``malloc_trim``); the
engine calls it after each memorised frame. A no-op where the C library is not glibc (macOS,
Windows, musl).

Fixing glibc's mmap threshold low (every block of a few MiB its own mapping) also bounds the
heap, but then every large transient of every frame is mapped, faulted in and unmapped again:
at 480p that made a cutie-small frame about 25 % slower (130,000 page faults a frame against
40,000), so the engine leaves the threshold alone. With the stores' reserved buffers the
1,000- and 5,000-frame peaks are within 5 % without it (benchmarks/memory_long_video.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["release_freed_memory"]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


def release_freed_memory() -> bool:
    """Return free heap pages to the OS where the C library can; True if it did anything."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
