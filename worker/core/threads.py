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
"""

from __future__ import annotations

import logging
import os
import threading

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
