"""Giving freed heap memory back to the operating system after large, short-lived work.

A fine-tune or an index build allocates hundreds of megabytes in a worker thread and
frees them at the end; glibc keeps much of it in that thread's malloc arena, so a
long-lived worker's resident memory would grow by a step at each round.
``malloc_trim(0)`` returns the free pages (measured: ~110 MB after a fine-tune of 24k
interactions). Elsewhere than glibc it is not available and nothing is done.

A trim is not free: it walks every free chunk of every arena, each arena's lock held, and
advises the kernel of each free page range, so a thread that allocates from the arena being
trimmed waits for it. On a fragmented heap (measured in process: 1.7 GB of 1.5 KB blocks
freed with every 20th kept) the first trim took 210 ms and every later one, with nothing new
to return, still ~24 ms. So the periodic trim of the consuming thread runs only when the
resident size has grown since the last trim (:func:`release_if_grown`), and every trim is
timed for whoever watches (:func:`watch_trims`; ``adacode_memory_trim_seconds``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_LIBC_NAME = ctypes.util.find_library("c")
try:
    _LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None
    _TRIM = _LIBC.malloc_trim if _LIBC is not None else None
    _MALLOPT = _LIBC.mallopt if _LIBC is not None else None
except (OSError, AttributeError):  # not glibc (musl, macOS): no malloc_trim, no mallopt
    _TRIM = _MALLOPT = None

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

#: allocations of this size and more get their own mapping, unmapped when freed
MMAP_THRESHOLD_BYTES = 1 << 20


#: callbacks told of every trim: ``(where, seconds)``
_TRIM_WATCHERS: list[Callable[[str, float], None]] = []
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: the lowest resident size seen since the last trim (bytes; None: no trim yet)
_rss_floor: int | None = None


def resident_bytes() -> int | None:
    """The process's resident set size in bytes (Linux ``/proc/self/statm``; None elsewhere).
    One read of a short file: cheap enough for every loop of the consumer."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory(where: str = "other") -> bool:
    """Return free heap pages to the OS; whether the platform could (glibc only).

    ``where`` names the caller for :func:`watch_trims` (``consumer``, ``finetune``,
    ``index``). ``malloc_trim`` is called through ``ctypes.CDLL``, which lets the
    interpreter go for the call: only threads allocating from the arena being trimmed
    wait."""
    global _rss_floor
    if _TRIM is None:
        return False
    started = time.perf_counter()
    _TRIM(0)
    seconds = time.perf_counter() - started
    _rss_floor = resident_bytes()
    for watcher in list(_TRIM_WATCHERS):
        watcher(where, seconds)
    return True


def release_if_grown(min_growth_bytes: int, where: str = "consumer") -> bool:
    """Trim (:func:`release_free_memory`) only when the resident size has grown by at least
    ``min_growth_bytes`` over the lowest seen since the last trim; whether it trimmed.

    Freed memory that glibc keeps shows as resident size that stays up, so growth since
    the last trim bounds what a trim could return of the work done since; with none, a
    trim would only walk the heap again (a stall for the threads of the arena it walks,
    ~24 ms a time on a fragmented heap) to return nothing. Where the resident size cannot
    be read, it trims every time."""
    global _rss_floor
    rss = resident_bytes()
    if rss is None or _rss_floor is None:
        return release_free_memory(where)
    _rss_floor = min(_rss_floor, rss)
    if rss - _rss_floor < min_growth_bytes:
        return False
    return release_free_memory(where)


def watch_trims(callback: Callable[[str, float], None]) -> Callable[[], None]:
    """Call ``callback(where, seconds)`` after every trim; returns the function that stops
    it."""
    _TRIM_WATCHERS.append(callback)
    return lambda: _TRIM_WATCHERS.remove(callback)


