"""Give freed heap memory back to the operating system.

Tensors whose sizes change as memory fills (the long-term memory grows for its first ~2,000
frames) leave holes in glibc's heap that later, larger tensors do not fit in, so the process's
resident memory creeps up although the live tensors stay bounded. ``release_freed_memory`` asks
glibc to return free heap pages (``malloc_trim``); the engine calls it after each memorised
frame. Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["release_freed_memory"]


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return free heap pages to the OS where the C library can; True if it did anything."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
