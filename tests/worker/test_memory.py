"""Freed heap memory goes back to the OS (glibc's malloc_trim)."""

from __future__ import annotations

import ctypes.util
import platform

import numpy as np

from worker.memory import release_free_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_release_returns_freed_small_allocations_to_the_os() -> None:
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert release_free_memory() is (glibc and ctypes.util.find_library("c") is not None)
    if not glibc:
        return
    # many small blocks (below the mmap threshold) live in the heap: freeing them does not
    # shrink the process until the heap is trimmed
    blocks = [np.ones(2000) for _ in range(60_000)]  # ~1 GB of 16 KB blocks
    del blocks[:-1]  # keep the last one: the heap top stays in use, only a trim frees the rest
    before = _rss_mb()
    assert release_free_memory()
    after = _rss_mb()
    assert before - after > 300, (before, after)