def cap_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``nbytes`` or more from its own mapping (glibc only).

    glibc starts at 128 KiB but raises the threshold each time such a block is freed (up to
    32 MiB), so after the first fine-tune its tensors come from the heap, and each round's
    larger peak leaves the heap fragmented a step higher. A fixed threshold also turns the
    dynamic adjustment off. Measured (``python -m bench.soak``, synthetic stream whose
    catalogue grows 3.4x in 30 min): RSS idle to idle after warm-up +24.0 % with glibc's
    default, +8.7 % with 1 MiB; peaks 1,316 vs 953 MiB; fine-tunes no slower.
    """
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, int(nbytes)))


def freeze_long_lived(what: str) -> int:
    """Move every object alive now out of the cyclic collector's reach (``gc.freeze``);
    returns how many.

    A worker holds ~500k container objects once torch, faiss, uvicorn and the encoder are
    imported, and a full collection walks them all: ~300 ms on this 2-core machine with the
    GIL held, a stall of every request and batch whenever the allocation counts trigger one
    (measured in process; ``adacode_gc_pause_seconds`` times every pass). The paced tail of
    bench/scale.py at 1M items was not the worker's collector but the bench client's own
    (a ~100 ms full pass over its objects; the client now freezes them the same way).
    Objects made at start-up (modules, the loaded model) live as long as the process, so
    they are frozen once loaded; objects made later are collected as before.
    Called after start-up, the fine-tune warm-up and the encoder's load (``what`` says which).

    The young generation is collected first (its garbage would never be collected once
    frozen); not the older ones: a full pass there, after the imports, found ~20
    unreachable objects and held the interpreter ~110 ms, and a pass over the middle one
    (up to ten young generations of :data:`GC_YOUNG_THRESHOLD` objects) held it ~100 ms
    after a restart's warm-up while the domains loaded beside it: stalls of the API the
    worker already serves. What cyclic garbage they hold then stays, once."""
    started = time.perf_counter()
    gc.collect(0)
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "froze %d long-lived objects after %s (%.0f ms): collections skip them",
        frozen,
        what,
        1000 * (time.perf_counter() - started),
    )
    return frozen


#: tracked allocations (net of deallocations) between two young-generation passes of the
#: cyclic collector; CPython's default is 700. A batch of 5,000 records makes tens of
#: thousands of objects that live until the batch ends: at 700 each batch saw ~50 young and
#: ~5 middle passes, each promoting the batch's live objects a generation up, so the old
#: generation filled with short-lived objects and got a full pass about every second
#: (measured in the daemon at 1M items: 502 full passes of 40 ms each in 6.5 minutes, 9 %
#: of the consumer's time with the other passes; a full pass walks the code assigner's
#: million-entry containers). At this threshold a batch's objects mostly die young.
GC_YOUNG_THRESHOLD = 50_000

_DEFAULT_THRESHOLDS: tuple[int, int, int] | None = None

#: young tracked objects past which an idle consumer runs the young generation's pass itself
#: (:func:`collect_young_garbage`)
IDLE_COLLECT_MIN_YOUNG = 2_000


def collect_young_garbage(min_young: int = IDLE_COLLECT_MIN_YOUNG) -> bool:
    """Run the young generation's pass now if it holds at least ``min_young`` objects;
    whether it ran.

    Called by the consuming thread when a poll brought nothing: kafka-python 3's idle poll
    leaves ~80 objects in reference cycles (futures, frames and tracebacks of the timeouts
    it raises and catches; measured: 4,144 over 50 polls), which only the collector frees.
    Left to the collector, they pile up to :data:`GC_YOUNG_THRESHOLD` and are freed in one
    pass: 58-105 ms for 22-51k objects in the daemon at 1M items, every one to two minutes, a
    stall of every request. Collected while idle, a pass frees a couple of thousand, ~3 ms.
    """
    if gc.get_count()[0] < min_young:
        return False
    gc.collect(0)
    return True


def space_young_collections(young: int = GC_YOUNG_THRESHOLD) -> tuple[int, int, int]:
    """Run the young generation's pass every ``young`` allocations (see
    :data:`GC_YOUNG_THRESHOLD`; the older generations' ratios stay); returns the thresholds
    now. :func:`thaw` restores the ones found."""
    global _DEFAULT_THRESHOLDS
    current = gc.get_threshold()
    if _DEFAULT_THRESHOLDS is None:
        _DEFAULT_THRESHOLDS = (current[0], current[1], current[2])
    gc.set_threshold(max(young, current[0]), current[1], current[2])
    found = gc.get_threshold()
    return found[0], found[1], found[2]


def thaw() -> None:
    """Undo :func:`freeze_long_lived` and :func:`space_young_collections` (a daemon that
    stops inside a longer-lived process, as in tests, leaves the collector as it found
    it)."""
    global _DEFAULT_THRESHOLDS
    gc.unfreeze()
    if _DEFAULT_THRESHOLDS is not None:
        gc.set_threshold(*_DEFAULT_THRESHOLDS)
        _DEFAULT_THRESHOLDS = None
