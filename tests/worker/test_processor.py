"""The batch processor on the in-memory store: counts, placeholders, dead letters, offsets.

The key property: the final state depends only on the records, not on how they
were cut into batches (what makes crash-and-replay exactly-once).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from store.memory import MemoryPartition
from store.partition import COLUMN_FAMILIES, StorePartition
from store.records import DomainCounters, ItemRecord, Popularity
from worker.core.settings import Settings
from worker.ingest.events import control_payload, interaction_payload, item_payload
from worker.ingest.processor import Processor, SourceRecord, _bounded, _Committed
from worker.state.layout import domain_counters_key, item_key

SETTINGS = Settings(embedding_dim=8, topic_prefix="t.")
ITEMS, INTER = SETTINGS.topic("items"), SETTINGS.topic("interactions")


class CountingEncoder:
    """A deterministic stand-in for MiniLM: a unit vector from the text's digest."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = (
            np.stack(
                [
                    np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8)[:8]
                    for t in texts
                ]
            ).astype(np.float32)
            + 1
        )
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _records(
    topic: str,
    payloads: list[bytes],
    partition: int = 0,
    start: int = 0,
    key: bytes | None = b"shop",
) -> list[SourceRecord]:
    """Records keyed by their domain (every event here is in "shop") unless ``key`` says."""
    return [SourceRecord(topic, partition, start + i, key, p) for i, p in enumerate(payloads)]


def _dump(store: StorePartition) -> dict[str, list[tuple[bytes, bytes]]]:
    return {cf: list(store.items(cf)) for cf in COLUMN_FAMILIES}


def _apply(store: StorePartition, proc: Processor, records: list[SourceRecord]):
    result = proc.process(records)
    store.write(result.batch)
    return result


def test_items_and_interactions_are_counted_exactly() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, CountingEncoder())
    items = _records(
        ITEMS, [item_payload(f"i{k}", "shop", 10 + k, text=f"text {k}") for k in range(5)]
    )
    inters = _records(
        INTER, [interaction_payload(f"u{k % 3}", f"i{k % 5}", "shop", 100 + k) for k in range(20)]
    )
    result = _apply(store, proc, items + inters)
    assert result.applied == {("item", "shop"): 5, ("interaction", "shop"): 20}
    c = DomainCounters.decode(store.get("meta", domain_counters_key("shop")))
    assert (c.items, c.placeholders, c.interactions, c.logged) == (5, 0, 20, 20)
    for k in range(5):
        pop = Popularity.decode(store.get("popularity", item_key("shop", f"i{k}")))
        assert pop.count == 4
        rec = ItemRecord.decode(store.get("items", item_key("shop", f"i{k}")))
        assert rec.vector().shape == (8,) and not rec.placeholder
    assert store.get_offset(ITEMS, 0) == 5 and store.get_offset(INTER, 0) == 20
    assert store.count("interactions") == 20


def test_interaction_before_item_makes_a_placeholder_that_the_item_fills() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, CountingEncoder())
    _apply(store, proc, _records(INTER, [interaction_payload("u", "late", "shop", 50)] * 3))
    rec = ItemRecord.decode(store.get("items", item_key("shop", "late")))
    assert rec.placeholder and rec.embedding == b""
    c = DomainCounters.decode(store.get("meta", domain_counters_key("shop")))
    assert (c.items, c.placeholders) == (0, 1)
    _apply(store, proc, _records(ITEMS, [item_payload("late", "shop", 60, text="hi")]))
    rec = ItemRecord.decode(store.get("items", item_key("shop", "late")))
    assert not rec.placeholder and rec.vector().shape == (8,)
    c = DomainCounters.decode(store.get("meta", domain_counters_key("shop")))
    assert (c.items, c.placeholders, c.interactions) == (1, 0, 3)
    assert Popularity.decode(store.get("popularity", item_key("shop", "late"))).count == 3


