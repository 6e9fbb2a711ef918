"""Keep freed training memory from piling up on CPUs (glibc).

glibc raises its mmap threshold each time a large mmapped block is freed, so later activation tensors come from
the heap, and freed heap memory is rarely returned: peak RSS of a CPU training step grows by gigabytes (measured on
SmolLM2-135M, LoRA, 1,024 tokens per micro-batch: 6.0 GB -> 3.7 GB with a fixed threshold). A fixed threshold
sends large blocks straight back to the OS when freed. No effect elsewhere (macOS, musl, CUDA memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024

_done = False


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold (once per process); True when it was applied."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        _done = False
    return _done
