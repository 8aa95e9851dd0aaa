"""Keep the process's resident memory as bounded as its live tensors.

Tensors whose sizes change as memory fills (the long-term memory grows for its first ~2,000
frames) leave holes in glibc's heap that later, larger tensors do not fit in, so the process's
resident memory creeps up although the live tensors stay bounded. Two remedies, both no-ops
where the C library is not glibc (macOS, Windows, musl):

* :func:`release_freed_memory` asks glibc to return free heap pages (``malloc_trim``); the
  engine calls it after each memorised frame.
* :func:`fix_mmap_threshold` makes every allocation of at least ``threshold`` bytes its own
  memory mapping, returned to the system when freed, and switches glibc's dynamic threshold
  off. The dynamic rule starts at 128 KiB and raises the threshold as large blocks are freed,
  so the same tensor sizes change home (mapping, then heap) while the memory grows: the peak of
  a long run crept up 12 % from frame 1,000 to 5,000 (``benchmarks/memory_long_video.py
  --network fake --size 240x432``). The engine fixes it at 32 MiB (:data:`HEAP_THRESHOLD`,
  glibc's largest) with the heap's trim threshold at 64 MiB: peaks 317.7 / 313.2 MiB at 1,000 /
  5,000 frames (ratio 1.014). The threshold was 4 MiB before (the peak of a 2,600-frame run
  grew 3 % after frame 1,000), but every fresh mapping costs a page fault per 4 KiB page on
  first touch, and the network's activations (tens of MiB at 480p, the same sizes every frame)
  paid it on every frame: ``benchmarks/speed.py --models cutie-base --objects 1 --frames 14``
  printed 435,808 faults and 1.310 s per frame with 4 MiB, 62,590 and 0.929 s with 32 MiB (same
  session); the peak RSS of that run rose from 624 to 719 MiB, the heap keeping its pages.

The heap's trim threshold is :data:`TRIM_THRESHOLD` (1 GiB), so that it is emptied only by
:func:`release_freed_memory`. At 64 MiB it handed back the pages of a frame's freed activations
whenever more than 64 MiB lay free at its top, and s3-base at 480p faulted 48,900-61,600 pages
in again every frame (bf16, ``benchmarks/speed.py --models s3-base --objects 1 --frames 14
--precision bf16``, five runs), against 14,900-17,200 now, with the same peak RSS (1,466-1,511
MiB before, 1,478-1,515 now). ``benchmarks/memory_long_video.py --network fake`` (480x864):
peaks 490.3 / 439.5 MiB at 1,000 / 3,000 frames, against 484.7 / 520.6 MiB before (peaks move
by up to 10 % between runs of the same code on the shared machine this was measured on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = [
    "HEAP_THRESHOLD",
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "fix_mmap_threshold",
    "release_freed_memory",
]

MMAP_THRESHOLD = 4 << 20
"""Allocations of this many bytes or more are memory-mapped when the threshold is fixed."""

HEAP_THRESHOLD = 32 << 20
"""glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)."""

TRIM_THRESHOLD = 1 << 30
"""Free memory the heap may keep at its top between calls of :func:`release_freed_memory`
(a frame's activations, freed at its end, are reused by the next frame)."""

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


@functools.cache
def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Memory-map every allocation of ``threshold`` bytes or more, for the whole process and
    for good (glibc's dynamic threshold is switched off). True if the C library took it.

    The heap's trim threshold is raised to :data:`TRIM_THRESHOLD`: fixing the mmap threshold
    leaves it at 128 KiB, and the heap would then hand the pages of every frame's freed
    activations back to the system as they are freed, to fault them in again on the next
    frame. Free heap pages are returned by :func:`release_freed_memory` instead, which the
    engine calls after each memorised frame."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release_freed_memory() -> bool:
    """Return free heap pages to the OS where the C library can; True if it did anything."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
