"""Live code assignment inside the processor (in-memory store): bootstrap, codes, promotion."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest

import worker.ingest.coding as coding
from quantize.assign import AssignerState, CodeAssigner
from quantize.codebook import ResidualCodebook, suggest_shape
from quantize.lengths import make_policy, thresholds_for_fraction
from store.memory import MemoryPartition
from worker.core.settings import Settings
from worker.core.threads import Foreground
from worker.ingest.coding import HEAD_DRIFT, codes_after_round, follow_head_fraction
from worker.ingest.events import control_payload, interaction_payload, item_payload
from worker.ingest.processor import Processor, SourceRecord
from worker.state.layout import (
    BOOTSTRAP_CURSOR,
    CODEBOOK_CURRENT,
    MIGRATE_REQUEST,
    MIGRATE_STATE,
    UNPREFIXED_CODE_PREFIXES,
    assigner_key,
    code_row_prefix,
    item_key,
    namespace_prefix,
    round_pending_prefix,
)
from worker.state.reads import (
    code_history,
    code_namespaces,
    codebook_lineage,
    committed_assigner,
    load_codebook,
    load_codebook_by_id,
    round_pending,
)

S = Settings(
    embedding_dim=16,
    topic_prefix="t.",
    codebook_min_items=64,
    code_head_fraction=0.1,
    code_round_interactions=30,
)
ITEMS, INTER = S.topic("items"), S.topic("interactions")
#: rounds as shipped (a share of the domain's items, a floor), small enough for tests
ROUNDS = Settings(
    embedding_dim=16,
    topic_prefix="t.",
    codebook_min_items=64,
    code_head_fraction=0.1,
    code_round_share=0.5,
    code_round_min_interactions=10,
)


def _items(n: int, start: int = 0, seed: int = 0) -> list[SourceRecord]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 16))
    out = []
    for i in range(start, start + n):
        vec = centers[i % 8] + 0.3 * rng.normal(size=16)
        out.append(
            SourceRecord(ITEMS, 0, i, b"shop", item_payload(f"i{i}", "shop", i, embedding=vec))
        )
    return out


def _apply(store: MemoryPartition, proc: Processor, records: list[SourceRecord]):
    result = proc.process(records)
    store.write(result.batch)
    return result


def _state(store: MemoryPartition) -> AssignerState:
    assigner = committed_assigner(store, "shop")
    assert assigner is not None
    return assigner.state()


def test_no_codebook_until_enough_items_then_every_item_is_coded_in_that_batch() -> None:
    store = MemoryPartition()
    proc = Processor(store, S, None)
    r = _apply(store, proc, _items(40))
    assert r.coding.trained is None and store.get("meta", CODEBOOK_CURRENT) is None
    r = _apply(store, proc, _items(40, start=40))
    assert r.coding.trained is not None
    assert store.get("meta", CODEBOOK_CURRENT) == r.coding.trained.encode()
    state = _state(store)
    assert len(state.keys) == 80
    codebook = load_codebook(store)
    assert codebook is not None and codebook.codebook_id == r.coding.trained
    # later items are coded in the batch that stores them, as short codes
    r = _apply(store, proc, _items(5, start=80))
    new = [c for _, c in r.coding.changes if c.reason == "new"]
    assert sorted(c.key for c in new) == [f"i{i}" for i in range(80, 85)]
    assert all(len(c.new) == S.code_min_len for c in new)
    state = _state(store)
    for key, path, length in zip(state.keys, state.paths, state.lengths, strict=True):
        assert 1 <= length <= codebook.levels
        assert path.shape == (codebook.levels,) and key.startswith("i")


def test_interactions_promote_a_head_item_by_appending_digits_and_history_records_it() -> None:
    store = MemoryPartition()
    proc = Processor(store, S, None)
    _apply(store, proc, _items(100))
    before = {k: int(n) for k, n in zip(_state(store).keys, _state(store).lengths, strict=True)}
    offset = 0
    for round_ in range(4):
        recs = []
        for j in range(60):
            item = "i3" if j % 2 else f"i{(j * 7 + round_) % 100}"
            recs.append(
                SourceRecord(
                    INTER,
                    0,
                    offset,
                    b"shop",
                    interaction_payload(f"u{j}", item, "shop", 1000 + offset),
                )
            )
            offset += 1
        _apply(store, proc, recs)
    state = _state(store)
    idx = state.keys.index("i3")
    assert state.is_head[idx]
    history = code_history(store, "shop", "i3")
    assert history[0]["reason"] == "new"
    for h in history[1:]:
        old, new = tuple(h["old"]), tuple(h["new"])
        if h["reason"] in ("promote", "deepen", "disambiguate"):
            assert new[: len(old)] == old and len(new) > len(old)
    # head items never share a served code
    served = proc.codes.assigner("shop").served().codes()  # type: ignore[union-attr]
    heads = [served[i] for i in np.flatnonzero(state.is_head)]
    assert len(set(heads)) == len(heads)
    assert int(state.lengths[idx]) >= before["i3"]


def test_codes_survive_a_restart_of_the_processor() -> None:
    store = MemoryPartition()
    proc = Processor(store, S, None)
    _apply(store, proc, _items(70))
    again = Processor(store, S, None)
    assert again.codes is not None and again.codes.codebook is not None
    assigner = again.codes.assigner("shop")
    assert assigner is not None and len(assigner) == 70
    assert assigner.served_code("i5") == proc.codes.assigner("shop").served_code("i5")  # type: ignore[union-attr]


def test_retraining_is_explicit_and_recodes_every_item_with_history() -> None:
    from worker.ingest.coding import retrain_codebook

    store = MemoryPartition()
    proc = Processor(store, S, None)
    _apply(store, proc, _items(100))
    first = load_codebook(store)
    assert first is not None
    codebook, recoded = retrain_codebook(store, S, levels=2, k=8, seed=3)
    assert recoded == 100
    assert load_codebook(store) == codebook != first
    assert codebook.levels == 2 and codebook.k == 8
    state = _state(store)
    assert state.paths.shape == (100, 2) and int(state.paths.max()) < 8
    history = code_history(store, "shop", "i7")
    assert [h["reason"] for h in history] == ["new", "recode"]
    # no version was trained on the old codebook: its codes went in the same batch
    assert code_namespaces(store) == {codebook.codebook_id: namespace_prefix(codebook.codebook_id)}
    for prefix in UNPREFIXED_CODE_PREFIXES:
        assert store.count("codes", prefix=prefix) == 0
    assert load_codebook_by_id(store, first.codebook_id) is None
    # a worker started afterwards serves the new codes, and keeps no others
    again = Processor(store, S, None)
    assert again.codes is not None and again.codes.codebook == codebook
    assert again.kept is not None and again.kept.services == {}
    assert again.codes.assigner("shop") is not None and len(again.codes.assigner("shop")) == 100
    # a second retrain moves from one namespace to the next
    third, _ = retrain_codebook(store, S, levels=2, k=8, seed=4)
    assert code_namespaces(store) == {third.codebook_id: namespace_prefix(third.codebook_id)}
    assert store.count("codes", prefix=namespace_prefix(codebook.codebook_id)) == 0
    assert _state(store).paths.shape == (100, 2)


def test_drift_is_measured_as_items_are_coded_saved_with_them_and_read_by_stats() -> None:
    """The catalogue the codebook is adopted for forms the baseline; later items from the
    same clusters score near 0, items from new clusters pass the threshold; the sums are
    committed with the batch (a restarted processor and ``adacode stats`` read them)."""
    from worker.commands.inspection import stats

    store = MemoryPartition()
    proc = Processor(store, S, None)
    _apply(store, proc, _items(100))
    assert proc.codes is not None
    report = proc.codes.drift_report()
    assert report is not None and report.baseline_items == 100 and report.recent_items == 0
    for start in range(100, 700, 100):  # same clusters, batch after batch
        _apply(store, proc, _items(100, start=start))
    same = proc.codes.drift_report()
    assert same is not None and same.score is not None and same.recent_items == 600
    assert abs(same.score) < S.codebook_drift_threshold and not same.drifted
    for start in range(700, 1900, 100):  # new clusters
        _apply(store, proc, _items(100, start=start, seed=7))
    moved = proc.codes.drift_report()
    assert moved is not None and moved.score is not None and moved.drifted
    assert moved.error_ratio is not None and moved.error_ratio > 1.3
    assert moved.catalogue_share == pytest.approx(100 / 1900)
    again = Processor(store, S, None)
    assert again.codes is not None and again.codes.drift_report() == moved
    doc = stats(store, S.codebook_drift_threshold)["codebook"]["drift"]
    assert doc["score"] == pytest.approx(moved.score) and doc["drifted"] is True


def test_a_retrained_codebook_measures_drift_against_every_item_it_re_coded() -> None:
    from worker.ingest.coding import retrain_codebook

    store = MemoryPartition()
    proc = Processor(store, S, None)
    for start in range(0, 400, 100):
        _apply(store, proc, _items(100, start=start))
    retrain_codebook(store, S, levels=2, k=8, seed=3)
    again = Processor(store, S, None)
    assert again.codes is not None
    drift = again.codes.drift_report()
    assert drift is not None and (drift.baseline_items, drift.recent_items) == (400, 0)


def test_code_stats_are_read_during_a_batch_without_waiting_for_it() -> None:
    """``/metrics`` reads the served codes from an HTTP thread while the consumer thread
    codes a batch: the snapshot must not see an assigner half-way through ``add`` (its
    arrays grown one by one: seen in a soak as a shape mismatch)."""
    store = MemoryPartition()
    proc = Processor(store, S, None)
    _apply(store, proc, _items(80))
    codes = proc.codes
    assert codes is not None
    assigner = codes.assigner("shop")
    assert assigner is not None
    inside, release = threading.Event(), threading.Event()
    original = assigner.add

    def slow_add(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        inside.set()
        release.wait(10)  # the batch is still in progress
        return out

    assigner.add = slow_add  # type: ignore[method-assign]
    coder = threading.Thread(target=_apply, args=(store, proc, _items(7, start=80)))
    coder.start()
    assert inside.wait(10)
    # a scrape during the batch does not wait for it: it reads the last batch's stats
    before = codes.take_stats()
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.append(codes.take_stats()))
    reader.start()
    reader.join(2)
    assert not reader.is_alive() and got == [{}]  # nothing new yet, and no wait
    assert before["shop"].n_items == 80
    release.set()
    coder.join(10)
    stats = codes.take_stats()["shop"]
    assert stats.n_items == 87
    assert stats == assigner.stats()


def _interactions(n: int, seed: int, start: int = 0) -> list[SourceRecord]:
    """Zipf-ish traffic over 100 items (a few hot ones), one user per event."""
    rng = np.random.default_rng(seed)
    hot = rng.zipf(1.6, size=n) % 100
    return [
        SourceRecord(
            INTER,
            0,
            start + k,
            b"shop",
            interaction_payload(f"u{k}", f"i{hot[k]}", "shop", 500 + k),
        )
        for k in range(n)
    ]


def _codes(store: MemoryPartition) -> dict[str, tuple[tuple[int, ...], bool]]:
    assigner = committed_assigner(store, "shop")
    assert assigner is not None
    return {k: (assigner.served_code(k), assigner.is_head(k)) for k in assigner.keys}


def test_rounds_fall_on_their_interaction_whatever_the_batches_and_clear_their_marks() -> None:
    """A domain of 100 items gets a round every 50 interactions (code_round_share=0.5) at that
    very interaction: cutting the same stream into other batches gives the same codes,
    popularity rounds and marks; a round leaves no mark behind it."""
    settings = ROUNDS
    stream = _interactions(437, seed=3)
    results = []
    for sizes in ([437], [1, 60, 3, 200, 173], [50] * 9, [7] * 63):
        store = MemoryPartition()
        proc = Processor(store, settings, None)
        _apply(store, proc, _items(100))
        rounds = []
        at = 0
        for size in sizes:
            r = _apply(store, proc, stream[at : at + size])
            rounds += [n for _, n, _ in r.coding.rounds]
            at += size
        marks = round_pending(store, "shop")
        results.append((_codes(store), len(rounds), sorted(marks)))
        assert len(rounds) == 437 // 50
        # the 37 interactions after the last round are marked, nothing older
        assert set(marks) == {f"i{i}" for i in np.random.default_rng(3).zipf(1.6, 437)[400:] % 100}
    assert all(r == results[0] for r in results[1:])
    heads = [c for c, head in results[0][0].values() if head]
    assert heads and max(len(c) for c in heads) > 1  # a small domain gets long head codes


class _ReadLog(MemoryPartition):
    """A memory partition that records the point reads and scans made of it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, bytes]] = []

    def get(self, cf: str, key: bytes) -> bytes | None:
        self.reads.append((cf, key))
        return super().get(cf, key)

    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        self.reads.extend((cf, k) for k in keys)
        return super().multi_get(cf, keys)

    def items(self, cf: str, *, prefix: bytes = b"", **kwargs: Any) -> Any:
        self.reads.append((cf, b"scan:" + prefix))
        return super().items(cf, prefix=prefix, **kwargs)


