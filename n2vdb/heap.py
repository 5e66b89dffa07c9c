"""glibc's heap, set so that what a stage frees goes back to the system instead of piling up.

The stages allocate and free arrays of a few to a few tens of MB per batch (dequantised maps,
counts, gathers). glibc serves those above its mmap threshold with mmap and returns them on free,
but it raises that threshold to the size of each block freed (up to 32 MB), after which such arrays
come from the heap arenas, where freed space fragments and stays resident: the IoU tally's peak RSS
rose by ~100 MB from 1,000 to 4,000 images while its live allocations did not (memray: 280 vs 286 MB).
A fixed 4 MB threshold (the dynamic adjustment off) measured 120 MB lower and ~40 MB of growth, at
the same speed; 16 MB kept most of the growth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_done = False


def bound_freed_memory() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD, once per process; nothing elsewhere (another C
    library, another system) or where MALLOC_MMAP_THRESHOLD_ already sets it."""
    global _done
    if _done:
        return
    _done = True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
