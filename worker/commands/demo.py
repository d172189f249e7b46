"""The end-to-end demo behind ``ops/demo.sh``: topics, worker, replay, summary.

It drives the real pieces as a user would: ``adacode topics create``, a worker
daemon in a subprocess (``adacode run``), ``adacode replay`` of a dataset, then
read-only inspection of the worker's RocksDB while it still runs.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from store.partition import StorePartition
from worker.commands.dataset import read_interactions, read_items
from worker.commands.inspection import find_item, open_state_readonly, stats
from worker.commands.launch import WorkerProcess
from worker.commands.operations import do_finetune, do_rollback, format_versions, versions_report
from worker.commands.replay import make_producer, replay
from worker.commands.synthetic import generate
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import item_payload
from worker.state.reads import iter_popularity
from worker.state.versions import VersionRecord, current_version, get_record


def _end_offsets(settings: Settings, topics: list[str]) -> dict[tuple[str, int], int]:
    consumer = KafkaConsumer(**settings.kafka_common(), enable_auto_commit=False)
    try:
        consumer.topics()
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        return {
            (tp.topic, tp.partition): off for tp, off in consumer.end_offsets(tps).items() if off
        }
    finally:
        consumer.close()


def _applied(settings: Settings) -> dict[tuple[str, int], int]:
    if not (settings.state_path / "CURRENT").exists():
        return {}
    with open_state_readonly(settings) as store:
        return store.offsets()


def _wait_caught_up(settings: Settings, worker: WorkerProcess, timeout_s: float) -> float:
    topics = [settings.topic("items"), settings.topic("interactions")]
    end = _end_offsets(settings, topics)
    total = sum(end.values())
    started = time.monotonic()
    last_print, last_done = 0.0, -1
    while True:
        applied = _applied(settings)
        done = sum(min(applied.get(tp, 0), off) for tp, off in end.items())
        now = time.monotonic()
        if done >= total:
            return now - started
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with status {worker.returncode}; see its log")
        if now - started > timeout_s:
            raise SystemExit(f"the worker applied {done}/{total} events in {timeout_s:.0f} s")
        # on progress every 2 s; while one batch runs (e.g. the codebook's first training),
        # every 15 s
        if now - last_print > (2 if done != last_done else 15):
            print(f"  worker applied {done:,}/{total:,} events ({now - started:.0f} s)", flush=True)
            last_print, last_done = now, done
        time.sleep(0.5)


def _most_popular(store: StorePartition, domain: str) -> dict[str, Any] | None:
    best, best_count = None, -1
    for item_id, pop in iter_popularity(store, domain):
        if pop.count > best_count:
            best, best_count = item_id, pop.count
    if best is None:
        return None
    found = find_item(store, best, domain)
    return found[0] if found else None


def _record(settings: Settings, domain: str, version: int) -> VersionRecord | None:
    if not (settings.state_path / "CURRENT").exists():
        return None
    with open_state_readonly(settings) as store:
        return get_record(store, domain, version)


def _wait_version(settings: Settings, domain: str, version: int, worker: WorkerProcess) -> str:
    """Wait until version ``version`` exists (published or rejected); describe it."""
    started = time.monotonic()
    while (rec := _record(settings, domain, version)) is None:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with status {worker.returncode}; see its log")
        if time.monotonic() - started > 900:
            raise SystemExit(f"no version {version} of {domain} after 900 s; see the worker log")
        time.sleep(1)
    m = rec.metrics
    base = m.get("current_recall@10")
    versus = "" if base is None else f" (current version: {base:.4f})"
    return (
        f"version {rec.version} {rec.status} after {time.monotonic() - started:.0f} s: "
        f"Recall@10 {m['recall@10']:.4f}{versus} on {int(m['holdout_users'])} held-out users, "
        f"{rec.note}, {m['train_s']:.1f} s of training"
    )


def _wait_current(settings: Settings, domain: str, version: int, worker: WorkerProcess) -> None:
    started = time.monotonic()
    while True:
        with open_state_readonly(settings) as store:
            if current_version(store, domain) == version:
                return
        if worker.poll() is not None or time.monotonic() - started > 120:
            raise SystemExit(f"{domain} did not switch to version {version}; see the worker log")
        time.sleep(0.5)


def _http(
    settings: Settings, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    url = f"http://{settings.http_host}:{settings.http_port}{path}"
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")


#: the demo's cold-start check: neighbours read, history length, the k a user sees, how deep
#: the new item's rank is looked for
NEIGHBOURS_K = 50
HISTORY_LEN = 5
TOP_K = 10
RANK_K = 200


def _cold_start(
    settings: Settings, domain: str, head: dict[str, Any] | None, dataset: Path
) -> None:
    """Produce a brand-new item while the worker runs; time until the API serves it, then
    ask for a recommendation that should contain it and say where it is, or that it is not.

    The request is the honest case for a new item: a user whose recent items are the new
    item's nearest neighbours (the most similar one last, i.e. most recent), with
    ``exclude_history`` so the neighbours themselves are not recommended back. Whether the
    new item comes out depends on the model (a sequence model predicts the *next* item,
    which need not be the nearest one), so its rank is printed as found, down to
    ``RANK_K``, and the top ``TOP_K`` a user would see is said to hold it or not.
    """
    if head is None or not settings.http_port:
        return
    head_text = next((i.text for i in read_items(dataset) if i.item_id == head["item_id"]), "")
    text = f"new arrival: {head_text or head['item_id']}"
    new_id = f"new-{int(time.time())}"
    print(f"12. a brand-new item {new_id!r} arrives while the worker runs: {text[:80]!r}")
    producer = make_producer(settings)
    started = time.perf_counter()
    producer.send(
        settings.topic("items"),
        key=domain.encode(),
        value=item_payload(new_id, domain, int(time.time()), text=text),
    )
    producer.flush()
    producer.close()
    similar_path = f"/v1/domains/{domain}/items/{new_id}/similar?k={NEIGHBOURS_K}"
    while True:
        status, similar = _http(settings, "GET", similar_path)
        if status == 200:
            break
        if time.perf_counter() - started > 60:
            print(f"   NOT served after 60 s (last answer {status}: {similar})")
            return
        time.sleep(0.01)
    took = time.perf_counter() - started
    neighbours = similar["items"]
    print(
        f"   served {took * 1000:.0f} ms after it was produced (text encoded, coded, added to "
        f"version {similar['version']}'s index; no training); its most similar items:"
    )
    for n in neighbours[:5]:
        print(f"     {n['item_id']:>12}  {n['score']:.3f}")
    twins = sum(n["score"] >= 1.0 - 1e-5 for n in neighbours)
    print(
        f"   {twins} of its {len(neighbours)} nearest items have exactly its vector (tied)"
        if twins
        else f"   its vector is its own: none of its {len(neighbours)} nearest items ties with it"
    )
    if not neighbours:
        print("   no neighbours, so no history to recommend from")
        return
    history = [n["item_id"] for n in neighbours[:HISTORY_LEN]][::-1]  # most similar last
    asked = time.perf_counter()
    status, rec = _http(
        settings,
        "POST",
        f"/v1/domains/{domain}/recommend",
        {"history": history, "k": RANK_K, "exclude_history": True},
    )
    rec_ms = (time.perf_counter() - asked) * 1000
    if status != 200:
        print(f"   the recommendation failed ({status}: {rec})")
        return
    ids = [n["item_id"] for n in rec["items"]]
    who = f"a user whose last {len(history)} items are its nearest neighbours"
    if new_id in ids[:TOP_K]:
        verdict = f"HAS it at rank {ids.index(new_id) + 1} of the top {TOP_K}"
    elif new_id in ids:
        verdict = (
            f"does NOT have it in the top {TOP_K}: it is at rank {ids.index(new_id) + 1} "
            f"of {len(ids)}"
        )
    else:
        verdict = f"does NOT have it in the top {TOP_K}, nor in the top {len(ids)}"
    print(f"   recommendation for {who} (exclude_history, answered in {rec_ms:.0f} ms): {verdict}")
    print(f"   its top {min(3, len(ids))}: {', '.join(ids[:3])}")


def run_demo(settings: Settings, dataset: Path | None, workdir: Path, limit: int | None) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = generate(workdir / "synthetic", n_items=2000, n_users=1500, n_interactions=40_000)
        print(f"1. generated a synthetic dataset in {dataset} (power-law popularity, item texts)")
    else:
        print(f"1. using the dataset in {dataset}")
    n_items = sum(1 for _ in read_items(dataset))
    n_inter = sum(1 for _ in read_interactions(dataset))
    print(f"   {n_items:,} items, {n_inter:,} interactions")

    print(f"2. creating topics on {settings.kafka_bootstrap}")
    for name, status in create_topics(settings).items():
        print(f"   {name:36} {status}")

    print(
        f"3. starting the worker (state in {settings.state_dir}, log in {workdir / 'worker.log'})"
    )
    env = dict(os.environ)
    env.update(
        {
            "ADACODE_STATE_DIR": settings.state_dir,
            "ADACODE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "ADACODE_TOPIC_PREFIX": settings.topic_prefix,
            "ADACODE_HTTP_PORT": str(settings.http_port),
            "ADACODE_FINETUNE_EPOCHS": os.environ.get("ADACODE_FINETUNE_EPOCHS", "6"),
        }
    )
    worker = WorkerProcess.start(env, workdir / "worker.log")
    try:
        total = n_inter if limit is None else min(limit, n_inter)
        first = max(1, int(total * 0.8))
        print(f"4. replaying the dataset into Kafka: items, then the first {first:,} interactions")
        report = replay(settings, dataset, limit=first)
        print(
            f"   produced {report.items:,} items and {report.interactions:,} interactions "
            f"in {report.seconds:.1f} s"
        )
        print("5. waiting for the worker to apply everything (MiniLM encodes the item texts)")
        took = _wait_caught_up(settings, worker, timeout_s=900)
        print(f"   caught up {took:.1f} s after the replay ended")
        print("6. what the worker holds (read from its RocksDB while it runs):")
        with tempfile.TemporaryDirectory(), open_state_readonly(settings) as store:
            doc = stats(store)
            first_item = next(read_items(dataset))
            sample = find_item(store, first_item.item_id, first_item.domain)
            head = _most_popular(store, first_item.domain)
        for domain, c in doc["domains"].items():
            print(
                f"   domain {domain}: {c['items']:,} items, {c['placeholders']:,} placeholders, "
                f"{c['interactions']:,} interactions ({c['logged_interactions']:,} in the log)"
            )
        print(f"   offsets: {doc['offsets']}")
        if sample:
            s = sample[0]
            print(
                f"   item {s['item_id']}: {s['interactions']} interactions, decayed count "
                f"{s['decayed_count']:.3f}, embedding of {s['embedding_dim']} floats"
            )
        cb = doc["codebook"]
        if cb is not None:
            print(
                f"   codebook {cb['id']}: {cb['levels']} levels x {cb['k']} codewords (all domains)"
            )
        for domain, c in doc["codes"].items():
            if c is None:
                continue
            print(
                f"   codes in {domain}: {c['items']:,} coded, {c['head_items']:,} head; collision "
                f"rate head {c['collision_rate_head']:.3f}, all {c['collision_rate_all']:.3f}; "
                f"mean served length head {c['mean_length_head']:.2f}, tail {c['mean_length_tail']:.2f}"
            )
            print(
                f"   code table: {c['table_rows']:,} rows = {c['table_memory_vs_id_table']:.1%} of a "
                f"per-item ID table; code changes {c['changes']}"
            )
        if head is not None:
            head_code: dict[str, Any] = head.get("code") or {}
            print(
                f"   most popular item {head['item_id']}: full path {head_code.get('full_path')}, served "
                f"{head_code.get('served')} (head={head_code.get('head')}), "
                f"{len(head_code.get('history') or [])} code changes"
            )
        domain = first_item.domain
        print(
            f"7. fine-tune {domain} (adacode finetune: the worker runs, so via the control topic)"
        )
        print(f"   {do_finetune(settings, domain)}")
        v1 = _wait_version(settings, domain, 1, worker)
        print(f"   {v1}")
        print(f"8. more events: the last {total - first:,} interactions")
        replay(settings, dataset, limit=total - first, skip=first, items=False, progress=False)
        _wait_caught_up(settings, worker, timeout_s=900)
        print(f"9. fine-tune {domain} again: incremental, from version 1")
        do_finetune(settings, domain)
        print(f"   {_wait_version(settings, domain, 2, worker)}")
        print("10. roll back to version 1 (adacode rollback --to 1, through the control topic)")
        print(f"   {do_rollback(settings, domain, 1, False)}")
        _wait_current(settings, domain, 1, worker)
        print("11. the versions table (adacode versions):")
        print("   " + format_versions(versions_report(settings, domain)).replace("\n", "\n   "))
        _cold_start(settings, domain, head, dataset)
    finally:
        code = worker.stop(timeout_s=60)
        print(f"13. worker stopped (exit status {code})")
    return 0 if code == 0 else 1