def test_bad_records_are_dead_lettered_and_their_offsets_committed() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, CountingEncoder())
    payloads = [
        interaction_payload("u", "a", "shop", 1),
        b"{broken",
        orjson.dumps({"user_id": "u", "domain": "shop", "ts": 1}),
        interaction_payload("u", "b", "shop", 2),
    ]
    result = _apply(store, proc, _records(INTER, payloads))
    assert [d.record.offset for d in result.dead] == [1, 2]
    assert "not JSON" in result.dead[0].reason and "item_id" in result.dead[1].reason
    assert result.applied["interaction", "shop"] == 2
    assert store.get_offset(INTER, 0) == 4


def test_text_only_items_without_encoder_are_dead_lettered() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, None)
    emb = [0.5] * 8
    result = _apply(
        store,
        proc,
        _records(
            ITEMS,
            [item_payload("a", "shop", 1, text="x"), item_payload("b", "shop", 1, embedding=emb)],
        ),
    )
    assert [d.record.offset for d in result.dead] == [0]
    assert "no text encoder" in result.dead[0].reason
    assert store.get("items", item_key("shop", "b")) is not None


def test_unchanged_text_is_not_encoded_again() -> None:
    store = MemoryPartition()
    enc = CountingEncoder()
    proc = Processor(store, SETTINGS, enc)
    _apply(store, proc, _records(ITEMS, [item_payload("a", "shop", 1, text="same")]))
    _apply(store, proc, _records(ITEMS, [item_payload("a", "shop", 2, text="same")], start=1))
    _apply(store, proc, _records(ITEMS, [item_payload("a", "shop", 3, text="new")], start=2))
    assert enc.calls == [["same"], ["new"]]
    rec = ItemRecord.decode(store.get("items", item_key("shop", "a")))
    assert (rec.first_seen, rec.last_seen) == (1, 3)


def test_log_retention_trims_the_oldest() -> None:
    s = Settings(embedding_dim=8, topic_prefix="t.", interaction_retention=1000)
    store = MemoryPartition()
    proc = Processor(store, s, CountingEncoder())
    for b in range(6):
        payloads = [interaction_payload("u", "i", "shop", b * 1000 + k) for k in range(400)]
        _apply(store, proc, _records(INTER, payloads, start=b * 400))
    c = DomainCounters.decode(store.get("meta", domain_counters_key("shop")))
    assert c.interactions == 2400
    assert c.logged == store.count("interactions") <= 1000 + 400
    first_key = next(store.items("interactions"))[0]
    kept_ts = int.from_bytes(first_key[-20:-12], "big")
    assert kept_ts >= 1000  # the oldest batches are gone


# --- batch boundaries do not matter --------------------------------------------------


def _stream(seed: int) -> list[SourceRecord]:
    rng = np.random.default_rng(seed)
    recs: list[SourceRecord] = []
    n_items = 12
    item_recs = [
        item_payload(f"i{k}", "shop", 5 + k, text=f"text {k % 4}")
        if k % 3
        else item_payload(f"i{k}", "shop", 5 + k, embedding=list(rng.random(8) + 0.1))
        for k in range(n_items)
    ]
    inter = [
        interaction_payload(f"u{rng.integers(5)}", f"i{rng.integers(n_items + 3)}", "shop", 10 * k)
        for k in range(60)
    ] + [b"garbage"]
    recs += _records(ITEMS, item_recs)
    recs += _records(INTER, inter, partition=1)
    return recs


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 3), st.lists(st.integers(1, 30), min_size=1, max_size=10), st.integers(0, 2**32)
)
def test_state_is_independent_of_batching_and_topic_interleaving(
    seed: int, sizes: list[int], shuffle_seed: int
) -> None:
    rnd = random.Random(shuffle_seed)
    records = _stream(seed)
    whole = MemoryPartition()
    _apply(whole, Processor(whole, SETTINGS, CountingEncoder()), records)

    # Same records, cut into batches of random sizes, items and interactions interleaved
    # differently (each partition keeps its own order, as Kafka guarantees).
    by_tp: dict[tuple[str, int], list[SourceRecord]] = {}
    for r in records:
        by_tp.setdefault((r.topic, r.partition), []).append(r)
    queues = list(by_tp.values())
    split = MemoryPartition()
    proc = Processor(split, SETTINGS, CountingEncoder())
    i = 0
    while any(queues):
        size = sizes[i % len(sizes)]
        i += 1
        batch: list[SourceRecord] = []
        for q in queues:
            take = rnd.randint(0, size)
            batch += q[:take]
            del q[:take]
        if batch:
            _apply(split, proc, batch)
    assert _dump(split) == _dump(whole)


