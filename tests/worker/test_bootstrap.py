"""The codebook bootstrap's building blocks: a deterministic bounded sample streamed from
``items`` (memory and RocksDB stores), and training it in a background thread that a stop
ends within seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantize.codebook import ResidualCodebook, suggest_shape
from store import MemoryPartition, RocksDBPartition, StorePartition
from store.records import ItemRecord
from worker.core.settings import Settings
from worker.core.threads import STEP_ASIDE_MAX_S, Foreground
from worker.ingest.bootstrap import (
    Bootstrap,
    BootstrapPhase,
    SampleScan,
    choose_sample,
    sample_cap,
    sample_rank,
    sample_ranks,
    scan_sample,
)
from worker.ingest.exceptions import BootstrapError, BootstrapStopped
from worker.state.layout import item_key

DIM = 16
S = Settings(embedding_dim=DIM, topic_prefix="t.")


def vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim))
    return (centres[rng.integers(0, 10, n)] + 0.3 * rng.normal(size=(n, dim))).astype("<f4")


def rows(n: int, *, placeholders: int = 0, seed: int = 0, dim: int = DIM) -> dict[bytes, bytes]:
    """``n`` items with embeddings over two domains, plus ``placeholders`` without."""
    out: dict[bytes, bytes] = {}
    for i, vec in enumerate(vectors(n, seed, dim)):
        key = item_key("shop" if i % 3 else "news", f"i{i}")
        out[key] = ItemRecord(i, i, b"h", vec.tobytes()).encode()
    for j in range(placeholders):
        out[item_key("shop", f"p{j}")] = ItemRecord(j, j, placeholder=True).encode()
    return out


def fill(store: StorePartition, items: dict[bytes, bytes], order: list[bytes], per: int) -> None:
    """Write ``items`` in ``order``, ``per`` to a batch (as events would arrive)."""
    for start in range(0, len(order), per):
        batch = store.batch()
        for key in order[start : start + per]:
            batch.put("items", key, items[key])
        store.write(batch)


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorePartition]:
    opened: StorePartition = (
        MemoryPartition() if request.param == "memory" else RocksDBPartition.open(tmp_path / "s")
    )
    yield opened
    opened.close()


def expected_sample(items: dict[bytes, bytes], cap: int) -> list[bytes]:
    """By the definition: the ``cap`` embedded items of smallest rank."""
    embedded = [k for k, v in items.items() if ItemRecord.decode(v).embedding]
    ranked = sorted(embedded, key=sample_rank)
    return sorted(ranked[:cap])


# -- choose_sample ----------------------------------------------------------------------------


def test_sample_is_the_smallest_ranks_whatever_the_order_chunks_and_store(
    store: StorePartition,
) -> None:
    items = rows(900, placeholders=50)
    keys = list(items)
    np.random.default_rng(1).shuffle(keys)  # type: ignore[arg-type]
    fill(store, items, keys, per=97)
    other = MemoryPartition()
    fill(other, items, sorted(keys, reverse=True), per=500)
    never = threading.Event()
    want = expected_sample(items, 300)
    for chunk in (1, 7, 64, 4096):
        assert choose_sample(store, 300, stop_event=never, chunk=chunk) == want
    assert choose_sample(other, 300, stop_event=never) == want
    scan = scan_sample(store, 300, stop_event=never, chunk=13)
    assert scan.keys == want and scan.n_items == 900


def test_sample_is_bounded_and_skips_items_without_embeddings(store: StorePartition) -> None:
    items = rows(120, placeholders=30)
    items[item_key("shop", "empty")] = ItemRecord(1, 1, b"h", b"").encode()
    fill(store, items, list(items), per=1000)
    never = threading.Event()
    everything = choose_sample(store, 10_000, stop_event=never)
    assert len(everything) == 120 and everything == sorted(everything)
    assert all(ItemRecord.decode(items[k]).embedding for k in everything)
    assert len(choose_sample(store, 50, stop_event=never)) == 50
    # a grown catalogue keeps every old member whose rank still makes the cut
    small = set(choose_sample(store, 50, stop_event=never))
    more = rows(240, placeholders=0)
    fill(store, more, list(more)[120:], per=1000)
    grown = set(choose_sample(store, 50, stop_event=never))
    assert grown == set(expected_sample({**items, **more}, 50))
    cut = max(sample_rank(k) for k in grown)
    assert {k for k in small if sample_rank(k) <= cut} <= grown


def test_bulk_ranks_equal_the_rank_of_each_key() -> None:
    keys = [b"", b"a", b"shop\x00i1", *(f"d\x00item-{i}".encode() for i in range(500))]
    ranks = sample_ranks(keys)
    assert ranks.dtype == np.uint64 and [int(r) for r in ranks] == [sample_rank(k) for k in keys]
    assert sample_ranks([]).shape == (0,)


def test_sample_cap_follows_the_configured_k() -> None:
    assert sample_cap(S) == 256 * 256
    assert sample_cap(Settings(embedding_dim=DIM, topic_prefix="t.", code_k=16)) == 16 * 256


def test_a_set_stop_event_ends_the_scan(store: StorePartition) -> None:
    items = rows(50)
    fill(store, items, list(items), per=1000)
    stop = threading.Event()
    stop.set()
    with pytest.raises(BootstrapStopped):
        choose_sample(store, 10, stop_event=stop)


# -- Bootstrap ----------------------------------------------------------------------------


def wait_for(boot: Bootstrap, timeout: float = 60.0) -> ResidualCodebook:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = boot.poll()
        if found is not None:
            return found
        time.sleep(0.01)
    raise AssertionError(f"no codebook within {timeout} s (phase {boot.phase})")


def test_trains_in_the_background_while_the_caller_goes_on(store: StorePartition) -> None:
    items = rows(6000)
    fill(store, items, list(items), per=2000)
    never = threading.Event()
    scan = scan_sample(store, sample_cap(S), stop_event=never)
    boot = Bootstrap(store, S, never)
    assert boot.phase is BootstrapPhase.IDLE and boot.poll() is None
    boot.start(scan.keys, scan.n_items)
    assert boot.poll() is None and boot.running  # start does not wait for the training
    written = 0
    while boot.poll() is None and boot.phase is BootstrapPhase.RUNNING:
        batch = store.batch()  # events keep arriving and being applied meanwhile
        key = item_key("shop", f"late{written}")
        batch.put("items", key, ItemRecord(0, 0, b"h", vectors(1, written).tobytes()).encode())
        store.write(batch)
        written += 1
    codebook = wait_for(boot)
    assert written >= 1 and boot.phase is BootstrapPhase.READY and not boot.running
    levels, k = suggest_shape(6000)
    assert (codebook.levels, codebook.k, codebook.dim) == (levels, k, DIM)
    # up to the cap the sample is every item, in key order: the same codebook as training on all
    full = np.stack([ItemRecord.decode(items[key]).vector() for key in sorted(items)])
    assert codebook.codebook_id == ResidualCodebook.train(full, levels, k, seed=0).codebook_id


def test_same_sample_and_data_give_the_same_codebook(tmp_path: Path) -> None:
    items = rows(3000, placeholders=20)
    settings = Settings(embedding_dim=DIM, topic_prefix="t.", code_k=8, code_levels=3)
    ids = []
    for name, order in (("a", list(items)), ("b", sorted(items, reverse=True))):
        with RocksDBPartition.open(tmp_path / name) as rocks:
            fill(rocks, items, order, per=333)
            never = threading.Event()
            keys = choose_sample(rocks, 1000, stop_event=never, chunk=77)
            boot = Bootstrap(rocks, settings, never, chunk=100)
            boot.start(keys, 3000)
            ids.append(wait_for(boot).codebook_id)
    memory = MemoryPartition()
    fill(memory, items, list(items), per=3000)
    never = threading.Event()
    boot = Bootstrap(memory, settings, never)
    boot.start(choose_sample(memory, 1000, stop_event=never), 3000)
    codebook = wait_for(boot)
    ids.append(codebook.codebook_id)
    assert len(set(ids)) == 1
    assert (codebook.levels, codebook.k) == (3, 8)


def test_a_stop_ends_training_within_seconds_with_no_result(store: StorePartition) -> None:
    items = rows(20_000, dim=64)
    fill(store, items, list(items), per=5000)
    settings = Settings(embedding_dim=64, topic_prefix="t.", code_k=64, code_levels=400)
    stop = threading.Event()
    boot = Bootstrap(store, settings, stop)
    boot.start(choose_sample(store, sample_cap(settings), stop_event=stop), 20_000)
    time.sleep(0.5)
    assert boot.running  # 400 levels take far longer than half a second
    stop.set()
    started = time.monotonic()
    assert boot.join(timeout=10)
    assert time.monotonic() - started < 5
    assert boot.phase is BootstrapPhase.STOPPED and boot.poll() is None and boot.error is None


def test_a_failure_is_kept_and_raised_by_poll(store: StorePartition) -> None:
    items = rows(300, dim=8)  # stored 8-float embeddings, but the settings say 16
    fill(store, items, list(items), per=1000)
    never = threading.Event()
    boot = Bootstrap(store, S, never)
    boot.start(choose_sample(store, 1000, stop_event=never), 300)
    assert boot.join(timeout=30)
    assert boot.phase is BootstrapPhase.FAILED
    with pytest.raises(BootstrapError, match="embedding_dim is 16"):
        boot.poll()
    assert isinstance(boot.error, BootstrapError)
    with pytest.raises(BootstrapError, match="already started"):
        boot.start([], 0)


class Group:
    """An in-process CodebookSource: the first codebook offered wins."""

    def __init__(self, existing: ResidualCodebook | None = None) -> None:
        self.codebook = existing
        self.offered: list[str] = []

    def current(self) -> ResidualCodebook | None:
        return self.codebook

    def seen(self) -> list[ResidualCodebook] | None:
        return None if self.codebook is None else [self.codebook]

    def agree(self, candidate: ResidualCodebook) -> ResidualCodebook:
        self.offered.append(candidate.codebook_id)
        if self.codebook is None:
            self.codebook = candidate
        return self.codebook


def test_the_group_codebook_wins_and_a_trained_one_is_offered() -> None:
    store = MemoryPartition()
    items = rows(500)
    fill(store, items, list(items), per=1000)
    never = threading.Event()
    keys = choose_sample(store, 1000, stop_event=never)
    theirs = ResidualCodebook.train(vectors(300, seed=9), 2, 8, seed=0)
    boot = Bootstrap(store, S, never, group=Group(theirs))
    boot.start(keys, 500)
    assert wait_for(boot).codebook_id == theirs.codebook_id
    group = Group()
    boot = Bootstrap(store, S, never, group=group)
    boot.start(keys, 500)
    ours = wait_for(boot)
    assert group.offered == [ours.codebook_id] and group.codebook is ours


def test_start_scan_chooses_the_sample_in_the_thread(store: StorePartition) -> None:
    items = rows(2000, placeholders=10)
    fill(store, items, list(items), per=700)
    never = threading.Event()
    settings = Settings(embedding_dim=DIM, topic_prefix="t.", code_k=8, code_levels=3)
    given = Bootstrap(store, settings, never)
    given.start(choose_sample(store, 500, stop_event=never), 2000)
    scanned = Bootstrap(store, settings, never, chunk=33)
    scanned.start_scan(500)
    assert wait_for(scanned).codebook_id == wait_for(given).codebook_id
    stop = threading.Event()
    stop.set()
    stopped = Bootstrap(store, settings, stop)
    stopped.start_scan(500)
    assert stopped.join(timeout=10) and stopped.phase is BootstrapPhase.STOPPED


# -- stepping aside for the foreground --------------------------------------------------------


class _Takes(MemoryPartition):
    """A memory partition that counts the chunks its scans take."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    def _take(self, rows: Iterator[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
        self.taken += 1
        return super()._take(rows, n)


