"""The fine-tune job on the in-memory store: publish, incremental, gate, rollback lineage."""

from __future__ import annotations

import numpy as np

from quantize.table_model import Snapshot
from store.memory import MemoryPartition
from worker.events import interaction_payload, item_payload
from worker.finetune import DomainData, FineTuner
from worker.processor import Processor, SourceRecord
from worker.settings import Settings
from worker.versions import PUBLISHED, REJECTED, current_version, get_record, load_table, rollback

S = Settings(
    embedding_dim=16,
    topic_prefix="t.",
    codebook_min_items=64,
    finetune_min_interactions=50,
    finetune_epochs=12,
    code_policy="fixed",
    finetune_hidden=16,
    gate_users=30,
    gate_tolerance=0.0,
)
ITEMS, INTER = S.topic("items"), S.topic("interactions")


def _feed(
    store: MemoryPartition, proc: Processor, start_ts: int, n_users: int, seed: int, offset: int
) -> int:
    """Users walk along chains of items within a cluster: strong next-item signal."""
    rng = np.random.default_rng(seed)
    recs = []
    ts = start_ts
    for u in range(n_users):
        cluster = u % 8
        pos = int(rng.integers(0, 15))
        for _ in range(8):
            item = cluster * 15 + pos % 15
            recs.append(
                SourceRecord(
                    INTER, 0, offset, b"d", interaction_payload(f"u{u}", f"i{item}", "shop", ts)
                )
            )
            offset += 1
            ts += 1
            pos += 1
    result = proc.process(recs)
    store.write(result.batch)
    return offset


def _setup() -> tuple[MemoryPartition, Processor, int]:
    store = MemoryPartition()
    proc = Processor(store, S, None)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16))
    recs = [
        SourceRecord(
            ITEMS,
            0,
            i,
            b"d",
            item_payload(
                f"i{i}", "shop", 1, embedding=centers[i // 15] + 0.1 * rng.normal(size=16)
            ),
        )
        for i in range(120)
    ]
    store.write(proc.process(recs).batch)
    offset = _feed(store, proc, 1000, 200, 1, 0)
    return store, proc, offset


class RecordingTuner(FineTuner):
    """Records what each candidate started from; optionally breaks the candidate."""

    def __init__(self, *args: object, break_candidate: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inits: list[Snapshot | None] = []
        self.break_candidate = break_candidate

    def train_candidate(self, domain, data: DomainData, train, init, new_since):  # type: ignore[no-untyped-def]
        self.inits.append(init)
        snapshot, metrics = super().train_candidate(domain, data, train, init, new_since)
        if self.break_candidate:
            params = dict(snapshot.params)
            rng = np.random.default_rng(5)
            params["table.rows"] = rng.normal(size=params["table.rows"].shape).astype(np.float32)
            snapshot = Snapshot(snapshot.config, params)
        return snapshot, metrics


def test_first_fine_tune_publishes_and_the_next_one_is_incremental() -> None:
    store, proc, offset = _setup()
    tuner = RecordingTuner(store, S)
    first = tuner.run("shop")
    assert first.status == PUBLISHED and first.record is not None and first.record.version == 1
    assert first.record.note == "scratch" and tuner.inits == [None]
    assert first.metrics["recall@10"] > 0.2  # chains are learnable; popularity would be ~0.1
    assert current_version(store, "shop") == 1
    assert tuner.run("shop").status == "skipped"  # no new interactions since v1
    _feed(store, proc, 5000, 40, 2, offset)
    second = tuner.run("shop")
    assert (
        second.record is not None
        and second.record.parent == 1
        and second.record.note == "incremental"
    )
    v1 = load_table(store, "shop", 1).snapshot
    assert tuner.inits[-1] is not None
    np.testing.assert_array_equal(tuner.inits[-1].params["table.rows"], v1.params["table.rows"])
    # shared parts stay frozen in an incremental fine-tune
    if second.status == PUBLISHED:
        v2 = load_table(store, "shop", 2).snapshot
        for name, arr in v1.params.items():
            if not name.startswith("table."):
                np.testing.assert_array_equal(arr, v2.params[name])


def test_the_gate_rejects_a_broken_candidate_and_keeps_the_current_version() -> None:
    store, proc, offset = _setup()
    assert FineTuner(store, S).run("shop").status == PUBLISHED
    _feed(store, proc, 5000, 40, 3, offset)
    broken = RecordingTuner(store, S, break_candidate=True).run("shop")
    assert broken.status == REJECTED and broken.record is not None
    assert broken.metrics["recall@10"] < broken.metrics["current_recall@10"]
    assert current_version(store, "shop") == 1
    assert get_record(store, "shop", broken.record.version).status == REJECTED  # type: ignore[union-attr]


def test_after_a_rollback_fine_tunes_continue_from_the_rolled_back_version() -> None:
    store, proc, offset = _setup()
    tuner = RecordingTuner(store, S)
    tuner.run("shop")
    offset = _feed(store, proc, 5000, 40, 4, offset)
    tuner.settings = Settings(
        **{f: getattr(S, f) for f in S.__dataclass_fields__} | {"gate_tolerance": 1.0}
    )
    v2 = tuner.run("shop")
    assert v2.record is not None and v2.record.version == 2 and v2.status == PUBLISHED
    batch = store.batch()
    rollback(store, batch, "shop", to=1)
    store.write(batch)
    _feed(store, proc, 9000, 40, 5, offset)
    v3 = tuner.run("shop")
    assert v3.record is not None and v3.record.parent == 1
    v1 = load_table(store, "shop", 1).snapshot
    np.testing.assert_array_equal(tuner.inits[-1].params["table.rows"], v1.params["table.rows"])  # type: ignore[union-attr]