# --- values kept between batches ------------------------------------------------------


def test_a_batch_that_was_not_written_is_not_remembered() -> None:
    """Processing a batch and dropping it (a failed write) must not leak its values into
    the next batch: replaying it gives the state of one clean pass."""
    records = _stream(1)
    head, tail = records[:40], records[40:]
    clean = MemoryPartition()
    proc = Processor(clean, SETTINGS, CountingEncoder())
    _apply(clean, proc, head)
    _apply(clean, proc, tail)

    replayed = MemoryPartition()
    proc = Processor(replayed, SETTINGS, CountingEncoder())
    _apply(replayed, proc, head)
    proc.process(tail)  # computed, never written
    proc.process(tail[:10])  # a shorter cut of the same records, never written
    _apply(replayed, proc, tail)
    assert _dump(replayed) == _dump(clean)


def test_a_long_lived_processor_equals_a_fresh_one_per_batch() -> None:
    records = _stream(2)
    kept, fresh = MemoryPartition(), MemoryPartition()
    proc = Processor(kept, SETTINGS, CountingEncoder())
    for start in range(0, len(records), 7):
        _apply(kept, proc, records[start : start + 7])
        _apply(fresh, Processor(fresh, SETTINGS, CountingEncoder()), records[start : start + 7])
    assert _dump(kept) == _dump(fresh)
    assert proc.committed.popularity  # the long-lived one did serve values from memory


def test_kafka_consumer_records_are_processed_as_they_are() -> None:
    """kafka-python's ConsumerRecord has every field of processor.Record: no copy needed."""
    from kafka.consumer.fetcher import ConsumerRecord

    records = _stream(3)
    polled = [
        ConsumerRecord(r.topic, r.partition, -1, r.offset, 0, 0, r.key, r.value, [], None, 0, 0, 0)
        for r in records
    ]
    direct, copied = MemoryPartition(), MemoryPartition()
    result = _apply(direct, Processor(direct, SETTINGS, CountingEncoder()), polled)
    _apply(copied, Processor(copied, SETTINGS, CountingEncoder()), records)
    assert _dump(direct) == _dump(copied)
    assert [d.record.offset for d in result.dead] == [60]  # the garbage record


# --- keys: events are keyed by their domain -----------------------------------------


def test_an_event_keyed_by_another_domain_or_by_none_is_dead_lettered_with_the_rule() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, CountingEncoder())
    emb = [0.5] * 8
    records = [
        SourceRecord(ITEMS, 0, 0, b"shop", item_payload("a", "shop", 1, embedding=emb)),
        SourceRecord(ITEMS, 0, 1, b"news", item_payload("b", "shop", 1, embedding=emb)),
        SourceRecord(ITEMS, 0, 2, None, item_payload("c", "shop", 1, embedding=emb)),
        SourceRecord(INTER, 0, 0, b"shop", interaction_payload("u", "a", "shop", 2)),
        SourceRecord(INTER, 0, 1, b"news", interaction_payload("u", "a", "shop", 3)),
        SourceRecord(INTER, 0, 2, None, interaction_payload("u", "a", "shop", 4)),
        SourceRecord(INTER, 0, 3, b"shop", interaction_payload("u", "a", "shop", 5)),
    ]
    result = _apply(store, proc, records)
    assert [(d.record.topic, d.record.offset) for d in result.dead] == [
        (ITEMS, 1),
        (ITEMS, 2),
        (INTER, 1),
        (INTER, 2),
    ]
    wrong, missing = result.dead[0].reason, result.dead[1].reason
    assert wrong.startswith("key 'news' is not the event's domain 'shop'")
    assert "produce it with key='shop'" in wrong and "one worker owns each domain" in wrong
    assert missing.startswith("no key") and "produce it with key='shop'" in missing
    assert result.dead[2].reason == wrong and result.dead[3].reason == missing
    assert result.key_mismatches == {ITEMS: 2, INTER: 2}
    assert result.applied == {("item", "shop"): 1, ("interaction", "shop"): 2}
    c = DomainCounters.decode(store.get("meta", domain_counters_key("shop")))
    assert (c.items, c.interactions, c.logged) == (1, 2, 2)
    assert store.get("items", item_key("shop", "b")) is None
    assert store.get_offset(ITEMS, 0) == 3 and store.get_offset(INTER, 0) == 4


