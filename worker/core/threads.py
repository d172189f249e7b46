"""Background threads yield the CPU to the consumer and the API.

A fine-tune, a serving-index build and the codebook bootstrap are background work: on a
machine with few cores they compete with the consumer thread and the HTTP server for the
same CPUs (an IVF build on both cores made scrapes take 50-225 ms; with the build on one
core, a scrape still waited 1-8 ms for a CPU in the 1M bench). Each such thread raises its
own nice value by ``background_nice`` when it starts (:func:`lower_priority`): Linux keeps
the nice value per thread, so the rest of the process keeps its priority, and the threads a
background thread creates afterwards (its OpenMP team) inherit it. The kernel gives a
nice-10 thread about a tenth of the CPU weight of a nice-0 one when both want the same core;
on an idle core it runs at full speed.

The nice value shares the CPUs, not the interpreter: a background loop in Python (the
codebook's sample scan) and a consumer step that gives the interpreter up at every RocksDB
read and numpy call (a code round) convoy on it, the step waiting up to a switch interval to
get it back each time (measured: rounds of 13 ms took 150-230 ms beside a scan, whatever the
scan's chunk size). :class:`Foreground` marks such latency-bound steps, and background loops
wait between their chunks while one runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

log = logging.getLogger(__name__)

MOST_NICE = 19
"""The largest nice value Linux allows."""


def lower_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment`` (capped at 19).

    Returns whether the thread's priority changed: ``increment <= 0`` or a platform without
    per-thread ``setpriority`` leaves it as it is. Lowering a priority needs no privilege;
    it cannot be raised back without one, so call it only from threads that run background
    work for the rest of their life.
    """
    if increment <= 0 or not hasattr(os, "setpriority") or not hasattr(os, "getpriority"):
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(MOST_NICE, current + increment))
    except OSError as exc:  # a sandbox may refuse it: the work runs, at the same priority
        log.debug("could not lower the priority of thread %d: %s", tid, exc)
        return False
    return True


def thread_nice() -> int:
    """The calling thread's nice value (0 where it cannot be read)."""
    if not hasattr(os, "getpriority"):
        return 0
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return 0


STEP_ASIDE_MAX_S = 0.5
"""The longest a background loop waits for the foreground between two chunks: a step that
never ends (or one that is slow for another reason) never stalls the background work, which
goes on a chunk at a time."""


class Foreground:
    """Latency-bound steps (a code round, a ``/metrics`` scrape) and the background loops
    that step aside for them.

    Steps mark themselves with :meth:`busy` (from any thread, nested or concurrent); a
    background loop calls :meth:`wait_idle` before each chunk, so it does not take the
    interpreter from a step between that step's calls. Only the chunk in progress when a
    step starts can delay it. Cheap when nothing waits: an event check.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = 0
        self._idle = threading.Event()
        self._idle.set()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a latency-bound step for as long as the block runs."""
        with self._lock:
            self._busy += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    def wait_idle(self, timeout: float = STEP_ASIDE_MAX_S) -> bool:
        """Wait until no step runs (at most ``timeout`` s); whether none does."""
        return self._idle.wait(timeout)

    @property
    def idle(self) -> bool:
        return self._idle.is_set()


def start_every_thread(executor: ThreadPoolExecutor, threads: int) -> None:
    """Start all ``threads`` threads of a fresh ``executor`` now, before any work.

    A ``ThreadPoolExecutor`` starts a thread at a submit that finds none idle, and
    ``Thread.start`` waits until the new thread runs: under load, a wait for the
    interpreter in the submitting thread (an event loop, a paced client), repeated once per
    thread while a burst piles up. Each task here waits at one barrier, so every submit
    finds no idle thread and starts one; the barrier lets them all go at the end."""
    ready = threading.Barrier(threads + 1)
    for _ in range(threads):
        executor.submit(ready.wait)
    ready.wait()
