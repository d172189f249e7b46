"""Broker connectivity of the consumer: is any Kafka broker connected, and since when not.

kafka-python does not raise when the cluster goes away: ``poll`` just returns nothing while
its I/O thread reconnects with exponential backoff. :func:`broker_connected` looks at the
client's connections instead (kafka-python 3.x internals: ``KafkaConsumer._client._manager
._conns``, whose values have ``connected``, and ``KafkaConsumer._coordinator.coordinator_id``
for a consumer in a group). :class:`BrokerWatch` turns those samples into a health verdict
that only flips after ``grace_s`` of continuous absence, so a reconnect or a coordinator
move does not flap ``/healthz``, and into a backoff for the consumer loop's waits and logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: seconds without any connected broker before the consumer is reported unhealthy
BROKER_GRACE_S = 5.0
#: first and longest wait between polls while no broker is connected
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0
#: first and longest interval between "still waiting" log lines
LOG_MIN_S = 5.0
LOG_MAX_S = 60.0


def broker_connected(consumer: Any) -> bool | None:
    """Whether ``consumer`` has a live connection to a broker (and knows its group
    coordinator, if it has a group); ``None`` when this kafka-python does not expose it.

    Reads only: safe to call from the thread that polls while kafka-python's I/O thread
    connects and disconnects (the connection table is copied in one step).
    """
    try:
        conns = list(consumer._client._manager._conns.values())
        group = consumer.config.get("group_id")
        coordinator = consumer._coordinator.coordinator_id if group is not None else 0
    except (AttributeError, RuntimeError):
        return None
    if coordinator is None:
        return False
    return any(getattr(conn, "connected", False) for conn in conns)


@dataclass(frozen=True)
class BrokerState:
    """One verdict of :meth:`BrokerWatch.check`."""

    connected: bool  # a broker is connected now (True when the probe cannot tell)
    healthy: bool  # connected, or disconnected for less than the grace period
    down_for: float  # seconds since the connection was last seen (0 when connected)
    wait_s: float  # how long the loop should wait before its next poll (0 when connected)


class BrokerWatch:
    """Samples :func:`broker_connected` and keeps the time the broker was last seen.

    ``probe`` and ``clock`` are injectable for tests; by default they read ``consumer``.
    """

    def __init__(
        self,
        consumer: Any,
        grace_s: float = BROKER_GRACE_S,
        *,
        probe: Callable[[Any], bool | None] = broker_connected,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.grace_s = grace_s
        self.probe = probe
        self.clock = clock
        self.last_seen = clock()
        self.outages = 0  # outages longer than the grace period, since start
        self._in_outage = False
        self._blind_warned = False
        self._next_log = 0.0
        self._log_every = LOG_MIN_S
        self._wait = 0.0

    def check(self) -> BrokerState:
        """Sample the connection now and return the verdict."""
        now = self.clock()
        connected = self.probe(self.consumer)
        if connected is None:  # this kafka-python hides its connections: trust the polls
            if not self._blind_warned:
                log.warning(
                    "cannot read kafka-python's connection state; /healthz will not report "
                    "a broker outage (pin kafka-python 3.0.x to get it back)"
                )
                self._blind_warned = True
            connected = True
        if connected:
            down_for = now - self.last_seen
            self.last_seen = now
            if self._in_outage:
                log.info("Kafka broker connection is back after %.1f s", down_for)
                self._in_outage = False
            self._log_every = LOG_MIN_S
            self._wait = 0.0
            return BrokerState(True, True, 0.0, 0.0)
        down_for = now - self.last_seen
        healthy = down_for < self.grace_s
        if not healthy and not self._in_outage:
            self._in_outage = True
            self.outages += 1
            self._next_log = now
        self._wait = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self._wait * 2))
        return BrokerState(False, healthy, down_for, self._wait)

    def should_log(self) -> bool:
        """True at most once per (doubling, capped) interval during an outage."""
        now = self.clock()
        if not self._in_outage or now < self._next_log:
            return False
        self._next_log = now + self._log_every
        self._log_every = min(LOG_MAX_S, self._log_every * 2)
        return True
