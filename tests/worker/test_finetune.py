"""The fine-tune job on the in-memory store: publish, incremental, gate, rollback lineage;
the frozen text projection (trained, stored as W @ e, served for new items), warm starts
from versions without it, new domains seeded from another domain's shared init, and
borrowed codes (the trained mask stored, untrained and brand-new items served the deepest
prefix their trained relatives share, the gate scoring items as they are served)."""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace

import numpy as np
import orjson
import pytest

import worker.ingest.coding as coding
import worker.tuning.finetune as finetune_module
from quantize.evaluate import holdout_split, pad_histories, user_sequences
from quantize.table_model import Snapshot
from quantize.train import TrainResult
from store.memory import MemoryPartition
from store.records import ItemRecord
from tests.text_reference import numpy_text_part
from tests.worker.vector_reference import slow_served_rows, slow_vector
from worker.commands.inspection import stats
from worker.core.settings import Settings
from worker.ingest.coding import codes_after_round, retrain_codebook
from worker.ingest.events import control_payload, interaction_payload, item_payload
from worker.ingest.processor import BatchResult, Processor, SourceRecord
from worker.serving.index import Serving
from worker.state.layout import (
    CODEBOOK_CURRENT,
    CODEBOOK_LINEAGE,
    MIGRATE_STATE,
    UNPREFIXED_CODE_PREFIXES,
    item_key,
    namespace_prefix,
)
from worker.state.reads import (
    code_history,
    code_namespaces,
    committed_assigner,
    iter_interactions,
    load_codebook,
    load_codebook_by_id,
    stored_embeddings,
)
from worker.state.requests import pending_request
from worker.state.versions import (
    REJECTED,
    TEXT_IN,
    TEXT_PARAMS,
    TEXT_PROJ,
    VersionRecord,
    VersionTable,
    add_version,
    current_version,
    get_record,
    item_vectors,
    list_records,
    load_table,
    rollback,
)
from worker.tuning.exceptions import Abandoned, FineTuneDataError
from worker.tuning.finetune import (
    EMBEDDING_CHUNK,
    WARM_UP_LOSSES,
    Candidate,
    DomainData,
    FineTuner,
    FinetuneStatus,
    _number_users,
    fits_half,
    mapped_rows,
    read_domain,
    read_embeddings,
    read_log,
)
from worker.tuning.scheduler import behind_codebook

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
B = replace(S, code_policy="entropy", code_round_interactions=50)
"""Variable-length codes (``S`` serves every item its full path: nothing to borrow)."""


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
                    INTER, 0, offset, b"shop", interaction_payload(f"u{u}", f"i{item}", "shop", ts)
                )
            )
            offset += 1
            ts += 1
            pos += 1
    result = proc.process(recs)
    store.write(result.batch)
    return offset