def test_a_round_reads_its_marks_from_memory_and_a_restart_reads_them_once() -> None:
    """The marks and the marked items' popularity are kept in memory: a batch whose round
    takes the items marked by earlier batches reads neither the marks nor those items'
    popularity from the store; a processor started on the same store reads them once, when
    it loads the domain, and the stream then gives the same codes and marks as one that
    never restarted."""
    settings = ROUNDS
    stream = _interactions(437, seed=5)
    hot = np.random.default_rng(5).zipf(1.6, size=437) % 100  # the items of the stream
    outcomes = []
    rounds_checked = 0
    for restart_at in (None, 2, 5):
        store = _ReadLog()
        proc = Processor(store, settings, None)
        _apply(store, proc, _items(100))
        cuts = [0, 23, 71, 120, 160, 213, 270, 330, 401, 437]
        for n, (a, b) in enumerate(itertools.pairwise(cuts)):
            if n == restart_at:
                proc = Processor(store, settings, None)
            store.reads.clear()
            batch = stream[a:b]
            result = _apply(store, proc, batch)
            pend = [k for cf, k in store.reads if cf == "codes" and b"pend" in k]
            if n == restart_at:
                assert pend == [b"scan:" + round_pending_prefix("shop")]  # once, at the load
            else:
                assert pend == []  # never by a round
            if result.coding.rounds and n != restart_at:
                read = {k for cf, k in store.reads if cf == "popularity"}
                in_batch = {item_key("shop", f"i{i}") for i in hot[a:b]}
                assert read <= in_batch  # only the batch's own items (its folding)
                rounds_checked += 1
        outcomes.append((_codes(store), sorted(round_pending(store, "shop"))))
    assert rounds_checked >= 12  # rounds with marks from earlier batches, in all three runs
    assert outcomes[1] == outcomes[0] and outcomes[2] == outcomes[0]


