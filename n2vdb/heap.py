"""glibc's heap, set per stage: what a stage frees goes back to the system, except the forward pass's
batch buffers, which extraction reuses.

The later stages allocate and free arrays of a few to a few tens of MB per batch (dequantised maps,
counts, gathers). glibc serves those above its mmap threshold with mmap and returns them on free,
but it raises that threshold to the size of each block freed (up to 32 MB), after which such arrays
come from the heap arenas, where freed space fragments and stays resident: the IoU tally's peak RSS
rose by ~100 MB from 1,000 to 4,000 images while its live allocations did not (memray: 280 vs 286 MB).
A fixed 4 MB threshold (the dynamic adjustment off) measured 120 MB lower and ~40 MB of growth, at
the same speed; 16 MB kept most of the growth.

Extraction is the opposite case: every batch allocates the same layer outputs (5 to 25 MB each for
AlexNet at 32 images), so under the 4 MB threshold each was mapped, zeroed page by page and unmapped
again, batch after batch: 3.2 million page faults over 2,000 images against 81,000 for a bare forward
pass, and extraction 1.21x the forward pass's time. Kept in the heap (threshold 32 MB, glibc's own
ceiling, and up to 64 MB of free heap kept at its top) they are reused: 1.05x, for ~25 MB more RSS.
What extraction kept is handed back when the next stage bounds the heap (malloc_trim): left in the
heap, it raised the IoU stage's peak by ~40 MB at 16,000 images.

Training (segmentation, classification) takes a 1 MB threshold: its arrays of 1 to 4 MB (a draw's
pairs, a block's per-step indices) otherwise stayed resident in the heap. Measured on two whole
16,000-image Broden-profile ingests run side by side, one under a fixed 1 MB threshold
(MALLOC_MMAP_THRESHOLD_), one under this module's 4 MB (which also trimmed the heap at every stage's
start, to no measurable effect): segmentation's peak 1,159 vs 1,187 MB and classification's 1,138 vs
1,185 MB, at the same CPU time; thresholds and IoU were lower too (-73 and -55 MB) but took 60% and
46% more CPU time in page faults, so they keep 4 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache

MMAP_THRESHOLD = 4 << 20
TRAINING_MMAP_THRESHOLD = 1 << 20
TRAINING_STAGES = ("segmentation", "classification")  # and their -sufficiency retraining
BATCH_MMAP_THRESHOLD, BATCH_TRIM_THRESHOLD = 32 << 20, 64 << 20
_DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


_keeping = False  # whether keep_batch_buffers() was the last policy set


@cache
def _libc():
    """glibc, or None: elsewhere (another C library, another system), or where the user's
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set the heap already."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both, or neither is used)
    except (OSError, AttributeError):
        return None
    return libc


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def bound_freed_memory(stage: str = "") -> None:
    """Fix glibc's mmap threshold (at MMAP_THRESHOLD, or TRAINING_MMAP_THRESHOLD for a STAGE of
    TRAINING_STAGES) and its trim threshold at glibc's default: for every stage but the forward pass
    (n2vdb.timings sets it as each stage starts). The free heap that keep_batch_buffers() kept goes
    back to the system."""
    global _keeping
    training = stage.startswith(TRAINING_STAGES)
    _set(TRAINING_MMAP_THRESHOLD if training else MMAP_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    if _keeping and _libc() is not None:
        _libc().malloc_trim(0)
    _keeping = False


def keep_batch_buffers() -> None:
    """Let the forward pass's per-batch outputs (up to 32 MB each) be reused from the heap."""
    global _keeping
    _set(BATCH_MMAP_THRESHOLD, BATCH_TRIM_THRESHOLD)
    _keeping = True
