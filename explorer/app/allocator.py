"""One heap for all of the app's threads: glibc malloc's settings for a server whose jobs run in worker threads.

Gradio runs handlers in worker threads and the app's jobs run in threads of their own. glibc gives each
such thread an arena of 64 MB heaps and hands every allocation above its mmap threshold (at most 32 MB)
to a fresh ``mmap``, so the activations and 262k-wide unembedding blocks of a trace are new pages, zeroed
by the kernel, on every pass; and each thread's arena keeps what it freed, so resident memory grows with
the number of threads. With one arena, no mmap for large blocks and trimming only above 2 GB, every thread
reuses the same freed memory. Measured in docs/performance.md (many visitors at once).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def share_one_heap() -> bool:
    """Apply SETTINGS (call before any thread starts); False where the C library is not glibc or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # musl and other C libraries without glibc's malloc
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