def test_a_long_stream_moves_the_reference_time_and_keeps_popularity_finite() -> None:
    """With a half-life of 3.6 s, 20,000 s of events span ~5,600 half-lives: values taken at
    a fixed reference time would overflow; the reference moves by whole grid steps (exact
    powers of two) and the head is still the recent traffic."""
    settings = Settings(
        embedding_dim=16,
        topic_prefix="t.",
        codebook_min_items=64,
        code_head_fraction=0.05,
        popularity_half_life_hours=0.001,
        code_round_min_interactions=10,
    )
    store = MemoryPartition()
    proc = Processor(store, settings, None)
    _apply(store, proc, _items(100))
    recs = []
    for k in range(400):
        item = f"i{k % 7}" if k < 200 else f"i{50 + k % 3}"  # old traffic, then new
        ts = 10 * k if k < 200 else 20_000 + k
        recs.append(
            SourceRecord(INTER, 0, k, b"shop", interaction_payload(f"u{k}", item, "shop", ts))
        )
    for start in range(0, 400, 50):
        _apply(store, proc, recs[start : start + 50])
    assigner = committed_assigner(store, "shop")
    assert assigner is not None
    pops = assigner.all_popularity()
    assert np.isfinite(pops).all() and pops.max() > 0
    heads = {k for k in assigner.keys if assigner.is_head(k)}
    assert {"i50", "i51", "i52"} <= heads and not heads & {f"i{j}" for j in range(7)}