def test_a_wrong_key_among_invalid_interactions_keeps_the_dead_letters_in_order() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, CountingEncoder())
    records = _records(
        INTER,
        [
            interaction_payload("u", "a", "shop", 1),
            b"{broken",
            interaction_payload("u", "a", "shop", 2),
            interaction_payload("u", "a", "shop", 3),
        ],
    )
    records[2] = SourceRecord(INTER, 0, 2, b"sho", records[2].value)
    result = _apply(store, proc, records)
    assert [d.record.offset for d in result.dead] == [1, 2]
    assert "not JSON" in result.dead[0].reason and "key 'sho'" in result.dead[1].reason
    assert result.key_mismatches == {INTER: 1}
    assert result.applied == {("interaction", "shop"): 2}


def test_a_huge_wrong_key_is_shown_cut_in_the_reason() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, CountingEncoder())
    records = _records(INTER, [interaction_payload("u", "a", "shop", 1)], key=b"k" * 100_000)
    (dead,) = _apply(store, proc, records).dead
    assert len(dead.reason) < 500 and "(100000 bytes)" in dead.reason


def test_a_control_command_is_keyed_by_its_domain_too() -> None:
    store = MemoryPartition()
    proc = Processor(store, SETTINGS, CountingEncoder())
    control = SETTINGS.topic("control")
    records = [
        SourceRecord(control, 0, 0, b"shop", control_payload("finetune", "shop")),
        SourceRecord(control, 0, 1, b"news", control_payload("finetune", "shop")),
    ]
    result = _apply(store, proc, records)
    assert result.finetune_requests == ["shop"]
    assert [d.record.offset for d in result.dead] == [1]
    assert result.key_mismatches == {control: 1}


# --- dead letters always fit ----------------------------------------------------------


def _letter(value: bytes | None, key: bytes | None = b"shop", reason: str = "bad") -> dict:
    from worker.ingest.consumer import dead_letter_payload
    from worker.ingest.processor import DeadLetter

    return orjson.loads(
        dead_letter_payload(DeadLetter(reason, SourceRecord(ITEMS, 2, 7, key, value)))
    )


def test_a_small_dead_letter_copies_the_whole_value() -> None:
    from worker.ingest.consumer import DEAD_LETTER_VALUE_BYTES

    for value in (b"{broken", b"x" * DEAD_LETTER_VALUE_BYTES):
        doc = _letter(value)
        assert doc["value"] == value.decode() and doc["value_encoding"] == "utf-8"
        assert doc["truncated"] is False and "value_sha256" not in doc and "value_bytes" not in doc
        assert (doc["topic"], doc["partition"], doc["offset"], doc["key"]) == (ITEMS, 2, 7, "shop")
    doc = _letter(b"\xff\xfe binary")
    assert (doc["value"], doc["value_encoding"]) == (b"\xff\xfe binary".hex(), "hex")
    doc = _letter(None, key=None)
    assert doc["value"] is None and doc["key"] is None and doc["truncated"] is False


