"""The ``adacode`` command line.

Every sub-command takes ``--config FILE`` and the setting flags (see
``adacode config --help-settings``); bad arguments say what is wrong and what is
allowed, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from adacode.errors import AdacodeError
from worker.core.exceptions import WorkerError
from worker.core.logs import setup_logging
from worker.core.settings import (
    Settings,
    add_setting_flags,
    describe_settings,
    flag_overrides,
    load_settings,
)

log = logging.getLogger("adacode")

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO_ROOT / "ops" / "kafka.sh"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer; give a whole number >= 1"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give a whole number >= 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a number >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give a number >= 0")
    return value


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is not a directory; give a dataset directory with items.jsonl and interactions.csv"
        )
    return path


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, flag_overrides(args))


def _print_json(doc: object) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


# --- commands --------------------------------------------------------------------------


def cmd_kafka(args: argparse.Namespace) -> int:
    if not KAFKA_SCRIPT.is_file():
        print(
            f"adacode kafka: error: {KAFKA_SCRIPT} does not exist. `adacode kafka` runs "
            "ops/kafka.sh of a checkout of the adacode repository, which an installed package "
            "does not ship: run it from a checkout (`python -m worker.commands.cli kafka ...` "
            "there, or `pip install -e .` of it); the script needs bash, Java 11+ (e.g. "
            "OpenJDK 17) and Maven (mvn, to fetch the broker jars once). Or run any Kafka "
            "broker yourself and set kafka_bootstrap (ADACODE_KAFKA_BOOTSTRAP).",
            file=sys.stderr,
        )
        return 2
    cmd = ["bash", str(KAFKA_SCRIPT), args.action]
    if args.port:
        cmd += ["--port", str(args.port)]
    if args.data:
        cmd += ["--data", str(args.data)]
    return subprocess.call(cmd)


def cmd_topics(args: argparse.Namespace) -> int:
    from worker.commands.topics import create_topics

    settings = _settings(args)
    for name, status in create_topics(settings, args.partitions).items():
        print(f"{name:40} {status}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from worker.commands.replay import replay

    settings = _settings(args)
    report = replay(
        settings,
        args.dataset,
        rate=args.rate,
        limit=args.limit,
        skip=args.skip,
        items=not args.no_items,
        progress=not args.quiet,
    )
    print(
        f"replayed {report.items} items and {report.interactions} interactions "
        f"in {report.seconds:.1f} s"
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from worker.commands.synthetic import generate

    out = generate(
        args.out,
        domain=args.domain,
        n_items=args.items,
        n_users=args.users,
        n_interactions=args.interactions,
        seed=args.seed,
    )
    print(f"wrote a synthetic dataset to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from worker.core.signals import install_stop_handlers

    stop = install_stop_handlers()  # before the slow imports: an early SIGTERM stops cleanly
    from worker.app.daemon import run_daemon

    settings = _settings(args)
    setup_logging(settings.log_format, settings.log_level)
    return run_daemon(settings, stop, exit_process=True)


def cmd_stats(args: argparse.Namespace) -> int:
    from worker.commands.inspection import open_state_readonly, stats

    settings = _settings(args)
    with open_state_readonly(settings) as store:
        doc = stats(store, settings.codebook_drift_threshold)
    if args.json:
        _print_json(doc)
        return 0
    print(f"{'domain':16} {'items':>8} {'placeholders':>12} {'interactions':>12} {'logged':>10}")
    for domain, c in doc["domains"].items():
        print(
            f"{domain:16} {c['items']:8d} {c['placeholders']:12d} "
            f"{c['interactions']:12d} {c['logged_interactions']:10d}"
        )
    print("offsets: " + ", ".join(f"{k}={v}" for k, v in doc["offsets"].items()))
    cb = doc["codebook"]
    if cb is None:
        print("codebook: none yet (trained once codebook_min_items items have embeddings)")
        return 0
    print(f"codebook {cb['id']}: {cb['levels']} levels x {cb['k']} codewords")
    print(f"  drift: {_drift_line(cb['drift'])}")
    for domain, c in doc["codes"].items():
        if c is None:
            continue
        print(
            f"  {domain}: {c['items']} coded, {c['head_items']} head; collisions all "
            f"{c['collision_rate_all']:.3f} head {c['collision_rate_head']:.3f}; mean length "
            f"head {c['mean_length_head']:.2f} tail {c['mean_length_tail']:.2f}; utilization "
            f"{c['utilization_per_level']}; table {c['table_rows']} rows "
            f"({c['table_memory_vs_id_table']:.1%} of an ID table); changes {c['changes']}"
        )
    return 0


def _drift_line(drift: dict[str, Any] | None) -> str:
    if drift is None:
        return "not measured yet (no item coded since this build measures it)"
    coded = f"{drift['baseline_items']} items at adoption, {drift['recent_items']} after"
    if drift["score"] is None:
        return f"too few items after the adoption to score ({coded})"
    verdict = "DRIFTED: consider adacode codebook migrate" if drift["drifted"] else "ok"
    return (
        f"score {drift['score']:.3f} ({verdict}); error ratio {drift['error_ratio']:.2f}, "
        f"balance {drift['balance']:.2f}, catalogue share {drift['catalogue_share']:.1%}; "
        f"{coded}"
    )


def cmd_item(args: argparse.Namespace) -> int:
    from worker.commands.inspection import find_item, open_state_readonly

    settings = _settings(args)
    with open_state_readonly(settings) as store:
        found = find_item(store, args.item_id, args.domain)
    if not found:
        print(
            f"item {args.item_id!r} not found"
            + (f" in domain {args.domain!r}" if args.domain else "")
        )
        return 1
    _print_json(found)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.commands.demo import run_demo

    settings = _settings(args)
    return run_demo(settings, args.dataset, args.workdir, args.limit)


def cmd_codebook(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from store.rocksdb import RocksDBPartition
    from worker.commands.dataset import read_items
    from worker.ingest.coding import retrain_codebook
    from worker.ingest.encoder import TextEncoder
    from worker.state.reads import load_codebook

    settings = _settings(args)
    if args.action == "show":
        from worker.commands.inspection import kept_codebooks, open_state_readonly

        with open_state_readonly(settings) as store:
            cb = load_codebook(store)
            kept = kept_codebooks(store)
        print("no codebook" if cb is None else repr(cb))
        for codebook_id, versions in sorted(kept.items()):
            used = ", ".join(versions) or "none (deleted by the next batch)"
            print(f"kept: codebook {codebook_id}, for the published versions {used}")
        return 0
    if args.action == "migrate":
        from worker.commands.operations import do_migrate

        print(do_migrate(settings))
        return 0
    vectors = None
    if args.dataset is not None:
        texts = [item.text or item.item_id for item in read_items(args.dataset)]
        encoder = TextEncoder(settings.text_batch_size, settings.torch_threads)
        chunks = [
            encoder.encode(texts[i : i + 512])
            for i in tqdm(range(0, len(texts), 512), desc="MiniLM", unit="batch")
        ]
        vectors = np.concatenate(chunks)
    store = RocksDBPartition.open(settings.state_path, sync_writes=settings.sync_writes)
    try:
        codebook, recoded = retrain_codebook(
            store, settings, vectors, levels=args.levels or 0, k=args.k or 0
        )
    finally:
        store.close()
    print(
        f"codebook {codebook.codebook_id}: {codebook.levels} levels x {codebook.k} codewords; "
        f"{recoded} items re-coded"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from worker.commands.operations import do_finetune

    settings = _settings(args)
    setup_logging("human", "INFO")
    outcome = do_finetune(settings, args.domain)
    if isinstance(outcome, str):
        print(outcome)
        return 0
    version = "" if outcome.record is None else f" version {outcome.record.version}"
    print(
        f"{outcome.domain}:{version} {outcome.status.word} ({outcome.reason}) in {outcome.seconds:.1f} s"
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from worker.commands.operations import do_rollback

    if (args.to is None) == (not args.previous):
        raise WorkerError("adacode rollback: give exactly one of --to V and --previous")
    print(do_rollback(_settings(args), args.domain, args.to, args.previous))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from worker.commands.operations import format_versions, versions_report

    doc = versions_report(_settings(args), args.domain)
    if args.json:
        _print_json(doc)
        return 0
    print(format_versions(doc))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from worker.commands.operations import export_version

    manifest = export_version(_settings(args), args.domain, args.version, args.out)
    print(
        f"wrote {args.out} ({manifest['n_items']} item vectors of {manifest['dim']} floats, "
        f"version {manifest['version']}) and {args.out}.manifest.json"
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.help_settings:
        print(describe_settings())
        return 0
    _print_json(_settings(args).redacted())
    return 0


# --- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adacode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--config", default=None, help="TOML settings file [env ADACODE_CONFIG]")
        add_setting_flags(p)
        return p

    p = command("kafka", cmd_kafka, "start, stop or check the local Kafka broker (ops/kafka.sh)")
    p.add_argument("action", choices=("up", "down", "status", "logs", "fetch"))
    p.add_argument("--port", type=_positive_int, default=None)
    p.add_argument("--data", type=Path, default=None)

    p = command("topics", cmd_topics, "create the adacode topics")
    p.add_argument("action", choices=("create",))
    p.add_argument("--partitions", type=_positive_int, default=None)

    p = command("replay", cmd_replay, "produce a dataset directory's events to Kafka")
    p.add_argument("--dataset", type=_existing_dir, required=True)
    p.add_argument("--rate", type=_non_negative_float, default=0.0, help="events/s (0: max)")
    p.add_argument("--limit", type=_positive_int, default=None, help="most interactions sent")
    p.add_argument("--skip", type=int, default=0, help="interactions skipped first")
    p.add_argument("--no-items", action="store_true", help="send interactions only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("synth", cmd_synth, "write a synthetic dataset (power-law popularity, texts)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--domain", default="shop")
    p.add_argument("--items", type=_positive_int, default=2000)
    p.add_argument("--users", type=_positive_int, default=1500)
    p.add_argument("--interactions", type=_positive_int, default=40_000)
    p.add_argument("--seed", type=int, default=7)

    command("run", cmd_run, "run the worker daemon")

    p = command("stats", cmd_stats, "what the worker holds, per domain (safe while it runs)")
    p.add_argument("--json", action="store_true")

    p = command("item", cmd_item, "everything stored about one item (safe while it runs)")
    p.add_argument("item_id")
    p.add_argument("--domain", default=None)

    p = command("demo", cmd_demo, "the end-to-end demo: topics, worker, replay, summary")
    p.add_argument("--dataset", type=_existing_dir, default=None, help="default: synthetic")
    p.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    p.add_argument("--limit", type=_positive_int, default=None, help="most interactions sent")

    p = command(
        "codebook",
        cmd_codebook,
        "show the codebook, migrate live to a new one (worker running or not), or train one "
        "(worker stopped)",
    )
    p.add_argument("action", choices=("train", "show", "migrate"))
    p.add_argument("--dataset", type=_existing_dir, default=None, help="train on its item texts")
    p.add_argument("--levels", type=_positive_int, default=None)
    p.add_argument("--k", type=_positive_int, default=None)

    p = command(
        "finetune",
        cmd_finetune,
        "fine-tune a domain now (via the control topic if the worker runs)",
    )
    p.add_argument("--domain", required=True)

    p = command("rollback", cmd_rollback, "switch a domain back to an earlier version")
    p.add_argument("--domain", required=True)
    p.add_argument("--to", type=_positive_int, default=None, help="version to serve")
    p.add_argument(
        "--previous", action="store_true", help="the published version before the current"
    )

    p = command("versions", cmd_versions, "a domain's versions with metrics, and every switch")
    p.add_argument("--domain", required=True)
    p.add_argument("--json", action="store_true")

    p = command("export", cmd_export, "write a version's item vectors and table (.npz + manifest)")
    p.add_argument("--domain", required=True)
    p.add_argument("--version", type=_positive_int, default=None, help="default: the current one")
    p.add_argument("--out", type=Path, required=True)

    p = command("config", cmd_config, "print the effective settings (secrets hidden)")
    p.add_argument("--help-settings", action="store_true", help="list every setting")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        setup_logging("human", "WARNING")
    try:
        return int(args.func(args))
    except AdacodeError as exc:
        print(f"adacode {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