def test_a_domain_saved_in_the_first_format_is_read_then_saved_row_by_row() -> None:
    """A state written before per-item rows (one AssignerState blob per domain) is read as it
    is, and the first batch that changes the domain saves every item as a row and a header."""
    store = MemoryPartition()
    proc = Processor(store, S, None)
    _apply(store, proc, _items(80))
    live = committed_assigner(store, "shop")
    assert live is not None
    batch = store.batch()  # rewrite the domain as the first format held it
    prefix = code_row_prefix("shop")
    for key, _ in list(store.items("codes", prefix=prefix)):
        batch.delete("codes", key)
    batch.put("codes", assigner_key("shop"), live.state().to_bytes())
    store.write(batch)
    old = Processor(store, S, None)  # a restart on that state
    assert codes_of(committed_assigner(store, "shop")) == codes_of(live)
    _apply(store, old, _items(3, start=80))
    header = store.get("codes", assigner_key("shop"))
    assert header is not None and header.startswith(b"{")
    assert store.count("codes", prefix=prefix) == 83
    again = committed_assigner(store, "shop")
    assert again is not None and len(again) == 83
    assert {k: again.served_code(k) for k in live.keys} == codes_of(live)


def codes_of(assigner: object) -> dict[str, tuple[int, ...]]:
    assert assigner is not None
    return {k: assigner.served_code(k) for k in assigner.keys}  # type: ignore[attr-defined]


def test_a_fine_tune_reads_the_codes_its_waiting_round_leaves() -> None:
    """Between two rounds, :func:`codes_after_round` applies the round the moved items wait
    for to a copy: the codes equal those the consumer's own round gives when it falls later
    with nothing else moved (the interactions up to it are of an item not coded), and the
    committed state and its marks are left as they were."""
    settings = ROUNDS
    store = MemoryPartition()
    proc = Processor(store, settings, None)
    _apply(store, proc, _items(100))
    stream = _interactions(140, seed=5)
    rounds = [n for _, n, _ in _apply(store, proc, stream).coding.rounds]
    assert len(rounds) == 2  # at interactions 50 and 100; the 40 after wait for the next
    committed, marks = _codes(store), round_pending(store, "shop")
    rounded = codes_after_round(store, "shop", settings)
    assert rounded is not None and rounded.moved == len(marks) > 0 and rounded.changes
    after = {k: (rounded.assigner.served_code(k), rounded.assigner.is_head(k)) for k in committed}
    assert after != committed
    assert _codes(store) == committed and round_pending(store, "shop") == marks
    ghost = [
        SourceRecord(
            INTER, 0, 140 + k, b"shop", interaction_payload(f"v{k}", "ghost", "shop", 900 + k)
        )
        for k in range(10)
    ]
    assert [n for _, n, _ in _apply(store, proc, ghost).coding.rounds] == [len(marks)]
    assert _codes(store) == after and round_pending(store, "shop") == []


