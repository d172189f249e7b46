"""The serving index (worker/serving/index.py): the index type chosen by rule from the catalogue
size, the recall of the inverted file against exact search, live adds and swaps under
concurrent reads, cached versions on rollback, and the refresher woken by notifications.

No Kafka: a real :class:`~worker.serving.index.Serving` over an in-memory store holding
published versions (random code rows, fresh models)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import faiss
import numpy as np
import pytest
import torch

from quantize.table_model import ModelConfig, Snapshot, build_model, export_params
from store.memory import MemoryPartition
from store.records import DomainCounters
from worker.core.settings import Settings
from worker.serving.exceptions import ServingError
from worker.serving.index import (
    IndexKind,
    IndexPlan,
    IndexRule,
    Serving,
    build_search_index,
    recall_at,
    sample_queries,
)
from worker.state.layout import domain_counters_key
from worker.state.versions import PUBLISHED, VersionRecord, VersionTable, add_version, rollback

LEVELS, K, HIDDEN = 3, 16, 16
#: the rule scaled down: the inverted file above 300 items (by default above 20k)
SMALL = Settings(
    http_port=0,
    topic_prefix="t.",
    embedding_dim=8,
    index_exact_max_items=300,
    index_poll_s=60.0,
)


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors like the served ones: sums of one row per level of a residual codebook (Zipf
    popular codes, so many items share theirs) plus a little noise, normalized."""
    rng = np.random.default_rng(seed)
    books = [rng.normal(size=(K * 4, dim)) * scale for scale in (1.0, 0.5, 0.25)]
    codes = rng.zipf(1.3, size=(n, len(books))) % (K * 4)
    x = sum(book[codes[:, level]] for level, book in enumerate(books))
    x = x + 0.1 * rng.normal(size=(n, dim))
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def _publish(store: MemoryPartition, domain: str, seed: int, n_items: int) -> int:
    """A published version of ``domain``: items with random 3-level codes, a fresh model."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(K, size=(n_items, LEVELS)) + np.arange(LEVELS) * K
    torch.manual_seed(seed)
    config = ModelConfig(hidden=HIDDEN, max_len=4, layers=1, dropout=0.0)
    model = build_model(config, rows, n_rows=LEVELS * K)
    ids = [f"{domain}{i}" for i in range(n_items)]
    table = VersionTable(Snapshot(config, export_params(model)), ids, rows)
    batch = store.batch()
    batch.put("meta", domain_counters_key(domain), DomainCounters(items=n_items).encode())
    record = add_version(
        store,
        batch,
        domain,
        VersionRecord(0, None, 0.0, "cb", {}, {}, status=PUBLISHED),
        table,
        keep=5,
    )
    store.write(batch)
    return record.version


def _rollback(store: MemoryPartition, domain: str, to: int) -> None:
    batch = store.batch()
    rollback(store, batch, domain, to=to)
    store.write(batch)


def _new_codes(start: int, count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(K, size=(count, LEVELS)) + np.arange(LEVELS) * K
    return {f"new{start + i}": rows[i] for i in range(count)}


# -- the rule -----------------------------------------------------------------------------------


def test_the_rule_searches_small_catalogues_exactly_and_large_ones_by_inverted_file() -> None:
    rule = IndexRule.of(Settings())
    assert rule.plan(0).kind is IndexKind.FLAT
    assert rule.plan(20_000) == IndexPlan(IndexKind.FLAT)  # the default: exact up to 20k
    assert rule.plan(20_001).kind is IndexKind.IVF
    big = rule.plan(1_000_000)
    assert big.kind is IndexKind.IVF and big.nlist == 1000  # ~sqrt(n) cells
    assert big.train_items == 64_000  # the coarse quantizer's sample is bounded
    assert rule.plan(100_001).nlist == 316
    small = IndexRule.of(SMALL)
    assert small.plan(300).kind is IndexKind.FLAT
    assert small.plan(301) == IndexPlan(IndexKind.IVF, 17, 301)  # the whole set trains
    assert small.plan(5000) == IndexPlan(IndexKind.IVF, 71, 4544)


def test_the_inverted_file_reaches_the_recall_of_its_rule_against_exact_search() -> None:
    x = _clustered(6000, 64, seed=0)
    rule = IndexRule(exact_max_items=500)
    built = build_search_index(x, rule)
    assert built is not None and built.kind is IndexKind.IVF
    assert 1 <= built.nprobe < built.plan.nlist  # approximate: not every cell is searched
    exact = faiss.IndexFlatIP(64)
    exact.add(x)
    queries = sample_queries(x, 500, seed=99)  # not the calibration's queries
    want, _ = exact.search(queries, 10)
    got, ids = built.search(queries, 10)
    assert recall_at(got, want) >= 0.95
    assert (ids >= 0).all()
    # its answers are real items with their true scores
    np.testing.assert_allclose(got[:, 0], (queries * x[ids[:, 0]]).sum(axis=1), atol=1e-5)


def test_a_build_stops_between_chunks() -> None:
    x = _clustered(4000, 16, seed=1)
    stop = threading.Event()
    stop.set()
    assert build_search_index(x, IndexRule(exact_max_items=100, chunk=500), stop) is None


# -- live adds and swaps under concurrent reads ---------------------------------------------------


@pytest.fixture
def store() -> Iterator[MemoryPartition]:
    s = MemoryPartition()
    yield s
    s.close()


def test_live_adds_and_swaps_under_concurrent_reads(store: MemoryPartition) -> None:
    n = 1500
    serving = Serving(store, SMALL)
    _publish(store, "shop", seed=1, n_items=n)
    assert serving.refresh() == ["shop"]
    first = serving.index("shop")
    assert first.kind == "ivf" and first.version == 1
    errors: list[BaseException] = []
    seen: set[int] = set()
    done = threading.Event()

    def read(worker: int) -> None:
        rng = np.random.default_rng(worker)
        try:
            while not done.is_set():
                index = serving.index("shop")
                item = f"shop{int(rng.integers(n))}"
                found = index.similar(item, 10)
                assert len(found) == 10 and item not in [f.item_id for f in found]
                assert index.version in (1, 2)
                seen.add(index.version)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(w,)) for w in range(4)]
    for t in readers:
        t.start()
    for batch in range(10):  # live adds into version 1's index while it is read
        serving.apply_codes("shop", _new_codes(batch * 20, 20, seed=batch))
    _publish(store, "shop", seed=2, n_items=n)
    swapper = threading.Thread(target=serving.refresh)
    swapper.start()
    batch = 10
    while swapper.is_alive() or batch < 13:  # live adds racing the build and the swap
        serving.apply_codes("shop", _new_codes(batch * 20, 20, seed=batch))
        batch += 1
    swapper.join()
    time.sleep(0.2)
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert seen == {1, 2}
    applied = [f"new{i}" for i in range(batch * 20)]
    assert first.ids[n:] == applied  # the old index (now cached) took every live item
    second = serving.index("shop")
    assert second.version == 2 and len(set(second.ids)) == len(second.ids)
    # the new one: the items of every batch since its build began (those before it are
    # read from the committed code state in the worker; here there is none), none lost
    live = second.ids[n:]
    assert live and set(live) == set(applied[len(applied) - len(live) :])
    assert applied[-20:] == live[-20:]  # the batches after the swap
    for item in (live[0], live[-1]):
        top = second.search(second.vector(item), 1, set())
        assert top[0].score == pytest.approx(1.0, abs=1e-5)  # searchable at once


def test_a_re_vectored_live_item_moves_in_the_inverted_file(store: MemoryPartition) -> None:
    serving = Serving(store, SMALL)
    _publish(store, "shop", seed=1, n_items=800)
    serving.refresh()
    index = serving.index("shop")
    codes = _new_codes(0, 1, seed=5)
    serving.apply_codes("shop", codes)
    before = index.vector("new0")
    moved = {"new0": np.asarray([K - 1, 2 * K - 1, 3 * K - 1])}  # another code
    serving.apply_codes("shop", moved)
    after = index.vector("new0")
    assert not np.allclose(before, after) and len(index) == 801
    top = index.search(after, 1, set())
    assert top[0].item_id == "new0" or top[0].score == pytest.approx(1.0, abs=1e-5)


# -- cached versions ------------------------------------------------------------------------------


def test_a_rollback_to_a_cached_version_swaps_without_a_build(store: MemoryPartition) -> None:
    serving = Serving(store, SMALL)
    _publish(store, "shop", seed=1, n_items=400)
    serving.refresh()
    _publish(store, "shop", seed=2, n_items=400)
    serving.refresh()
    assert serving.builds == 2 and serving.cached_versions("shop") == [1]
    serving.apply_codes("shop", _new_codes(0, 3, seed=7))  # coded while 2 is served
    _rollback(store, "shop", 1)
    assert serving.refresh(["shop"]) == ["shop"]
    assert serving.builds == 2 and serving.cache_hits == 1  # no build
    held = serving.index("shop")
    assert held.version == 1 and "new2" in held.pos  # kept current while cached
    assert serving.cached_versions("shop") == [2]
    _rollback(store, "shop", 2)  # and back: cached too
    serving.refresh(["shop"])
    assert serving.index("shop").version == 2 and serving.builds == 2
    # a third version evicts the least recently served (index_cache_versions=1)
    _publish(store, "shop", seed=3, n_items=400)
    serving.refresh(["shop"])
    assert serving.builds == 3 and serving.cached_versions("shop") == [2]
    _rollback(store, "shop", 1)
    serving.refresh(["shop"])
    assert serving.builds == 4 and serving.index("shop").version == 1


def test_without_a_cache_a_rollback_builds(store: MemoryPartition) -> None:
    serving = Serving(store, replace(SMALL, index_cache_versions=0))
    _publish(store, "shop", seed=1, n_items=50)
    _publish(store, "shop", seed=2, n_items=50)
    serving.refresh()
    _rollback(store, "shop", 1)
    serving.refresh()
    assert serving.builds == 2 and serving.cached_versions("shop") == []


# -- the refresher ----------------------------------------------------------------------------------


def _wait(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.01)
    return False


def _served(serving: Serving, domain: str) -> int | None:
    try:
        return serving.index(domain).version
    except ServingError:
        return None


def test_the_refresher_reacts_to_a_notification_not_to_its_poll(store: MemoryPartition) -> None:
    swaps: list[tuple[str, int | None, int]] = []
    serving = Serving(store, SMALL, on_swap=lambda d, old, new: swaps.append((d, old, new)))
    for d in ("a", "b", "c"):
        _publish(store, d, seed=1, n_items=20)
    serving.start()  # the first pass reads every domain
    try:
        assert _wait(lambda: len(swaps) == 3)
        _publish(store, "b", seed=2, n_items=20)
        _publish(store, "c", seed=2, n_items=20)  # moved, but nobody says so
        time.sleep(0.3)
        assert _served(serving, "b") == 1  # the poll is 60 s away: nothing moved yet
        started = time.monotonic()
        serving.wake(["b"])  # what the daemon does when a fine-tune announces a publish
        assert _wait(lambda: _served(serving, "b") == 2, timeout=5.0)
        assert time.monotonic() - started < 5.0
        assert _served(serving, "c") == 1  # only the notified domain was read
        serving.wake()  # a full check (what the slow poll does)
        assert _wait(lambda: _served(serving, "c") == 2)
    finally:
        serving.stop()
    assert swaps[3:] == [("b", 1, 2), ("c", 1, 2)]


@pytest.mark.parametrize("threads", [1, 2])
def test_indexes_are_built_with_the_background_threads_setting(
    store: MemoryPartition, threads: int
) -> None:
    """The index thread sets its own OpenMP threads (threads start at one per core) to
    ``background_threads``: a build on every core starved the consumer and the API."""
    seen: list[int] = []
    settings = replace(SMALL, background_threads=threads)
    serving = Serving(store, settings, on_swap=lambda *_: seen.append(faiss.omp_get_max_threads()))
    _publish(store, "a", seed=1, n_items=20)
    serving.start()
    try:
        assert _wait(lambda: len(seen) == 1)
    finally:
        serving.stop()
    assert seen == [threads]


class CountingStore(MemoryPartition):
    """An in-memory store that counts its point reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, cf: str, key: bytes) -> bytes | None:
        self.reads += 1
        return super().get(cf, key)


def test_a_notification_reads_only_the_notified_domains() -> None:
    store = CountingStore()
    for d in range(50):
        _publish(store, f"d{d}", seed=d, n_items=5)
    serving = Serving(store, SMALL)
    serving.refresh()
    store.reads = 0
    assert serving.refresh(["d7"]) == []
    assert store.reads == 1  # one pointer read, whatever the number of domains
    _publish(store, "d7", seed=99, n_items=5)
    store.reads = 0
    assert serving.refresh(["d7"]) == ["d7"]
    reads_of_a_swap = store.reads
    store.reads = 0
    serving.refresh()  # the fallback poll: every domain's pointer
    assert store.reads >= 50 and reads_of_a_swap < 50
