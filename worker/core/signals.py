"""SIGTERM/SIGINT as a stop request, installed before anything slow is imported.

``adacode run`` installs the handlers first thing, so a signal that arrives while
torch, faiss or the store are still loading also stops the worker cleanly (exit 0,
nothing consumed), instead of killing it half-started.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


def install_stop_handlers() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT (handlers only on the main thread)."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    return stop