def _pareto_assigner(n: int, head_fraction: float) -> CodeAssigner:
    rng = np.random.default_rng(7)
    a = CodeAssigner(
        3, 16, make_policy("entropy", min_len=1), enter_threshold=math.inf, exit_threshold=math.inf
    )
    pop = rng.pareto(1.1, n)
    a.add([f"i{j}" for j in range(n)], rng.integers(0, 16, size=(n, 3)), pop)
    a.set_thresholds(*thresholds_for_fraction(pop, head_fraction))
    return a


@pytest.mark.parametrize("start, goal", [(0.3, 0.1), (0.05, 0.2)])
def test_a_threshold_move_flips_at_most_its_budget_and_reaches_the_target(
    start: float, goal: float
) -> None:
    """Heads far from ``code_head_fraction`` (too many, then too few): each move flips at
    most its budget of head flags (one more for a tie), and a few moves bring the head count
    within HEAD_DRIFT of the target; an unbounded budget is one jump to the target's
    thresholds, as before."""
    n, budget = 20_000, 500
    a = _pareto_assigner(n, start)
    target = round(goal * n)
    moves = 0
    while abs(a.n_head - target) > HEAD_DRIFT * target:
        heads = a.n_head
        follow_head_fraction(a, goal, 1, budget)  # code changes: few (demotion is lazy)
        assert 0 < abs(a.n_head - heads) <= budget + 1 and moves < 50
        moves += 1
    thresholds = (a.enter_threshold, a.exit_threshold)
    assert moves >= 3 and follow_head_fraction(a, goal, 1, budget) == []
    assert (a.enter_threshold, a.exit_threshold) == thresholds  # within the drift: no move
    jump = _pareto_assigner(n, start)
    follow_head_fraction(jump, goal, 1, n)
    enter, exit_ = thresholds_for_fraction(jump.all_popularity(), goal)
    assert (jump.enter_threshold, jump.exit_threshold) == (enter, exit_)


# --- the bootstrap's sample does not depend on batch cuts --------------------------------


