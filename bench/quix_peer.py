"""The peer of bench/ingest.py's headline: a Quix Streams application doing the worker's state work.

One command (bench/ingest.py runs it as a subprocess; it runs alone too)::

    python bench/quix_peer.py --bootstrap HOST:PORT --topic TOPIC --records N [--recent 50]

It consumes the interaction topic from the beginning with a fresh consumer group and the
exactly-once processing guarantee, and for each interaction event (``{"user_id", "item_id",
"domain", "ts", "weight"}``, key = domain) keeps in its RocksDB state (scoped, as Quix scopes
state, by the message key: the domain):

* ``c:<item_id>``: the item's interaction count;
* ``u:<user_id>``: the user's last ``--recent`` item ids (oldest first).

It stops once ``N`` events were processed and prints one JSON line: ``records``, ``seconds``
(from the first processed event to the return of ``Application.run``: the final checkpoint,
which commits the state and the offsets in one Kafka transaction, and the close are inside),
``seconds_to_last`` (to the last event processed), ``join_s`` (``run`` called to the first
event), ``cpu_s`` (this process, all threads, same window as ``seconds``) and the Quix Streams
version. Without Quix Streams installed it prints ``{"error": ...}`` and exits 3: install the
optional extra with ``.venv/bin/pip install quixstreams`` (``pip install '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

NOT_INSTALLED = 3


def run(args: argparse.Namespace) -> dict[str, Any]:
    import quixstreams
    from quixstreams import Application

    seen = {"n": 0, "first": 0.0, "last": 0.0, "cpu_first": 0.0}
    with tempfile.TemporaryDirectory(prefix="adacode-quix-") as state_dir:
        app = Application(
            broker_address=args.bootstrap,
            consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            processing_guarantee="exactly-once",
            state_dir=state_dir,
            loglevel="WARNING",
        )
        topic = app.topic(args.topic, value_deserializer="json")
        recent_len = args.recent

        def work(value: dict[str, Any], state: Any) -> None:
            if not seen["n"]:
                seen["first"], seen["cpu_first"] = time.perf_counter(), time.process_time()
            item, user = value["item_id"], value["user_id"]
            count_key = f"c:{item}"
            state.set(count_key, state.get(count_key, 0) + 1)
            user_key = f"u:{user}"
            recent = state.get(user_key, [])
            recent.append(item)
            if len(recent) > recent_len:
                del recent[: len(recent) - recent_len]
            state.set(user_key, recent)
            seen["n"] += 1
            if seen["n"] >= args.records:
                seen["last"] = time.perf_counter()
                app.stop()

        app.dataframe(topic).update(work, stateful=True)
        called = time.perf_counter()
        app.run()
        ended, cpu_end = time.perf_counter(), time.process_time()
    first = seen["first"] or ended
    return {
        "records": seen["n"],
        "seconds": ended - first,
        "seconds_to_last": (seen["last"] or ended) - first,
        "join_s": first - called,
        "cpu_s": cpu_end - seen["cpu_first"],
        "quixstreams": quixstreams.__version__,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT of the broker")
    parser.add_argument("--topic", required=True, help="the interaction topic (full name)")
    parser.add_argument("--records", type=int, required=True, help="stop after this many")
    parser.add_argument("--recent", type=int, default=50, help="recent items kept per user")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import quixstreams  # noqa: F401
    except ImportError:
        print(
            json.dumps(
                {
                    "error": "quixstreams is not installed (optional bench extra: "
                    ".venv/bin/pip install quixstreams)"
                }
            )
        )
        return NOT_INSTALLED
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