def test_foreground_steps_nest_and_overlap_and_end_idle() -> None:
    fg = Foreground()
    assert fg.idle and fg.wait_idle(0)
    with fg.busy():
        assert not fg.idle and not fg.wait_idle(0.01)
        with fg.busy():  # a scrape during a round
            assert not fg.idle
        assert not fg.idle  # the round still runs
    assert fg.idle
    with pytest.raises(RuntimeError), fg.busy():
        raise RuntimeError("a failed step")
    assert fg.idle  # a step that raised ends too


def test_a_scan_takes_no_chunk_while_a_foreground_step_runs() -> None:
    items = rows(50)
    store = _Takes()
    fill(store, items, sorted(items), per=50)
    fg = Foreground()
    found: list[SampleScan] = []
    scan = threading.Thread(
        target=lambda: found.append(
            scan_sample(store, 20, stop_event=threading.Event(), chunk=10, foreground=fg)
        )
    )
    with fg.busy():
        scan.start()
        time.sleep(0.2)
        assert store.taken == 0 and scan.is_alive()  # waiting before its first chunk
    scan.join(10)
    assert not scan.is_alive() and store.taken == 6  # 5 chunks of 10, then the empty one
    assert found[0].keys == expected_sample(items, 20) and found[0].n_items == 50


def test_a_foreground_step_that_never_ends_does_not_stall_a_scan_or_its_stop() -> None:
    items = rows(30)
    store = _Takes()
    fill(store, items, sorted(items), per=30)
    fg = Foreground()
    with fg.busy():  # held for the whole scan: each chunk waits at most STEP_ASIDE_MAX_S
        started = time.monotonic()
        scan = scan_sample(store, 10, stop_event=threading.Event(), chunk=10, foreground=fg)
        assert time.monotonic() - started < 4 * STEP_ASIDE_MAX_S + 5
        assert scan.keys == expected_sample(items, 10) and store.taken == 4
        stop = threading.Event()
        stop.set()
        with pytest.raises(BootstrapStopped):
            scan_sample(store, 10, stop_event=stop, chunk=10, foreground=fg)