def _bootstrap_stream(seed: int) -> tuple[list[SourceRecord], dict[str, np.ndarray]]:
    """150 items (offsets 0..), two of them sent again with a new embedding (one before the
    64th item, one after), and interactions that make placeholders of items not yet sent.
    Returns the records and, per item, its embedding as of the 64th item's event."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 16))
    events: list[tuple[str, np.ndarray]] = []
    for i in range(150):
        events.append((f"i{i}", centers[i % 8] + 0.3 * rng.normal(size=16)))
        if i == 40:
            events.append(("i3", rng.normal(size=16)))  # before the 64th item: in the sample
        if i == 100:
            events.append(("i5", rng.normal(size=16)))  # after it: not in the sample
    as_of: dict[str, np.ndarray] = {}  # replayed one event at a time, up to the 64th item
    records = []
    for offset, (item, vec) in enumerate(events):
        if len(as_of) < S.codebook_min_items:
            as_of[item] = vec.astype("<f4")
        payload = item_payload(item, "shop", offset, embedding=vec)
        records.append(SourceRecord(ITEMS, 0, offset, b"shop", payload))
    for k in range(60):  # items 90..149 first seen as placeholders
        payload = interaction_payload(f"u{k}", f"i{90 + k}", "shop", k)
        records.append(SourceRecord(INTER, 0, k, b"shop", payload))
    return records, as_of


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bootstrap_sample_ends_at_the_event_that_fills_it_whatever_the_batches(
    seed: int,
) -> None:
    from quantize.codebook import POINTS_PER_CENTROID, ResidualCodebook, suggest_shape

    records, as_of = _bootstrap_stream(seed)
    assert len(as_of) == S.codebook_min_items and "i64" not in as_of
    # the slow reference: the first 64 items, each as of the 64th item's event, key order
    keys = sorted(item_key("shop", i) for i in as_of)
    vectors = np.stack([as_of[k.decode().split("\x00")[1]] for k in keys])
    levels, k = suggest_shape(S.codebook_min_items)
    want = ResidualCodebook.train(
        vectors, levels, k, seed=0, points_per_centroid=POINTS_PER_CENTROID
    ).codebook_id

    items = [r for r in records if r.topic == ITEMS]
    inters = [r for r in records if r.topic == INTER]
    rng = np.random.default_rng(100 + seed)
    trained = []
    for _ in range(6):  # batches of random sizes, the two topics interleaved at random
        store = MemoryPartition()
        proc = Processor(store, S, None)
        queues = [list(items), list(inters)]
        while any(queues):
            batch: list[SourceRecord] = []
            for q in queues:
                take = int(rng.integers(0, 70))
                batch += q[:take]
                del q[:take]
            if batch:
                _apply(store, proc, batch)
        codebook = load_codebook(store)
        assert codebook is not None
        trained.append(codebook.codebook_id)
        assert len(_state(store).keys) == 150  # every item coded in the end
    assert trained == [want] * 6


# --- live migration ---------------------------------------------------------------------------

CONTROL = S.topic("control")


def _migrate_command(offset: int) -> SourceRecord:
    """``adacode codebook migrate`` as the worker reads it (no domain, any key)."""
    return SourceRecord(CONTROL, 0, offset, b"", control_payload("migrate", ""))


def _embeddings(records: list[SourceRecord]) -> dict[str, np.ndarray]:
    out = {}
    for rec in records:
        doc = orjson.loads(rec.value or b"{}")
        out[doc["item_id"]] = np.asarray(doc["embedding"], dtype=np.float32)
    return out


def test_a_live_migration_trains_cuts_over_and_codes_every_item_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``migrate`` saves a request with the batch; the next batch trains the candidate on a
    sample of today's items (here, without a background trainer) and cuts over: the new
    codebook is current in its own namespace, the old codes go at once (no version was
    trained on them), and the items held before are coded ``CATCH_UP_ITEMS`` per batch,
    each with its full path in the new codebook, while new items are coded as they come."""
    monkeypatch.setattr(coding, "CATCH_UP_ITEMS", 60)
    store = MemoryPartition()
    proc = Processor(store, S, None)
    sent = _items(100) + _items(300, start=100, seed=7)
    _apply(store, proc, sent[:100])
    _apply(store, proc, sent[100:])
    old = load_codebook(store)
    assert old is not None and proc.codes is not None
    result = _apply(store, proc, [_migrate_command(0)])
    assert not result.dead and store.get("meta", MIGRATE_REQUEST) is not None
    assert load_codebook(store) == old

    batches = 0
    while True:
        records = _items(20, start=400 + 20 * batches, seed=9)
        sent += records
        result = _apply(store, proc, records)
        batches += 1
        if batches == 1:  # the cut-over
            new = load_codebook(store)
            assert new is not None and new != old and result.coding.trained == new.codebook_id
            assert store.get("meta", MIGRATE_REQUEST) is None
            state = orjson.loads(store.get("meta", MIGRATE_STATE) or b"{}")
            assert (state["from"], state["to"]) == (old.codebook_id, new.codebook_id)
            assert code_namespaces(store) == {new.codebook_id: namespace_prefix(new.codebook_id)}
            assert load_codebook_by_id(store, old.codebook_id) is None  # no version needs it
            for prefix in UNPREFIXED_CODE_PREFIXES:
                assert store.count("codes", prefix=prefix) == 0
            # shaped by rule for today's catalogue (420 items), not for the first 64
            assert (new.levels, new.k) == suggest_shape(420) != (old.levels, old.k)
        if store.get("meta", MIGRATE_STATE) is None:
            break
        assert proc.background_work() and store.get("meta", BOOTSTRAP_CURSOR) is not None
        coded = len(_state(store).keys)
        assert coded <= 80 * batches and coded < len(sent)  # a chunk + the batch a batch
    assert batches >= math.ceil(420 / 60)
    assert store.get("meta", BOOTSTRAP_CURSOR) is None and not proc.background_work()
    assigner = committed_assigner(store, "shop")
    assert assigner is not None and len(assigner) == len(sent) == 400 + 20 * batches
    vectors = _embeddings(sent)
    keys = sorted(vectors)
    paths = new.encode(np.stack([vectors[k] for k in keys]))
    for key, path in zip(keys, paths, strict=True):
        assert assigner.full_path(key) == tuple(int(c) for c in path)
    report = proc.codes.drift_report()
    # every item coded until the catch-up ended is the new codebook's baseline
    assert report is not None and report.baseline_items == len(sent) and not report.drifted