def test_a_large_value_is_cut_with_its_size_and_digest() -> None:
    from worker.ingest.consumer import DEAD_LETTER_VALUE_BYTES as N

    for chars in ((N - 7) // 2, (N - 7) // 2 + 1, 1_000_000):
        # valid UTF-8 whose two-byte characters start at odd offsets: the cut splits one
        value = b'{"tt":"' + "é".encode() * chars + b'"}'
        size = len(value)
        assert size > N
        doc = _letter(value)
        assert doc["truncated"] is True and doc["value_bytes"] == size
        assert doc["value_sha256"] == hashlib.sha256(value).hexdigest()
        assert doc["value_encoding"] == "utf-8" and value.startswith(doc["value"].encode())
        assert N - 1 <= len(doc["value"].encode()) <= N
        assert (doc["topic"], doc["partition"], doc["offset"], doc["key"]) == (ITEMS, 2, 7, "shop")
    binary = b"\xff" * (N + 10)
    doc = _letter(binary)
    assert doc["truncated"] is True and doc["value_encoding"] == "hex"
    assert bytes.fromhex(doc["value"]) == binary[:N] and doc["value_bytes"] == N + 10


def test_a_huge_key_and_reason_are_cut_and_the_worst_letter_fits_a_request() -> None:
    from worker.ingest.consumer import (
        DEAD_LETTER_KEY_BYTES,
        DEAD_LETTER_MAX_BYTES,
        PRODUCER_MAX_REQUEST_BYTES,
        dead_letter_key,
        dead_letter_payload,
    )
    from worker.ingest.processor import DeadLetter

    key = b"k" * 5000
    doc = _letter(b"{}", key=key)
    assert doc["key"] == "k" * DEAD_LETTER_KEY_BYTES and doc["key_truncated"] is True
    assert doc["key_bytes"] == 5000 and doc["key_sha256"] == hashlib.sha256(key).hexdigest()
    # the worst case: every byte escaped as \u00XX, an invalid key, a reason quoting megabytes
    worst = DeadLetter(
        "\x01" * 3_000_000,
        SourceRecord("t" * 249, 2**31 - 1, 2**63 - 1, b"\xff\x01" * 500_000, b"\x01" * 3_000_000),
    )
    payload = dead_letter_payload(worst)
    assert len(payload) <= DEAD_LETTER_MAX_BYTES
    assert orjson.loads(payload)["truncated"] is True
    wrapped = len(payload) + len(dead_letter_key(worst) or b"") + 1024  # record overhead
    assert wrapped < PRODUCER_MAX_REQUEST_BYTES


def test_the_committed_cache_drops_only_its_oldest_entries_past_its_bound() -> None:
    values = {b"k%d" % i: b"v%d" % i for i in range(10)}
    _bounded(values, 10)  # at the bound: nothing goes
    assert len(values) == 10
    values[b"k3"] = b"newer"  # an update keeps its place (dicts keep first insertion)
    values.update({b"k10": b"v10", b"k11": b"v11", b"k12": b"v12"})
    _bounded(values, 10)
    assert list(values) == [b"k%d" % i for i in range(3, 13)]  # the three oldest went
    assert values[b"k3"] == b"newer"


def test_the_committed_item_keys_drop_only_their_oldest_past_their_bound() -> None:
    """Known item keys are bounded like the values: past the bound the oldest batches' keys
    go, one batch's worth at a time, never the whole set; a batch that was not written
    still forgets everything."""
    store = MemoryPartition()
    committed = _Committed(items_bound=4)
    for n in range(3):
        batch = store.batch()
        batch.set_offset("t", 0, n + 1)
        store.write(batch)
        keys = {b"i%d" % (2 * n), b"i%d" % (2 * n + 1)}
        committed.pending = ({("t", 0): n + 1}, {}, {}, keys)
        committed.settle(store)
    assert set(committed.items) == {b"i2", b"i3", b"i4", b"i5"}
    committed.pending = ({("t", 0): 9}, {}, {}, {b"i6"})  # offset 9 never written
    committed.settle(store)
    assert not committed.items
