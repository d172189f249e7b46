"""Freed heap memory goes back to the OS (glibc's malloc_trim)."""

from __future__ import annotations

import ctypes.util
import gc
import platform
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np

from worker.core.memory import (
    GC_YOUNG_THRESHOLD,
    IDLE_COLLECT_MIN_YOUNG,
    cap_mmap_threshold,
    collect_young_garbage,
    freeze_long_lived,
    release_free_memory,
    release_if_grown,
    resident_bytes,
    space_young_collections,
    thaw,
    watch_trims,
)


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


def test_a_trim_without_growth_since_the_last_is_skipped_and_one_after_growth_returns_it() -> None:
    """The consuming thread's periodic trim: a trim walks the whole heap, a stall for the
    threads of the arena it walks, so it runs only when the resident size grew since the
    last; then it returns what the growth left behind. Every trim is told to the
    watchers with its caller and duration."""
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    if not glibc:
        assert release_if_grown(0) is False
        return
    seen: list[tuple[str, float]] = []
    unwatch = watch_trims(lambda where, seconds: seen.append((where, seconds)))
    try:
        assert release_free_memory("finetune")  # the last trim: the floor is now
        assert release_if_grown(64 << 20) is False  # no growth since: not walked again
        assert [w for w, _ in seen] == ["finetune"]
        rss = resident_bytes()
        assert rss is not None and abs(rss - _rss_mb() * (1 << 20)) < 64 << 20
        blocks = [np.ones(2000) for _ in range(30_000)]  # ~500 MB of 16 KB heap blocks
        del blocks[:-1]  # freed but kept by glibc: the resident size stays up
        before = _rss_mb()
        assert release_if_grown(64 << 20) is True
        assert before - _rss_mb() > 200, (before, _rss_mb())
        assert [w for w, _ in seen] == ["finetune", "consumer"]
        assert all(seconds >= 0.0 for _, seconds in seen)
        assert release_if_grown(64 << 20) is False  # returned: nothing grew since
    finally:
        unwatch()
    release_free_memory()
    assert len(seen) == 2  # no longer watched after unwatching


_LARGE_BLOCKS = """
import sys
import numpy as np
from worker.core.memory import cap_mmap_threshold

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

big = np.ones(3 << 20)  # a 24 MiB mapped block, freed: glibc raises its threshold to it
del big
if sys.argv[1] == "cap":
    assert cap_mmap_threshold()
blocks = [np.ones(1 << 18) for _ in range(200)]  # 200 x 2 MiB
keep = blocks[-1]
before = rss()
del blocks
print(before - rss())
"""


def _freed_mb(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _LARGE_BLOCKS, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return float(out.stdout)


def test_capped_mmap_threshold_returns_freed_large_blocks_without_a_trim() -> None:
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    if not glibc:
        assert cap_mmap_threshold() is False
        return
    # fresh processes: this one's heap already holds freed blocks that glibc would reuse
    assert _freed_mb("default") < 100  # glibc's raised threshold: 400 MB stay resident
    assert _freed_mb("cap") > 300  # fixed at 1 MiB: unmapped at once, no malloc_trim


def test_frozen_objects_are_out_of_the_collectors_reach_and_later_ones_are_not() -> None:
    """After start-up the worker freezes what it loaded: a full collection then walks only
    the objects made since (the long-lived ones no longer stall every thread). Young garbage
    of the loading is collected first, not frozen."""
    loaded = [[i] for i in range(300_000)]  # stands in for imported modules and models

    class Node:
        pass

    garbage = Node()
    garbage.self = garbage  # type: ignore[attr-defined]
    gone = weakref.ref(garbage)
    del garbage
    try:
        assert freeze_long_lived("a test") >= len(loaded)
        assert gone() is None  # collected before the freeze
        assert not any(o is loaded for o in gc.get_objects())  # frozen: not tracked
        later = [[0]]
        assert any(o is later for o in gc.get_objects())  # made after: collected as before
        cycle: list[object] = []
        cycle.append(cycle)
        ref = id(cycle)
        del cycle
        assert gc.collect() >= 1 and not any(id(o) == ref for o in gc.get_objects())
    finally:
        gc.unfreeze()


def _passes_over_batches(batches: int, size: int) -> list[int]:
    """Collector passes per generation while ``batches`` batches each make ``size`` objects
    that live until the batch ends (as a consumer batch's records and events do)."""
    before = [g["collections"] for g in gc.get_stats()]
    for _ in range(batches):
        batch = [[i] for i in range(size)]
        del batch
    return [g["collections"] - b for g, b in zip(gc.get_stats(), before, strict=True)]


def test_spaced_young_collections_keep_batch_objects_out_of_the_old_generation() -> None:
    """With CPython's default thresholds a batch's short-lived objects go through dozens of
    young passes and reach the old generation, which then gets full passes; spaced young
    passes let them die young: no full pass over 20 batches, a pass per batch at most.
    Thawing restores the thresholds found."""
    found = gc.get_threshold()
    gc.collect()
    default = _passes_over_batches(20, 20_000)
    assert default[0] >= 20 * 20_000 // found[0] // 2 and default[2] >= 1
    try:
        now = space_young_collections()
        assert now == (max(GC_YOUNG_THRESHOLD, found[0]), found[1], found[2])
        gc.collect()
        spaced = _passes_over_batches(20, 20_000)
        assert spaced[0] <= 20 and spaced[2] == 0
    finally:
        thaw()
    assert gc.get_threshold() == found


def test_an_idle_collection_frees_young_cycles_only_past_its_floor() -> None:
    """The idle consumer's pass: below the floor nothing runs; past it the young
    generation's cycles are freed now, in a pass of a few thousand objects."""
    gc.collect()
    gone: list[weakref.ref[object]] = []

    class Node:
        pass

    def cycles(n: int) -> None:
        for _ in range(n):
            node = Node()
            node.self = node  # type: ignore[attr-defined]
            gone.append(weakref.ref(node))

    enabled = gc.isenabled()
    gc.disable()  # only the passes under test run
    try:
        cycles(10)
        assert collect_young_garbage() is False  # a handful: left to the collector
        assert all(ref() is not None for ref in gone)
        cycles(IDLE_COLLECT_MIN_YOUNG)
        assert collect_young_garbage() is True
        assert all(ref() is None for ref in gone)
        assert gc.get_count()[0] < IDLE_COLLECT_MIN_YOUNG
    finally:
        if enabled:
            gc.enable()