def _migration_run(monkeypatch: pytest.MonkeyPatch, restart_before: int | None) -> dict:
    """The stream of the test above, the processor rebuilt (a restart) before batch
    ``restart_before`` after the command; the committed codes and meta, key by key."""
    monkeypatch.setattr(coding, "CATCH_UP_ITEMS", 60)
    store = MemoryPartition()
    proc = Processor(store, S, None)
    _apply(store, proc, _items(100))
    _apply(store, proc, _items(300, start=100, seed=7))
    _apply(store, proc, [_migrate_command(0)])
    for n in range(14):
        if n == restart_before:
            proc = Processor(store, S, None)
        _apply(store, proc, _items(20, start=400 + 20 * n, seed=9))
    assert store.get("meta", MIGRATE_STATE) is None
    return {cf: dict(store.items(cf)) for cf in ("codes", "meta")}


@pytest.mark.parametrize("restart_before", [0, 1, 4])
def test_a_migration_restarted_at_any_step_ends_in_the_same_state(
    monkeypatch: pytest.MonkeyPatch, restart_before: int
) -> None:
    """A restart before the cut-over trains the same candidate again (same sample, same
    seed); one during the catch-up resumes at the committed cursor: the same codes."""
    assert _migration_run(monkeypatch, restart_before) == _migration_run(monkeypatch, None)


def test_migrate_without_a_codebook_is_refused_and_a_second_request_is_the_same() -> None:
    store = MemoryPartition()
    proc = Processor(store, S, None)
    result = _apply(store, proc, [_migrate_command(0)])
    assert [d.reason for d in result.dead] == ["control command refused: there is no codebook yet"]
    _apply(store, proc, _items(100))
    assert proc.codes is not None and proc.codes.codebook is not None
    batch = store.batch()
    assert proc.codes.request_migration(batch, "first")
    store.write(batch)
    batch = store.batch()
    assert not proc.codes.request_migration(batch, "second")
    assert orjson.loads(store.get("meta", MIGRATE_REQUEST) or b"{}") == {"source": "first"}


def test_the_catch_up_after_a_bootstrap_codes_every_held_item_chunk_by_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Items held before the codebook are coded ``CATCH_UP_ITEMS`` per batch until the last
    one (each scan starts at the last key coded, which it reads again and skips)."""
    monkeypatch.setattr(coding, "CATCH_UP_ITEMS", 60)
    settings = replace(S, codebook_min_items=200)
    store = MemoryPartition()
    proc = Processor(store, settings, None)
    sent = _items(400)
    for start in range(0, 400, 50):
        _apply(store, proc, sent[start : start + 50])
    while proc.background_work():
        _apply(store, proc, [])
    assigner = committed_assigner(store, "shop")
    assert assigner is not None and sorted(assigner.keys) == sorted(_embeddings(sent))


class _Group:
    """An in-process CodebookSource: a chain of codebooks another worker can move on."""

    def __init__(self) -> None:
        self.chain: list[ResidualCodebook] = []

    def current(self) -> ResidualCodebook | None:
        return self.chain[-1] if self.chain else None

    def agree(self, candidate: ResidualCodebook) -> ResidualCodebook:
        if not self.chain:
            self.chain.append(candidate)
        return self.chain[-1]

    def succeed(self, old_id: str, new: ResidualCodebook) -> ResidualCodebook | None:
        if self.chain and self.chain[-1].codebook_id == old_id:
            self.chain.append(new)
        return self.current()

    def seen(self) -> list[ResidualCodebook]:
        return list(self.chain)


def _codebook_of(records: list[SourceRecord], levels: int, k: int, seed: int) -> ResidualCodebook:
    vectors = _embeddings(records)
    return ResidualCodebook.train(np.stack(list(vectors.values())), levels, k, seed=seed)


def _until_migrated(store: MemoryPartition, proc: Processor, sent: list[SourceRecord]) -> int:
    """Batches of new items until no migration is requested or under way; how many."""
    n = 0
    while store.get("meta", MIGRATE_REQUEST) or store.get("meta", MIGRATE_STATE):
        records = _items(10, start=10_000 + 10 * len(sent), seed=len(sent))
        sent += records
        _apply(store, proc, records)
        n += 1
        assert n < 50, "the migration does not end"
    return n


def _coded_with(store: MemoryPartition, codebook: ResidualCodebook, sent: list[SourceRecord]):
    assigner = committed_assigner(store, "shop")
    assert assigner is not None
    vectors = _embeddings(sent)
    keys = sorted(vectors)
    assert sorted(assigner.keys) == keys
    paths = codebook.encode(np.stack([vectors[k] for k in keys]))
    return all(
        assigner.full_path(k) == tuple(int(c) for c in p) for k, p in zip(keys, paths, strict=True)
    )


def test_a_running_worker_follows_the_group_codebook_another_worker_moved_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another worker migrates the group (a successor on the codebook topic): the next batch
    requests a migration to it (no training here), the one after cuts over, the items are
    caught up and every item ends coded with the group's codebook, without a restart. A
    group that moves on again during the catch-up is followed once it ends; a worker ahead
    of the group (its lineage holds the group's codebook) and a group of another lineage
    are left alone, the latter logged once."""
    monkeypatch.setattr(coding, "CATCH_UP_ITEMS", 60)
    store, group = MemoryPartition(), _Group()
    proc = Processor(store, S, None, group=group)
    sent = _items(100) + _items(200, start=100, seed=7)
    _apply(store, proc, sent[:100])
    _apply(store, proc, sent[100:])
    old = load_codebook(store)
    assert old is not None and group.chain == [old]
    _apply(store, proc, _items(0))
    assert store.get("meta", MIGRATE_REQUEST) is None  # the group is where this worker is

    # -- another worker migrates; then the group moves on again during the catch-up --------
    second = _codebook_of(sent, 3, 16, seed=1)
    assert not proc.background_work()
    group.chain.append(second)
    assert proc.background_work()  # an idle stream follows too: an empty batch does it
    _apply(store, proc, [])
    request = orjson.loads(store.get("meta", MIGRATE_REQUEST) or b"{}")
    assert request["codebook"] == second.codebook_id
    records = _items(10, start=300, seed=3)
    sent += records
    _apply(store, proc, records)
    records = _items(10, start=310, seed=4)
    sent += records
    _apply(store, proc, records)  # the cut-over
    assert load_codebook(store) == second and store.get("meta", MIGRATE_STATE) is not None
    third = _codebook_of(sent, 2, 32, seed=2)
    group.chain.append(third)
    records = _items(10, start=320, seed=5)
    sent += records
    _apply(store, proc, records)
    assert orjson.loads(store.get("meta", MIGRATE_STATE) or b"{}")["to"] == second.codebook_id
    _until_migrated(store, proc, sent)
    assert load_codebook(store) == third and _coded_with(store, third, sent)
    assert codebook_lineage(store) == [c.codebook_id for c in (old, second, third)]

    # -- ahead of the group, or a group of another lineage: nothing requested ----------------
    group.chain = [old, second]
    records = _items(10, start=20_000, seed=6)
    sent += records
    _apply(store, proc, records)
    assert store.get("meta", MIGRATE_REQUEST) is None and not proc.background_work()
    other = _codebook_of(sent, 2, 8, seed=3)
    group.chain = [other]
    for n in range(2):
        _apply(store, proc, _items(5, start=30_000 + 5 * n, seed=n))
    assert store.get("meta", MIGRATE_REQUEST) is None and load_codebook(store) == third
    assert caplog.text.count(f"the group's codebook is {other.codebook_id}") == 1
    assert not proc.background_work()


