"""Logging set-up: human-readable lines by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(fmt: str = "human", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("kafka", "sentence_transformers", "transformers", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # kafka-python warns that a group-less consumer (offset look-ups) has no auto-commit
    logging.getLogger("kafka.coordinator.consumer").setLevel(logging.ERROR)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    # While a broker is away, kafka-python logs each failed connection attempt (ERROR) and
    # each metadata miss (WARNING) many times a second; the worker's own watch
    # (worker.ingest.health) reports the outage once, with its duration, and /healthz says 503.
    for chatty in ("kafka.conn", "kafka.net", "kafka.client_async", "kafka.cluster"):
        logging.getLogger(chatty).setLevel(logging.CRITICAL)