def _describe(proc: Processor, domain: str, offset: int) -> int:
    """120 items of ``domain`` in 8 clusters of 15 (same embeddings in every domain)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16))
    recs = [
        SourceRecord(
            ITEMS,
            0,
            offset + i,
            domain.encode(),
            item_payload(
                f"i{i}", domain, 1, embedding=centers[i // 15] + 0.1 * rng.normal(size=16)
            ),
        )
        for i in range(120)
    ]
    proc.store.write(proc.process(recs).batch)
    return offset + len(recs)


def _setup(settings: Settings = S) -> tuple[MemoryPartition, Processor, int]:
    store = MemoryPartition()
    proc = Processor(store, settings, None)
    _describe(proc, "shop", 0)
    offset = _feed(store, proc, 1000, 200, 1, 0)
    return store, proc, offset


class RecordingTuner(FineTuner):
    """Records what each candidate started from; optionally breaks the candidate."""

    def __init__(self, *args: object, break_candidate: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inits: list[Snapshot | None] = []
        self.budgets: list[float | None] = []
        self.break_candidate = break_candidate

    def train_candidate(self, domain, data: DomainData, train, init, new_since, **kw):  # type: ignore[no-untyped-def]
        self.inits.append(init)
        self.budgets.append(kw.get("budget_s"))
        candidate = super().train_candidate(domain, data, train, init, new_since, **kw)
        if self.break_candidate:
            snapshot = candidate.snapshot
            params = dict(snapshot.params)
            rng = np.random.default_rng(5)
            params["table.rows"] = rng.normal(size=params["table.rows"].shape).astype(np.float32)
            candidate = Candidate(
                Snapshot(snapshot.config, params), candidate.metrics, candidate.trained
            )
        return candidate


def test_first_fine_tune_publishes_and_the_next_one_is_incremental() -> None:
    store, proc, offset = _setup()
    tuner = RecordingTuner(store, S)
    first = tuner.run("shop")
    assert (
        first.status is FinetuneStatus.PUBLISHED
        and first.record is not None
        and first.record.version == 1
    )
    assert first.record.note == "scratch" and tuner.inits == [None]
    assert first.metrics["recall@10"] > 0.2  # chains are learnable; popularity would be ~0.1
    assert current_version(store, "shop") == 1
    assert (
        tuner.run("shop").status is FinetuneStatus.SKIPPED_NO_NEW_DATA
    )  # no new interactions since v1
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
    if second.status is FinetuneStatus.PUBLISHED:
        v2 = load_table(store, "shop", 2).snapshot
        for name, arr in v1.params.items():
            if not name.startswith("table."):
                np.testing.assert_array_equal(arr, v2.params[name])


def test_an_incremental_fine_tune_trains_within_its_share_of_the_budget() -> None:
    """A full run trains within ``finetune_max_seconds`` less its reading; an incremental
    one within ``finetune_incremental_share`` of it (less its reading)."""
    settings = replace(S, finetune_max_seconds=100.0, finetune_incremental_share=0.3)
    store, proc, offset = _setup(settings)
    tuner = RecordingTuner(store, settings)
    assert tuner.run("shop").status is FinetuneStatus.PUBLISHED
    _feed(store, proc, 5000, 40, 2, offset)
    second = tuner.run("shop")
    assert second.record is not None and second.record.note == "incremental"
    full, incremental = tuner.budgets
    assert full is not None and incremental is not None
    assert 90.0 < full <= 100.0 and 20.0 < incremental <= 30.0


def test_the_gate_rejects_a_broken_candidate_and_keeps_the_current_version() -> None:
    store, proc, offset = _setup()
    assert FineTuner(store, S).run("shop").status is FinetuneStatus.PUBLISHED
    _feed(store, proc, 5000, 40, 3, offset)
    broken = RecordingTuner(store, S, break_candidate=True).run("shop")
    assert broken.status is FinetuneStatus.REJECTED and broken.record is not None
    assert broken.metrics["recall@10"] < broken.metrics["current_recall@10"]
    assert current_version(store, "shop") == 1
    assert get_record(store, "shop", broken.record.version).status == REJECTED  # type: ignore[union-attr]


class WatchingTuner(RecordingTuner):
    """Notes whether the run's embeddings are still alive when the version is written."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.embeddings: weakref.ref[np.ndarray] | None = None
        self.alive_at_write: list[bool] = []

    def _read(self, domain: str) -> DomainData | None:
        data = super()._read(domain)
        if data is not None:
            self.embeddings = weakref.ref(data.text)
        return data

    def _record(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert self.embeddings is not None
        self.alive_at_write.append(self.embeddings() is not None)
        return super()._record(*args, **kwargs)


@pytest.mark.parametrize("broken", [False, True])
def test_the_embeddings_are_let_go_before_the_version_is_written(broken: bool) -> None:
    store, proc, offset = _setup()
    first = WatchingTuner(store, S).run("shop")
    assert first.status is FinetuneStatus.PUBLISHED
    _feed(store, proc, 5000, 40, 3, offset)
    tuner = WatchingTuner(store, S, break_candidate=broken)
    second = tuner.run("shop")
    assert second.status is (FinetuneStatus.REJECTED if broken else FinetuneStatus.PUBLISHED)
    # every reference to the 1.5 GB-at-1M array is gone when the write begins ...
    assert tuner.alive_at_write == [False]
    # ... and the published table was projected from them before: the text part of every item
    if not broken:
        table = load_table(store, "shop", 2)
        data = read_domain(store, "shop", settings=S)
        assert data is not None and table.text_vectors is not None
        order = [table.item_ids.index(i) for i in data.item_ids]
        np.testing.assert_allclose(
            table.text_vectors[order],
            numpy_text_part(table.snapshot.params, data.text),
            rtol=1e-4,
            atol=1e-5,
        )


def test_too_little_coded_data_is_a_not_ready_skip() -> None:
    outcome = FineTuner(MemoryPartition(), S).run("shop")  # no codebook yet
    assert outcome.status is FinetuneStatus.SKIPPED_NOT_READY and outcome.status.retry
    assert outcome.reason == "0 coded interactions (< finetune_min_interactions)"


def test_a_stop_abandons_the_fine_tune_and_writes_nothing() -> None:
    store, _proc, _offset = _setup()
    stop = threading.Event()
    stop.set()
    tuner = FineTuner(store, S, stop=stop)
    outcome = tuner.run("shop")
    assert outcome.status is FinetuneStatus.ABANDONED and outcome.record is None
    assert outcome.reason == "fine-tune of 'shop' abandoned while reading: stopping"
    assert current_version(store, "shop") is None and list_records(store, "shop") == []
    assert tuner.last == {}  # /metrics keeps the last finished run


def test_after_a_rollback_fine_tunes_continue_from_the_rolled_back_version() -> None:
    store, proc, offset = _setup()
    tuner = RecordingTuner(store, S)
    tuner.run("shop")
    offset = _feed(store, proc, 5000, 40, 4, offset)
    tuner.settings = Settings(
        **{f: getattr(S, f) for f in S.__dataclass_fields__} | {"gate_tolerance": 1.0}
    )
    v2 = tuner.run("shop")
    assert (
        v2.record is not None and v2.record.version == 2 and v2.status is FinetuneStatus.PUBLISHED
    )
    batch = store.batch()
    rollback(store, batch, "shop", to=1)
    store.write(batch)
    _feed(store, proc, 9000, 40, 5, offset)
    v3 = tuner.run("shop")
    assert v3.record is not None and v3.record.parent == 1
    v1 = load_table(store, "shop", 1).snapshot
    np.testing.assert_array_equal(tuner.inits[-1].params["table.rows"], v1.params["table.rows"])  # type: ignore[union-attr]


def test_fine_tunes_project_the_embeddings_and_serving_vectors_an_unseen_item() -> None:
    store, proc, _ = _setup()
    outcome = FineTuner(store, S).run("shop")
    assert outcome.status is FinetuneStatus.PUBLISHED and outcome.metrics["recall@10"] > 0.2
    table = load_table(store, "shop", 1)
    snapshot = table.snapshot
    assert snapshot.config.text_dim == S.embedding_dim
    assert snapshot.config.text_hidden == S.finetune_text_hidden > 0  # the text adaptor
    assert snapshot.params[TEXT_PROJ].shape == (S.finetune_hidden, S.finetune_text_hidden)
    # the version keeps the text parts of the embeddings it was trained on (read from the
    # store and held in float16: read_embeddings' rule)
    found = stored_embeddings(store, "shop", table.item_ids)
    emb = np.stack([found[k] for k in table.item_ids])
    held = emb.astype(np.float16).astype(np.float32)
    assert not np.array_equal(held, emb)  # the rounding is visible: the reference sees it
    assert table.text_vectors is not None
    np.testing.assert_allclose(
        table.text_vectors, numpy_text_part(snapshot.params, held), rtol=1e-5, atol=1e-5
    )
    serving = Serving(store, S)
    assert serving.refresh() == ["shop"]
    index = serving.index("shop")
    assert table.trained is not None and table.trained[table.item_ids.index("i42")]
    np.testing.assert_allclose(
        index.vector("i42"),
        slow_vector(
            snapshot,
            table.item_rows[table.item_ids.index("i42")],
            held[table.item_ids.index("i42")],
        ),
        rtol=1e-4,
        atol=1e-5,
    )
    # an unseen item, coded in the batch that describes it, served from rows + W @ e
    new_emb = np.random.default_rng(11).normal(size=16)
    result = proc.process(
        [
            SourceRecord(
                ITEMS, 0, 10_000, b"shop", item_payload("newbie", "shop", 99, embedding=new_emb)
            )
        ]
    )
    store.write(result.batch)
    serving.on_applied(result)
    codes = proc.codes
    assigner = None if codes is None else codes.assigner("shop")
    assert assigner is not None and serving.builds == 1  # no rebuild, no training
    rows = _slow_new_item_rows(table, assigner, "newbie")
    np.testing.assert_allclose(
        index.vector("newbie"),
        slow_vector(snapshot, rows, new_emb.astype(np.float32)),
        rtol=1e-4,
        atol=1e-5,
    )


def _item(
    proc: Processor, store: MemoryPartition, item_id: str, offset: int, seed: int
) -> tuple[np.ndarray, BatchResult]:
    """One new item of ``shop`` through the processor; (its embedding, the batch result)."""
    emb = np.random.default_rng(seed).normal(size=16)
    result = proc.process(
        [SourceRecord(ITEMS, 0, offset, b"shop", item_payload(item_id, "shop", 99, embedding=emb))]
    )
    store.write(result.batch)
    return emb.astype(np.float32), result


def test_after_a_codebook_retrain_old_versions_serve_as_before_and_a_rollback_back_to_them() -> (
    None
):
    """``adacode codebook train`` codes every item with a new codebook in its own namespace
    and keeps the old codebook's codes, fed by every batch, while a published version was
    trained on it: that version goes on serving its items as before, and items that come
    later with the old codebook's codes; the next fine-tune (requested by the retrain)
    trains the new codes from the version's shared parts with fresh rows; a rollback to the
    old version then serves what a fresh build of it serves, from the cache at once."""
    settings = replace(S, gate_tolerance=1.0)
    store, _, offset = _setup(settings)
    tuner = RecordingTuner(store, settings)
    first = tuner.run("shop")
    assert first.status is FinetuneStatus.PUBLISHED and first.record is not None
    old = load_codebook(store)
    assert old is not None and first.record.codebook_id == old.codebook_id
    before = Serving(store, settings)
    before.refresh()
    own = ("i3", "i42", "i117")
    served = {k: before.index("shop").vector(k) for k in own}

    codebook, recoded = retrain_codebook(store, settings, seed=7)
    new_ns = namespace_prefix(codebook.codebook_id)
    assert codebook.codebook_id != old.codebook_id and recoded == 120
    assert code_namespaces(store) == {old.codebook_id: b"", codebook.codebook_id: new_ns}
    assert stats(store)["codebook"]["kept"] == {old.codebook_id: ["shop@1"]}
    request = pending_request(store, "shop")
    assert request is not None and codebook.codebook_id in request.source

    serving = Serving(store, settings)  # a restarted worker
    serving.refresh()
    index = serving.index("shop")
    assert index.foreign_codes is None and index.codebook_id == old.codebook_id
    for k, vector in served.items():
        np.testing.assert_array_equal(index.vector(k), vector)
    proc = Processor(store, settings, None)
    assert proc.kept is not None and list(proc.kept.services) == [old.codebook_id]
    emb, result = _item(proc, store, "later", offset, 11)
    assert result.coding.changes and result.kept_coding[old.codebook_id].changes
    current, kept = committed_assigner(store, "shop"), committed_assigner(store, "shop", ns=b"")
    assert current is not None and kept is not None
    assert current.full_path("later") == tuple(codebook.encode(emb[None])[0])
    assert kept.full_path("later") == tuple(old.encode(emb[None])[0])
    serving.on_applied(result)
    rebuilt = Serving(store, settings)
    rebuilt.refresh()
    np.testing.assert_allclose(
        index.vector("later"), rebuilt.index("shop").vector("later"), rtol=1e-5, atol=1e-6
    )

    second = tuner.run("shop")
    assert second.status is FinetuneStatus.PUBLISHED and second.record is not None
    assert second.record.note.startswith(f"scratch (v1 was trained on codebook {old.codebook_id}")
    assert second.record.parent == 1 and second.record.codebook_id == codebook.codebook_id
    init = tuner.inits[-1]
    v1 = load_table(store, "shop", 1).snapshot
    assert init is not None
    for name, arr in v1.params.items():
        if not name.startswith("table."):
            np.testing.assert_array_equal(init.params[name], arr)
    # the rows start fitted to the items' code vectors in v1 (the items that moved together)
    data = read_domain(store, "shop", settings=settings)
    assert data is not None
    fit = mapped_rows(load_table(store, "shop", 1), data)
    np.testing.assert_array_equal(init.params["table.rows"], fit.rows)
    assert fit.fitted.all() and fit.error_after < 0.2 * fit.error_before
    assert second.metrics["train_interactions"] == first.metrics["train_interactions"]
    serving.refresh()
    fresh = serving.index("shop")
    assert fresh.version == 2 and fresh.codebook_id == codebook.codebook_id
    assert fresh.vector("later").shape == (settings.finetune_hidden,)
    _, result = _item(proc, store, "after", offset + 1, 12)  # v1 is cached meanwhile
    assert old.codebook_id in result.kept_coding  # v1 is still published: its codes are kept
    serving.on_applied(result)

    batch = store.batch()
    rollback(store, batch, "shop", to=1)
    store.write(batch)
    hits = serving.cache_hits
    assert serving.refresh() == ["shop"] and serving.cache_hits == hits + 1
    back = serving.index("shop")
    assert back.version == 1 and back.foreign_codes is None
    rebuilt = Serving(store, settings)
    rebuilt.refresh()
    built = rebuilt.index("shop")
    assert built.version == 1 and len(built) == len(back) == 122
    for k in own:
        np.testing.assert_array_equal(back.vector(k), served[k])
    for k in (*own, "later", "after"):
        np.testing.assert_allclose(back.vector(k), built.vector(k), rtol=1e-5, atol=1e-6)


def test_an_old_codebooks_codes_go_once_no_published_version_was_trained_on_it() -> None:
    """The old codebook's codes are kept while v1 is published; once v1 expires (the
    version of the new codebook published, ``versions_keep`` 1), the next batch deletes
    them, and the codebook with them; the code history stays."""
    settings = replace(S, gate_tolerance=1.0, versions_keep=1)
    store, _, offset = _setup(settings)
    tuner = RecordingTuner(store, settings)
    assert tuner.run("shop").status is FinetuneStatus.PUBLISHED
    old = load_codebook(store)
    assert old is not None
    codebook, _ = retrain_codebook(store, settings, seed=7)
    proc = Processor(store, settings, None)
    assert proc.kept is not None
    offset = _feed(store, proc, 5000, 40, 6, offset)
    proc.kept.versions_moved()  # as the daemon does after a publish or a rollback
    offset = _feed(store, proc, 6000, 10, 7, offset)
    assert old.codebook_id in code_namespaces(store)  # v1 is published: kept
    assert store.count("codes", prefix=b"row\x00") == 120

    second = tuner.run("shop")
    assert second.status is FinetuneStatus.PUBLISHED
    assert get_record(store, "shop", 1).status == "expired"  # type: ignore[union-attr]
    _feed(store, proc, 7000, 10, 8, offset)
    assert old.codebook_id in code_namespaces(store)  # nobody said that versions moved
    proc.kept.versions_moved()
    _item(proc, store, "later", offset + 100, 3)
    assert code_namespaces(store) == {codebook.codebook_id: namespace_prefix(codebook.codebook_id)}
    assert proc.kept.services == {} and load_codebook_by_id(store, old.codebook_id) is None
    assert stats(store)["codebook"]["kept"] == {}
    for prefix in UNPREFIXED_CODE_PREFIXES:
        assert store.count("codes", prefix=prefix) == 0
    assert [h["reason"] for h in code_history(store, "shop", "i7")][:2] == ["new", "recode"]
    again = Processor(store, settings, None)
    assert again.kept is not None and again.kept.services == {}


@pytest.mark.parametrize("chunk", [50, coding.CATCH_UP_ITEMS])
def test_a_live_migration_serves_the_old_codes_until_a_version_of_the_new_codebook(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """``migrate`` with a published version: after the cut-over the version goes on being
    served, with the old codebook's codes for new items (kept: the version uses them);
    fine-tunes wait while the catch-up codes the items (over several batches, or within
    the cut-over's own), then the request it leaves trains a version of the new codebook,
    gated against the old one."""
    monkeypatch.setattr(coding, "CATCH_UP_ITEMS", chunk)
    settings = replace(S, gate_tolerance=1.0)
    store, proc, offset = _setup(settings)
    tuner = RecordingTuner(store, settings)
    assert tuner.run("shop").status is FinetuneStatus.PUBLISHED
    old = load_codebook(store)
    assert old is not None
    serving = Serving(store, settings)
    serving.refresh()
    control = SourceRecord(S.topic("control"), 0, 0, b"", control_payload("migrate", ""))
    result = proc.process([control])
    store.write(result.batch)
    emb, result = _item(proc, store, "later", offset, 11)  # the cut-over batch
    new = load_codebook(store)
    assert new is not None and new != old and result.coding.trained == new.codebook_id
    assert proc.kept is not None and list(proc.kept.services) == [old.codebook_id]
    assert result.kept_coding[old.codebook_id].changes  # "later" in the old codes too
    serving.on_applied(result)
    index = serving.index("shop")
    assert index.version == 1 and index.codebook_id == old.codebook_id
    kept = committed_assigner(store, "shop", ns=b"")
    assert kept is not None and kept.full_path("later") == tuple(old.encode(emb[None])[0])
    assert index.vector("later").shape == (settings.finetune_hidden,)

    if chunk < 121:  # the catch-up codes ``chunk`` items a batch: not every item yet
        waiting = tuner.run("shop")
        assert waiting.status is FinetuneStatus.SKIPPED_NOT_READY and "migration" in waiting.reason
        assert behind_codebook(store) == []  # the scheduler queues nothing yet
    n = 0
    while proc.background_work():
        result = proc.process([])
        store.write(result.batch)
        serving.on_applied(result)
        n += 1
    assert (n >= 2 if chunk < 121 else n == 0) and store.get("meta", MIGRATE_STATE) is None
    assert result.coding.migrated == new.codebook_id  # the batch that ended the catch-up
    assert behind_codebook(store) == ["shop"]  # what the scheduler queues then
    second = tuner.run("shop")
    assert second.status is FinetuneStatus.PUBLISHED and second.record is not None
    assert second.record.codebook_id == new.codebook_id
    assert second.record.note.startswith(f"scratch (v1 was trained on codebook {old.codebook_id}")
    assert behind_codebook(store) == []
    serving.refresh()
    fresh = serving.index("shop")
    assert fresh.version == 2 and fresh.codebook_id == new.codebook_id
    assert len(fresh) == 121 and fresh.vector("later").shape == (settings.finetune_hidden,)


@pytest.mark.parametrize(
    "before",
    [{"finetune_text_projection": False}, {"finetune_text_hidden": 0}],
    ids=["no text map", "a linear map"],
)
def test_a_warm_start_from_a_version_of_another_text_map(before: dict[str, object]) -> None:
    """A version without text projection, or with the linear map of the builds before the
    text adaptor: the next run starts from it with ``W = 0`` (so it starts as that version)
    and learns the adaptor on the whole log; the run after is incremental again."""
    store, proc, offset = _setup()
    old = RecordingTuner(store, replace(S, **before))  # type: ignore[arg-type]
    assert old.run("shop").status is FinetuneStatus.PUBLISHED
    v1 = load_table(store, "shop", 1).snapshot
    assert TEXT_IN not in v1.params
    offset = _feed(store, proc, 5000, 40, 6, offset)
    tuner = RecordingTuner(store, replace(S, gate_tolerance=1.0))
    start = tuner.start_params(v1)
    width = (S.finetune_hidden, S.finetune_text_hidden)
    np.testing.assert_array_equal(start[TEXT_PROJ], np.zeros(width))  # starts as v1
    assert TEXT_IN not in start  # the adaptor's layer starts as drawn
    second = tuner.run("shop")
    assert second.status is FinetuneStatus.PUBLISHED and second.record is not None
    assert second.record.parent == 1
    assert second.record.note.startswith("full log (v1's text map has another shape")
    assert tuner.inits[-1] is not None
    np.testing.assert_array_equal(tuner.inits[-1].params["table.rows"], v1.params["table.rows"])
    v2 = load_table(store, "shop", 2).snapshot
    assert v2.config.text_dim == S.embedding_dim
    assert v2.config.text_hidden == S.finetune_text_hidden
    assert np.abs(v2.params[TEXT_PROJ]).max() > 0  # the map was learned from zero
    for name, arr in v1.params.items():
        if not name.startswith("table."):
            np.testing.assert_array_equal(arr, v2.params[name])  # shared parts frozen
    # the same map from now on: the next run is incremental and starts from v2's map
    kept = tuner.start_params(v2)
    for name in TEXT_PARAMS:
        np.testing.assert_array_equal(kept[name], v2.params[name])
    _feed(store, proc, 9000, 40, 7, offset)
    third = tuner.run("shop")
    assert third.record is not None and third.record.note == "incremental"
    # both versions are served, back and forth
    serving = Serving(store, S)
    assert serving.refresh() == ["shop"] and serving.index("shop").text_dim == S.embedding_dim
    batch = store.batch()
    rollback(store, batch, "shop", to=1)
    store.write(batch)
    assert serving.refresh() == ["shop"]
    assert serving.index("shop").text_dim == (S.embedding_dim if v1.config.text_dim else 0)
    table = load_table(store, "shop", 1)
    np.testing.assert_allclose(
        serving.index("shop").vector("i42"),
        item_vectors(table)[table.item_ids.index("i42")],
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_new_domain_starts_from_the_shared_init_of_another_domain() -> None:
    store, proc, _ = _setup()
    assert FineTuner(store, S).run("shop").status is FinetuneStatus.PUBLISHED
    codebook = load_codebook(store)
    assert codebook is not None
    level_rows = codebook.levels * codebook.k
    # shop's current version has disambiguation rows of its own beyond the level rows
    v1 = load_table(store, "shop", 1)
    params = dict(v1.snapshot.params)
    extra = np.random.default_rng(8).normal(size=(6, S.finetune_hidden)).astype(np.float32)
    params["table.rows"] = np.concatenate([params["table.rows"][:level_rows], extra])
    found = stored_embeddings(store, "shop", v1.item_ids)
    shop = Snapshot(v1.snapshot.config, params)
    table = VersionTable.build(
        shop, v1.item_ids, v1.item_rows, np.stack([found[k] for k in v1.item_ids])
    )
    batch = store.batch()
    add_version(
        store, batch, "shop", VersionRecord(0, 1, 0.0, codebook.codebook_id, {}, {}), table, keep=5
    )
    store.write(batch)
    _describe(proc, "mall", 500)
    recs = [
        SourceRecord(
            INTER,
            0,
            20_000 + n,
            b"mall",
            interaction_payload(f"m{n % 40}", f"i{n % 120}", "mall", 3000 + n),
        )
        for n in range(320)
    ]
    store.write(proc.process(recs).batch)
    tuner = RecordingTuner(store, S)
    outcome = tuner.run("mall")
    assert outcome.record is not None and outcome.record.note == "warm start from shop v2"
    init = tuner.inits[-1]
    assert init is not None
    # the level rows, the encoder and the projection carry over; shop's own rows do not
    np.testing.assert_array_equal(init.params["table.rows"], shop.params["table.rows"][:level_rows])
    for name, arr in shop.params.items():
        if name != "table.rows":
            np.testing.assert_array_equal(init.params[name], arr)
    assert outcome.status is FinetuneStatus.PUBLISHED
    mall = load_table(store, "mall", 1).snapshot
    assert mall.config.text_dim == S.embedding_dim
    for name, arr in shop.params.items():
        if not name.startswith("table."):
            np.testing.assert_array_equal(mall.params[name], arr)  # the shared encoder


def test_coded_items_without_an_embedding_stop_the_fine_tune_with_the_cause() -> None:
    store = MemoryPartition()
    emb = np.arange(4, dtype="<f4")
    batch = store.batch()
    batch.put("items", item_key("d", "full"), ItemRecord(1, 1, b"", emb.tobytes()).encode())
    batch.put("items", item_key("d", "hollow"), ItemRecord(1, 1, placeholder=True).encode())
    store.write(batch)
    np.testing.assert_array_equal(read_embeddings(store, "d", ["full"]), emb[None])
    with pytest.raises(FineTuneDataError, match=r"1 have none \(e.g. \['hollow'\]\)"):
        read_embeddings(store, "d", ["full", "hollow"])


def _put_embeddings(store: MemoryPartition, vectors: np.ndarray) -> list[str]:
    batch = store.batch()
    ids = [f"i{n}" for n in range(len(vectors))]
    for item, vec in zip(ids, vectors, strict=True):
        record = ItemRecord(1, 1, b"", vec.astype("<f4").tobytes())
        batch.put("items", item_key("d", item), record.encode())
    store.write(batch)
    return ids


@pytest.mark.parametrize(
    ("odd", "half"),
    [(None, True), (0.0, True), (1e6, False), (1e-6, False), (-1e6, False)],
    ids=["all-fit", "a-zero-vector", "overflow", "too-small", "negative-overflow"],
)
def test_embeddings_are_held_in_float16_when_every_one_fits(odd: float | None, half: bool) -> None:
    """More than one chunk of items; one item past the first chunk scaled to ``odd``: the
    array is float16 (each value rounded once) when every item fits, else exact float32."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(EMBEDDING_CHUNK + 500, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if odd is not None:
        vectors[EMBEDDING_CHUNK + 7] = vectors[EMBEDDING_CHUNK + 7] * odd
    store = MemoryPartition()
    ids = _put_embeddings(store, vectors)
    got = read_embeddings(store, "d", ids)
    if half:
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, vectors.astype(np.float16))
    else:
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, vectors)


def _slow_fits(row: np.ndarray) -> bool:
    """Reference: float16 keeps every component finite and within 2 ** -11 of the row's
    largest |component|."""
    rounded = row.astype(np.float16).astype(np.float64)
    peak = float(np.abs(row).max())
    return bool(np.isfinite(rounded).all()) and bool(
        (np.abs(rounded - row) <= 2.0**-11 * peak).all()
    )


def test_the_float16_rule_keeps_every_component_within_its_precision() -> None:
    rng = np.random.default_rng(5)
    for exponent in np.linspace(-9, 6, 61):
        rows = rng.normal(size=(20, 16)) * 10.0**exponent
        for row in rows:
            if fits_half(row[None]):
                assert _slow_fits(row), row
        if 1e-3 <= 10.0**exponent <= 1e4:
            assert fits_half(rows)  # what embeddings look like fits
    assert fits_half(np.zeros((3, 4)))
    assert not fits_half(np.full((1, 4), 2.0**-15))  # subnormal: precision not kept
    assert fits_half(np.full((1, 4), 2.0**-14)) and fits_half(np.full((1, 4), 65504.0))
    assert not fits_half(np.full((1, 4), 65505.0))


# -- borrowed codes -------------------------------------------------------------------------


def _full(assigner: object, key: str) -> list[int]:
    a = assigner  # a CodeAssigner: full-path rows l * K + digit
    return [lvl * a.k + d for lvl, d in enumerate(a.full_path(key))]  # type: ignore[attr-defined]


def _slow_new_item_rows(table: VersionTable, assigner: object, key: str) -> list[int]:
    """Reference rows of an item coded after ``table``: the deepest prefix of its path that
    several trained items' codes share."""
    assert table.trained is not None and table.full_rows is not None
    trained = np.flatnonzero(table.trained)
    return slow_served_rows(
        assigner.row_ids(key).tolist(),  # type: ignore[attr-defined]
        _full(assigner, key),
        [table.item_rows[i].tolist() for i in trained],
        [table.full_rows[i].tolist() for i in trained],
    )


def _with_cold_targets(store: MemoryPartition, proc: Processor, offset: int) -> list[str]:
    """8 items described but never trained on: each the last interaction (a gate target) of
    a user whose history walks the item's cluster."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16))
    cold = [f"cold{c}" for c in range(8)]
    recs = [
        SourceRecord(
            ITEMS,
            0,
            offset + c,
            b"shop",
            item_payload(cold[c], "shop", 1, embedding=centers[c] + 0.1 * rng.normal(size=16)),
        )
        for c in range(8)
    ]
    ts, offset = 100_000, offset + 8
    for c in range(8):
        for step in range(4):
            item = f"i{c * 15 + step}" if step < 3 else cold[c]
            recs.append(
                SourceRecord(
                    INTER, 0, offset, b"shop", interaction_payload(f"late{c}", item, "shop", ts)
                )
            )
            offset, ts = offset + 1, ts + 1
    store.write(proc.process(recs).batch)
    return cold


def _twin_of_a_head(store: MemoryPartition, proc: Processor, offset: int) -> list[str]:
    """An item described with the very embedding of the head item whose code is longest
    (after the round a fine-tune reads), a gate target never trained on: served with
    borrowing, it takes its twin's long code instead of its own short one."""
    rounded = codes_after_round(store, "shop", B)
    assert rounded is not None
    head = max(rounded.assigner.keys, key=lambda k: len(rounded.assigner.served_code(k)))
    assert len(rounded.assigner.served_code(head)) > 1
    vec = stored_embeddings(store, "shop", [head])[head]
    recs = [SourceRecord(ITEMS, 0, offset, b"shop", item_payload("twin", "shop", 1, embedding=vec))]
    for step, item in enumerate(["i0", "i1", "i2", "twin"]):
        payload = interaction_payload("late_twin", item, "shop", 200_000 + step)
        recs.append(SourceRecord(INTER, 0, offset + 1 + step, b"shop", payload))
    store.write(proc.process(recs).batch)
    return ["twin"]


TIE = 1e-6
"""Scores this close are a tie: the served vectors and the gate's are computed by different
matrix products (numpy, torch), so items with the very same vector (the twin of a head)
differ in their last bits, either way."""


def _served_recall(
    store: MemoryPartition, settings: Settings
) -> tuple[tuple[float, float], tuple[float, float], int]:
    """Recall@10 and NDCG@10 of the gate's holdout measured through the serving index (the
    vectors and the encoder that are served), each as (ties ranked above the target, ties
    ranked below: :data:`TIE`), and the number of held-out cases."""
    data = read_domain(store, "shop")
    assert data is not None
    split = holdout_split(data.users, data.timestamps, max_users=settings.gate_users)
    train = split.train
    seqs = user_sequences(
        data.users[train],
        data.items[train],
        data.timestamps[train],
        n_users=int(data.users.max()) + 1,
    )
    serving = Serving(store, settings)
    assert serving.refresh() == ["shop"]
    index = serving.index("shop")
    vecs = np.stack([index.vector(item) for item in data.item_ids]).astype(np.float64)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    config = index.model.config
    assert config.score == "cosine"
    offset = index.model.repeat_offset()
    repeat = 0.0 if offset is None else float(offset.detach()) * config.temperature
    ranks: list[tuple[int, int]] = []
    held_users = data.users[split.holdout]
    for row, target in zip(
        pad_histories([seqs[u] for u in held_users], config.max_len),
        data.items[split.holdout],
        strict=True,
    ):
        history = [int(i) for i in row if i >= 0]
        state, unknown = index.user_vector([data.item_ids[i] for i in history])
        assert unknown == []
        # the model's score (up to its temperature): cosine, plus its bias on repeats
        scores = unit @ (state / np.linalg.norm(state))
        scores[history] += repeat
        low = int((scores >= scores[target] - TIE).sum()) - 1
        ranks.append((low, int((scores > scores[target] + TIE).sum())))

    def measures(rank: np.ndarray) -> tuple[float, float]:
        hit = rank < 10
        return float(hit.mean()), float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())

    (r_low, n_low), (r_high, n_high) = (measures(np.asarray(r)) for r in zip(*ranks, strict=True))
    return (r_low, r_high), (n_low, n_high), len(ranks)


@pytest.mark.parametrize("borrow", [True, False])
def test_the_gate_scores_items_as_they_are_served(borrow: bool) -> None:
    store, proc, offset = _setup(B)
    cold = _with_cold_targets(store, proc, offset) + _twin_of_a_head(store, proc, offset + 40)
    settings = replace(B, serve_borrow_trained=borrow)
    outcome = FineTuner(store, settings).run("shop")
    assert outcome.status is FinetuneStatus.PUBLISHED
    table = load_table(store, "shop", 1)
    assert table.trained is not None and table.full_rows is not None
    for item in cold:  # gate targets only: never trained on, so served a borrowed code
        assert not table.trained[table.item_ids.index(item)]
    assert outcome.metrics["trained_items"] == float(table.trained.sum())
    assert (table.served_rows() != table.item_rows).any()  # borrowing changes some codes
    recall, ndcg, n = _served_recall(store, settings)
    assert n == S.gate_users
    assert recall[1] - recall[0] <= 1 / n  # at most the twin's case is a tie
    assert recall[0] - 1e-9 <= outcome.metrics["recall@10"] <= recall[1] + 1e-9
    assert ndcg[0] - 1e-6 <= outcome.metrics["ndcg@10"] <= ndcg[1] + 1e-6


def test_untrained_and_brand_new_items_are_served_the_prefix_their_trained_relatives_share() -> (
    None
):
    store, proc, offset = _setup(B)
    cold = _with_cold_targets(store, proc, offset)
    assert FineTuner(store, B).run("shop").status is FinetuneStatus.PUBLISHED
    table = load_table(store, "shop", 1)
    snapshot = table.snapshot
    assert table.trained is not None and table.full_rows is not None
    serving = Serving(store, B)
    assert serving.refresh() == ["shop"]
    index = serving.index("shop")
    found = stored_embeddings(store, "shop", table.item_ids)
    trained = np.flatnonzero(table.trained)
    t_rows = [table.item_rows[i].tolist() for i in trained]
    t_full = [table.full_rows[i].tolist() for i in trained]
    for i, item in enumerate(table.item_ids):
        own = table.item_rows[i].tolist()
        # trained items keep their vectors; untrained ones borrow (+ their own W @ e, e as
        # the fine-tune held it: float16)
        rows = (
            own if table.trained[i] else slow_served_rows(own, table.full_rows[i], t_rows, t_full)
        )
        held = found[item].astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(
            index.vector(item), slow_vector(snapshot, rows, held), rtol=1e-4, atol=1e-5
        )
    # a brand-new twin of the most specific trained item: served the deepest prefix of its
    # path that several trained items share, never that item's own code alone
    depth = [
        len([r for r in table.item_rows[i][: table.full_rows.shape[1]] if r >= 0]) for i in trained
    ]
    model = trained[int(np.argmax(depth))]
    code = [r for r in table.item_rows[model] if r >= 0][: max(depth)]
    new_emb = (found[table.item_ids[model]] + 1e-4).astype(np.float32)
    result = proc.process(
        [
            SourceRecord(
                ITEMS, 0, 50_000, b"shop", item_payload("twin", "shop", 99, embedding=new_emb)
            )
        ]
    )
    store.write(result.batch)
    serving.on_applied(result)
    assigner = proc.codes.assigner("shop") if proc.codes is not None else None
    assert assigner is not None and serving.builds == 1
    assert _full(assigner, "twin") == table.full_rows[model].tolist()  # same path
    want = _slow_new_item_rows(table, assigner, "twin")
    assert 1 <= len(want) < len(code) and want == code[: len(want)]  # a shorter, shared prefix
    np.testing.assert_allclose(
        index.vector("twin"), slow_vector(snapshot, want, new_emb), rtol=1e-4, atol=1e-5
    )
    assert cold  # the cold items were coded and are in the version
    # the switch: without borrowing, the new item is served its own code
    plain = Serving(store, replace(B, serve_borrow_trained=False))
    assert plain.refresh() == ["shop"]
    np.testing.assert_allclose(
        plain.index("shop").vector("twin"),
        slow_vector(snapshot, assigner.row_ids("twin").tolist(), new_emb),
        rtol=1e-4,
        atol=1e-5,
    )


# -- scale: chunked reads, stop and budget inside training -----------------------------------


def _slow_read_log(store: MemoryPartition, domain: str, item_ids: list[str]):
    """Reference: one decoded object per interaction, users numbered on first sight."""
    index = {item: i for i, item in enumerate(item_ids)}
    users: dict[str, int] = {}
    u, it, ts = [], [], []
    for t, inter in iter_interactions(store, domain):
        if inter.item_id in index:
            u.append(users.setdefault(inter.user_id, len(users)))
            it.append(index[inter.item_id])
            ts.append(t)
    return np.array(u), np.array(it), np.array(ts)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_the_chunked_log_reader_equals_the_per_interaction_one(chunk: int) -> None:
    store, proc, offset = _setup()
    # a user id longer than any other, an unknown item, ids of several lengths
    recs = [
        SourceRecord(
            INTER, 0, offset, b"shop", interaction_payload("a-long-user-id", "i3", "shop", 5000)
        ),
        SourceRecord(
            INTER, 0, offset + 1, b"shop", interaction_payload("u1", "nope", "shop", 5001)
        ),
        SourceRecord(INTER, 0, offset + 2, b"shop", interaction_payload("u", "i119", "shop", 5002)),
    ]
    store.write(proc.process(recs).batch)
    assigner = committed_assigner(store, "shop")
    assert assigner is not None
    item_ids = list(assigner.keys)
    got = read_log(store, "shop", item_ids, chunk=chunk)
    want = _slow_read_log(store, "shop", item_ids)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(got[0]) == 200 * 8 + 2


@pytest.mark.parametrize("chunk", [1, 3, 64, 10_000])
def test_users_are_numbered_by_first_appearance_across_chunks(chunk: int) -> None:
    rng = np.random.default_rng(chunk)
    ids = np.array([b"u%d" % i for i in rng.zipf(1.3, size=2_000) % 300], dtype=bytes)
    first_seen: dict[bytes, int] = {}
    slow = [first_seen.setdefault(bytes(u), len(first_seen)) for u in ids]
    np.testing.assert_array_equal(_number_users(ids, chunk=chunk), slow)
    assert _number_users(ids[:0], chunk=chunk).shape == (0,)


class StopAfter(threading.Event):
    """A stop event that is set on its ``n``-th ``is_set`` question."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        if self.asked >= self.n:
            self.set()
        return super().is_set()


def test_a_stop_during_training_abandons_within_a_step_and_publishes_nothing() -> None:
    store, _proc, _offset = _setup()
    stop = StopAfter(12)  # past the reading checks, a few steps into training
    tuner = FineTuner(store, S, stop=stop)
    outcome = tuner.run("shop")
    assert outcome.status is FinetuneStatus.ABANDONED and outcome.record is None
    assert outcome.reason == "fine-tune of 'shop' abandoned while training: stopping"
    assert stop.asked == 12  # nothing ran past the step that saw the stop
    assert current_version(store, "shop") is None and list_records(store, "shop") == []


def test_a_run_out_of_budget_before_any_validated_epoch_is_abandoned() -> None:
    store, _proc, _offset = _setup()
    tuner = FineTuner(store, S)
    data = tuner._read("shop")
    assert data is not None
    with pytest.raises(Abandoned, match="over budget: no epoch validated within 0 s"):
        tuner.train_candidate("shop", data, np.arange(len(data.items)), None, None, budget_s=0.0)


def test_the_warm_up_trains_once_on_made_up_data_and_writes_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's fine-tune warm-up: torch's one-time set-up paid at start, the store left
    untouched; with the stop set it gives up at its first step."""
    store = MemoryPartition()
    families = ("meta", "codes", "versions", "items", "popularity")

    def contents() -> list[list[tuple[bytes, bytes]]]:
        return [list(store.items(cf)) for cf in families]

    before = contents()
    tuner = FineTuner(store, B)
    losses: list[str] = []
    real = finetune_module.train_domain

    def train_domain(*args: object, **kwargs: object) -> TrainResult:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        losses.append(result.loss)
        return result

    monkeypatch.setattr(finetune_module, "train_domain", train_domain)
    with caplog.at_level("INFO", logger="worker.tuning.finetune"):
        tuner.warm_up()
    assert any("warmed up" in r.getMessage() for r in caplog.records)
    assert contents() == before
    # every loss the rule can pick ran once, so none loads its modules in a real run
    assert losses == ["full", "sampled"] == list(WARM_UP_LOSSES)
    stopped = FineTuner(store, B, stop=threading.Event())
    stopped.stop.set()
    caplog.clear()
    stopped.warm_up()
    assert not any("warm" in r.getMessage() for r in caplog.records)


def test_only_versions_of_an_older_codebook_are_behind_it() -> None:
    """A version trained on a codebook earlier in the state's lineage is behind (its domain
    is queued for one on the current codes); one of a codebook this state never had (a
    newer one the group moved to, restored from its changelog before this worker followed)
    is not: training it again on the older codes would take the domain back."""
    settings = replace(S, gate_tolerance=1.0)
    store, _, _ = _setup(settings)
    tuner = RecordingTuner(store, settings)
    assert tuner.run("shop").status is FinetuneStatus.PUBLISHED
    assert behind_codebook(store) == []
    first = load_codebook(store)
    newer, _ = retrain_codebook(store, settings, seed=7)
    assert first is not None and behind_codebook(store) == ["shop"]
    assert tuner.run("shop").status is FinetuneStatus.PUBLISHED  # v2, of the newer codebook
    assert behind_codebook(store) == []
    # a state on the first codebook alone that holds v2 (restored from the group)
    batch = store.batch()
    batch.put("meta", CODEBOOK_CURRENT, first.codebook_id.encode())
    batch.put("meta", CODEBOOK_LINEAGE, orjson.dumps([first.codebook_id]))
    store.write(batch)
    record = get_record(store, "shop", current_version(store, "shop") or 0)
    assert record is not None and record.codebook_id == newer.codebook_id
    assert behind_codebook(store) == []