def test_a_worker_that_starts_on_the_groups_codebook_descends_from_its_chain() -> None:
    """A state whose first codebook is the group's (moved on twice) takes the group's chain
    up to it as its lineage: versions restored from the group that were trained on the
    older codebooks count as behind it (see worker.tuning.scheduler.behind_codebook)."""
    vectors = _items(100)
    chain = [_codebook_of(vectors, 2, 4 * (n + 1), seed=n) for n in range(3)]
    store, group = MemoryPartition(), _Group()
    group.chain = list(chain)
    proc = Processor(store, S, None, group=group)
    assert proc.codes is not None
    batch = store.batch()
    proc.codes.adopt(batch, chain[-1])
    store.write(batch)
    assert codebook_lineage(store) == [c.codebook_id for c in chain]
    other = MemoryPartition()  # not in the chain: its lineage is its own
    proc = Processor(other, S, None, group=group)
    assert proc.codes is not None
    batch = other.batch()
    proc.codes.adopt(batch, _codebook_of(vectors, 2, 8, seed=9))
    other.write(batch)
    assert len(codebook_lineage(other)) == 1


class _Steps(Foreground):
    """A foreground that records, per step, whether a round was running inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    @contextmanager
    def busy(self) -> Iterator[None]:
        with super().busy():
            self.steps += 1
            yield


def test_every_code_round_runs_as_a_foreground_step() -> None:
    """Rounds say they run (background scans step aside meanwhile), and only rounds do: a
    batch of item events or interactions that reach no round marks nothing."""
    steps = _Steps()
    store = MemoryPartition()
    proc = Processor(store, ROUNDS, None, foreground=steps)
    _apply(store, proc, _items(100))
    assert steps.steps == 0 and steps.idle
    rounds = 0
    stream = _interactions(437, seed=3)
    for at in range(0, 437, 40):
        result = _apply(store, proc, stream[at : at + 40])
        rounds += len(result.coding.rounds)
        assert steps.steps == rounds and steps.idle  # each round inside its own step
    assert rounds == 437 // 50
