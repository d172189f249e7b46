"""Operator actions on versions, done directly or through the control topic.

With the worker stopped, the CLI opens the state and acts on it (one atomic
batch). With the worker running (the state is locked), it sends the command to
the control topic; the worker applies it in order with its next batch.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaProducer

from store.exceptions import StateLockedError
from store.rocksdb import RocksDBPartition
from worker.commands.inspection import open_state_readonly
from worker.core.exceptions import WorkerError
from worker.core.settings import Settings
from worker.ingest.coding import CodeService
from worker.ingest.events import control_payload
from worker.ingest.exceptions import KafkaUnavailableError
from worker.ingest.group import command_calls
from worker.ingest.kafka_calls import KafkaCall, close_producer
from worker.state.exceptions import VersionError
from worker.state.requests import pending_request_doc
from worker.state.versions import (
    current_version,
    export_arrays,
    list_records,
    load_table,
    rollback,
    switches,
)
from worker.tuning.finetune import FineTuner, Outcome


def send_control(settings: Settings, op: str, domain: str, **fields: Any) -> None:
    """Send a control command to the running worker (waits out a broker outage for at most
    :data:`~worker.ingest.group.COMMAND_WAIT_S`, then names what to do)."""

    def send() -> None:
        producer = KafkaProducer(**settings.kafka_common(), acks="all", max_block_ms=5_000)
        try:
            producer.send(
                settings.topic("control"),
                key=domain.encode(),
                value=control_payload(op, domain, **fields),
            ).get(timeout=10)
        finally:
            close_producer(producer, 5, "control")

    try:
        command_calls(settings).call(KafkaCall.CONTROL_SEND, send)
    except KafkaUnavailableError as exc:
        raise KafkaUnavailableError(
            f"the worker holds {settings.state_dir} and Kafka at {settings.kafka_bootstrap} did "
            f"not take the {op} command ({exc}); start the broker or stop the worker to act on "
            "the state directly"
        ) from exc


def do_rollback(settings: Settings, domain: str, to: int | None, previous: bool) -> str:
    try:
        store = RocksDBPartition.open(settings.state_path, sync_writes=settings.sync_writes)
    except StateLockedError:
        send_control(settings, "rollback", domain, version=to, previous=previous)
        return (
            f"the worker is running: rollback of {domain} sent on {settings.topic('control')}; "
            f"it is applied with the worker's next batch (check: adacode versions --domain {domain})"
        )
    try:
        batch = store.batch()
        old, new = rollback(store, batch, domain, to=to, previous=previous)
        store.write(batch)
    finally:
        store.close()
    return f"{domain}: current version {old} -> {new}"


def do_finetune(settings: Settings, domain: str) -> Outcome | str:
    """Fine-tune ``domain`` on the state now and answer its outcome (``outcome.status``
    says published, rejected or why it skipped); with the worker running, ask it on the
    control topic instead and answer what was sent."""
    try:
        store = RocksDBPartition.open(settings.state_path, sync_writes=settings.sync_writes)
    except StateLockedError:
        send_control(settings, "finetune", domain)
        return (
            f"the worker is running: fine-tune of {domain} requested on {settings.topic('control')}"
        )
    try:
        return FineTuner(store, settings).run(domain)
    finally:
        store.close()


def do_migrate(settings: Settings) -> str:
    """Ask for a live codebook migration (see :meth:`CodeService.request_migration`): on
    the control topic while the worker runs, else saved in the state for its next start."""
    try:
        store = RocksDBPartition.open(settings.state_path, sync_writes=settings.sync_writes)
    except StateLockedError:
        send_control(settings, "migrate", "")
        return f"the worker is running: codebook migration requested on {settings.topic('control')}"
    try:
        codes = CodeService(store, settings)
        if codes.codebook is None:
            raise WorkerError("there is no codebook yet: nothing to migrate from")
        batch = store.batch()
        requested = codes.request_migration(batch, "adacode codebook migrate")
        store.write(batch)
    finally:
        store.close()
    if not requested:
        return "a codebook migration is already under way: it goes on when the worker starts"
    return "codebook migration requested: the worker trains the candidate when it starts"


def versions_report(settings: Settings, domain: str) -> dict[str, Any]:
    with open_state_readonly(settings) as store:
        return {
            "domain": domain,
            "current": current_version(store, domain),
            "versions": [r.__dict__ for r in list_records(store, domain)],
            "switches": switches(store, domain),
            # a fine-tune requested on the control topic whose outcome is not final yet
            "pending_finetune": pending_request_doc(store, domain),
        }


def export_version(
    settings: Settings, domain: str, version: int | None, out: Path
) -> dict[str, Any]:
    """Write a version's item vectors and table rows as .npz, with a manifest beside it."""
    with open_state_readonly(settings) as store:
        v = version if version is not None else current_version(store, domain)
        if v is None:
            raise VersionError(
                f"domain {domain!r} has no published version to export; run "
                f"adacode finetune --domain {domain} first"
            )
        table = load_table(store, domain, v)
        record = next(r for r in list_records(store, domain) if r.version == v)
    arrays, described = export_arrays(table, borrow=settings.serve_borrow_trained)
    vectors = arrays["item_vectors"]
    manifest = {
        "format": "adacode-export-v1",
        "domain": domain,
        "version": v,
        "parent": record.parent,
        "codebook_id": record.codebook_id,
        "created_at": record.created_at,
        "exported_at": time.time(),
        "metrics": record.metrics,
        "watermark": record.watermark,
        "n_items": len(table.item_ids),
        "dim": int(vectors.shape[1]),
        "model_config": table.snapshot.config.to_dict(),
        "arrays": described,
    }
    buf = io.BytesIO()
    arrays["manifest"] = np.frombuffer(orjson.dumps(manifest), dtype=np.uint8)
    np.savez(buf, allow_pickle=False, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    out.with_suffix(out.suffix + ".manifest.json").write_bytes(
        orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
    )
    return manifest


def format_versions(doc: dict[str, Any]) -> str:
    """The versions table of :func:`versions_report`, with every switch."""
    lines: list[str] = []
    lines.append(f"domain {doc['domain']}: current version {doc['current']}")
    lines.append(
        f"{'':2}{'version':>7} {'parent':>6} {'status':10} {'created':19} {'recall@10':>9} "
        f"{'vs current':>10} {'ndcg@10':>8} {'items':>6} {'train s':>7}  note"
    )
    for r in doc["versions"]:
        m = r["metrics"]
        mark = "*" if r["version"] == doc["current"] else " "
        pin = " (pinned)" if r["pinned"] else ""
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        base = m.get("current_recall@10")
        lines.append(
            f"{mark:2}{r['version']:>7} {r['parent'] if r['parent'] is not None else '-':>6} "
            f"{r['status']:10} {created:19} {m.get('recall@10', 0):9.4f} "
            f"{base if base is None else round(base, 4)!s:>10} {m.get('ndcg@10', 0):8.4f} "
            f"{r['n_items']:6d} {m.get('train_s', 0):7.1f}  {r['note']}{pin}"
        )
    lines.append("switches:")
    for sw in doc["switches"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sw["at"]))
        lines.append(f"  {at}  {sw['from']} -> {sw['to']}  ({sw['reason']})")
    pending = doc.get("pending_finetune")
    if pending is not None:
        at = pending["requested_at"]
        when = "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        lines.append(f"pending fine-tune: requested {when} ({pending['source']})")
    return "\n".join(lines)
