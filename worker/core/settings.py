"""Frozen, typed settings: each declared once, with its default, env var and CLI flag.

Sources, lowest to highest precedence: defaults < TOML file < ``ADACODE_*``
environment < command-line flags. This is the ONE module that reads the
environment. Every value is validated at load time; an error names the key, the
source, what was wrong and what is allowed.

A TOML file may be flat (``kafka_bootstrap = "..."``) or use sections whose name is
the key's first word (``[kafka] bootstrap = "..."``); both spell the same key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer

from worker.core.exceptions import ConfigError

ENV_PREFIX = "ADACODE_"
#: how long a Kafka client made while no broker answers waits before it fails
BOOTSTRAP_TIMEOUT_MS = 5_000
#: ADACODE_* variables read by the ops/ scripts and the tests, not worker settings.
OPS_ENV = frozenset(
    {
        "ADACODE_CONFIG",
        "ADACODE_VENV",
        "ADACODE_PYTHON",
        "ADACODE_TORCH_INDEX",
        "ADACODE_KAFKA_HOME",
        "ADACODE_KAFKA_PORT",
        "ADACODE_KAFKA_CONTROLLER_PORT",
        "ADACODE_KAFKA_DATA",
        "ADACODE_KAFKA_HEAP",
        "ADACODE_KAFKA_START_TIMEOUT",
        "ADACODE_DEMO_WORKDIR",
    }
)


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
) -> Any:
    """Declare a setting: its default, its help and its bounds."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": tuple(choices) if choices else None,
            "minimum": minimum,
            "maximum": maximum,
            "secret": secret,
        },
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings of the worker and the CLI. Read with :func:`load_settings`."""

    # --- Kafka -----------------------------------------------------------------------
    kafka_bootstrap: str = setting("127.0.0.1:9092", "Kafka bootstrap servers, comma-separated")
    kafka_group_id: str = setting("adacode-worker", "consumer group of the workers")
    kafka_client_id: str = setting("adacode", "client id sent to the broker")
    kafka_group_instance_id: str = setting(
        "", "static group membership id (a restart keeps its partitions without a rebalance)"
    )
    kafka_session_timeout_ms: int = setting(
        10_000, "consumer session timeout in ms", minimum=6_000, maximum=300_000
    )
    kafka_security_protocol: str = setting(
        "PLAINTEXT",
        "security protocol passed to kafka-python",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    kafka_sasl_mechanism: str = setting(
        "", "SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) or empty"
    )
    kafka_sasl_username: str = setting("", "SASL user name")
    kafka_sasl_password: str = setting("", "SASL password (never logged)", secret=True)
    kafka_ssl_cafile: str = setting("", "CA file for SSL connections")
    topic_prefix: str = setting("adacode.", "prefix of every topic name")
    topic_partitions: int = setting(
        3, "partitions of the event topics (adacode topics create)", minimum=1, maximum=1024
    )
    topic_retention_hours: int = setting(
        168, "retention of the event topics in hours (-1: forever)", minimum=-1
    )
    poll_max_records: int = setting(
        5000, "most records applied in one batch", minimum=1, maximum=100_000
    )
    poll_timeout_ms: int = setting(200, "poll timeout in ms", minimum=1, maximum=60_000)
    max_message_bytes: int = setting(
        1_000_000, "larger event payloads are dead-lettered", minimum=256
    )

    # --- state -----------------------------------------------------------------------
    state_dir: str = setting("state/worker", "directory of the worker's RocksDB")
    sync_writes: bool = setting(True, "fsync the RocksDB WAL on every batch")
    interaction_retention: int = setting(
        5_000_000, "interactions kept per domain in the log (oldest trimmed)", minimum=1000
    )
    popularity_half_life_hours: float = setting(
        168.0, "half-life of the time-decayed interaction count", minimum=0.001
    )
    domain_pattern: str = setting(
        r"^[a-z0-9][a-z0-9_.-]{0,62}$", "regular expression a domain name must match"
    )

    # --- items -----------------------------------------------------------------------
    embedding_dim: int = setting(384, "dimension of item embeddings", minimum=1, maximum=65536)
    text_batch_size: int = setting(64, "texts encoded per MiniLM call", minimum=1)
    torch_threads: int = setting(1, "torch threads of the text encoder", minimum=1, maximum=64)
    max_text_chars: int = setting(4000, "item texts are cut to this length", minimum=16)
    encoder_preload: bool = setting(
        True, "load MiniLM in the background at start, not on the first text item"
    )

    # --- codes -----------------------------------------------------------------------
    codes_enabled: bool = setting(True, "assign residual codes to items as they arrive")
    code_policy: str = setting(
        "entropy",
        "length policy of served codes",
        choices=("fixed", "popularity", "entropy", "reverse"),
    )
    code_min_len: int = setting(1, "shortest served code (tail and cold items)", minimum=1)
    code_levels: int = setting(0, "codebook levels (0: by rule from the item count)", minimum=0)
    code_k: int = setting(
        0, "codewords per level (0: by rule from the item count)", minimum=0, maximum=256
    )
    code_head_fraction: float = setting(
        0.2, "fraction of a domain's items treated as head", minimum=0.0, maximum=1.0
    )
    code_round_interactions: int = setting(
        10_000,
        "most interactions a domain gets between two re-evaluations of its code lengths",
        minimum=1,
    )
    code_round_share: float = setting(
        0.5,
        "a domain's code lengths are re-evaluated once it has had this many interactions per "
        "item since the last time (within code_round_min_interactions and "
        "code_round_interactions)",
        minimum=0.0,
    )
    code_round_min_interactions: int = setting(
        100, "fewest interactions a domain gets between two code-length rounds", minimum=1
    )
    codebook_min_items: int = setting(
        1000, "items with embeddings needed to train the bootstrap codebook", minimum=16
    )
    codebook_drift_window: float = setting(
        10_000.0,
        "half-life, in coded items, of the recent window the codebook's drift is measured on",
        minimum=1.0,
    )
    codebook_drift_threshold: float = setting(
        0.405,
        "drift score at which the codebook counts as drifted (log 1.5: see quantize.drift)",
        minimum=0.0,
    )
    codebook_migrate_on_drift: bool = setting(
        False,
        "migrate live to a codebook trained on today's items once the drift score passes "
        "codebook_drift_threshold (adacode codebook migrate asks for one at any time)",
    )
    codebook_watch_s: float = setting(
        30.0,
        "seconds between two reads of the group's codebook topic by a running worker, which "
        "follows a migration another worker made (0: only at start)",
        minimum=0.0,
    )

    # --- fine-tuning and versions ------------------------------------------------------
    finetune_interval_s: float = setting(
        600.0, "seconds between scheduled fine-tunes of a domain (0: never)", minimum=0.0
    )
    finetune_after_interactions: int = setting(
        50_000, "fine-tune a domain after this many new interactions (0: never)", minimum=0
    )
    finetune_min_interactions: int = setting(
        200, "coded interactions a domain needs before its first fine-tune", minimum=10
    )
    finetune_retry_s: float = setting(
        15.0, "a fine-tune skipped for lack of coded data is retried after this", minimum=0.1
    )
    finetune_epochs: int = setting(20, "most epochs of a full fine-tune", minimum=1)
    finetune_max_seconds: float = setting(300.0, "wall-time budget of one fine-tune", minimum=1.0)
    finetune_incremental_share: float = setting(
        0.5,
        "share of finetune_max_seconds an incremental fine-tune (from the domain's current "
        "version, on what is new) may use: it adapts a trained table, so it is given less",
        minimum=0.05,
        maximum=1.0,
    )
    finetune_epoch_steps: int = setting(
        2_000,
        "most training steps between two validations: a large domain's epoch is a random "
        "part of its log, so a fine-tune cut by finetune_max_seconds still has validated "
        "epochs to gate and publish",
        minimum=1,
    )
    finetune_threads: int = setting(1, "torch threads of a fine-tune", minimum=1, maximum=64)
    finetune_full_softmax_max_items: int = setting(
        5_000,
        "a domain of at most this many items trains with a full softmax, a larger one with "
        "sampled, logQ-corrected negatives (cost per step independent of the catalogue)",
        minimum=0,
    )
    background_threads: int = setting(
        max(1, (os.cpu_count() or 2) - 1),
        "OpenMP threads of the serving index builds and the codebook bootstrap (default: "
        "the cores less one, so the consumer and the API keep a core)",
        minimum=1,
        maximum=64,
    )
    background_nice: int = setting(
        10,
        "nice increment of the background threads (fine-tunes, serving-index builds, the "
        "codebook bootstrap), so the consumer and the API get the CPU first when they want "
        "it; 0 = the same priority",
        minimum=0,
        maximum=19,
    )
    finetune_workers: int = setting(
        max(1, (os.cpu_count() or 2) - 1),
        "fine-tunes run at once (default: the cores less one for the consumer, at least 1)",
        minimum=1,
        maximum=64,
    )
    finetune_hidden: int = setting(64, "width of the code-table rows", minimum=8, maximum=1024)
    finetune_encoder: str = setting(
        "transformer", "user sequence encoder", choices=("transformer", "attention")
    )
    finetune_text_projection: bool = setting(
        True,
        "item vectors add a learned projection of the frozen text embedding to the code rows",
    )
    finetune_text_hidden: int = setting(
        128,
        "hidden width of the text adaptor (the frozen embedding through a GELU layer of this "
        "width, then into the item vector); 0 = one linear map",
        minimum=0,
        maximum=4096,
    )
    serve_borrow_trained: bool = setting(
        True,
        "untrained and new items are served the deepest prefix of their code path that "
        "several trained items share",
    )
    gate_tolerance: float = setting(
        0.005, "a candidate may lose this much Recall@10 against the current version", minimum=0.0
    )
    gate_users: int = setting(1000, "recent users whose latest interaction is held out", minimum=10)
    versions_keep: int = setting(
        5, "published versions whose tables are kept (plus pinned)", minimum=1
    )

    # --- daemon ----------------------------------------------------------------------
    http_host: str = setting("127.0.0.1", "address of the health/metrics/API server")
    http_port: int = setting(8321, "port of the HTTP server (0: none)", minimum=0, maximum=65535)
    http_max_body_bytes: int = setting(
        1 << 20, "largest HTTP request body; a larger one is answered 413 unread", minimum=1024
    )
    http_threads: int = setting(
        16,
        "threads that run API request handlers, all started with the server (a burst "
        "queues for them; none is started while requests wait)",
        minimum=1,
        maximum=256,
    )
    admin_token: str = setting(
        "",
        "bearer token of the admin endpoints (rollback); empty: admin endpoints answer 403",
        secret=True,
    )
    log_format: str = setting("human", "log line format", choices=("human", "json"))
    log_level: str = setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    # --- serving ---------------------------------------------------------------------
    index_exact_max_items: int = setting(
        20_000,
        "a domain with more items is searched by an inverted file (IVF, ~sqrt(n) cells); "
        "exact search up to this many",
        minimum=1,
    )
    index_recall: float = setting(
        0.95,
        "recall@10 against exact search that an IVF index's nprobe is calibrated to at build",
        minimum=0.5,
        maximum=1.0,
    )
    index_cache_versions: int = setting(
        1,
        "built indexes kept per domain besides the current one (a rollback to one swaps at "
        "once; each costs the memory of an index)",
        minimum=0,
        maximum=16,
    )
    index_hnsw_ef_search: int = setting(
        128, "HNSW search breadth of bench/serve.py's HNSW comparison", minimum=1, maximum=100_000
    )
    index_poll_s: float = setting(
        30.0,
        "seconds between fallback checks of every domain's current version (publishes and "
        "rollbacks wake the index thread at once)",
        minimum=0.01,
    )
    user_history_len: int = setting(
        50, "recent items kept per user for /users/{u}/recommend (0: none)", minimum=0, maximum=1000
    )

    # ---------------------------------------------------------------------------------

    def topic(self, name: str) -> str:
        """Full name of topic ``name`` (items, interactions, deadletter, control, snapshots)."""
        return f"{self.topic_prefix}{name}"

    def kafka_common(self) -> dict[str, Any]:
        """Connection settings shared by every kafka-python client (secrets included)."""
        conf: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap.split(","),
            "client_id": self.kafka_client_id,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            conf["sasl_mechanism"] = self.kafka_sasl_mechanism
            conf["sasl_plain_username"] = self.kafka_sasl_username
            conf["sasl_plain_password"] = self.kafka_sasl_password
        if self.kafka_ssl_cafile:
            conf["ssl_cafile"] = self.kafka_ssl_cafile
        if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:
            # a client made while the broker is away fails within seconds (the worker's Kafka
            # policy waits and tries again, and honours a stop meanwhile), not after 30 s
            conf["bootstrap_timeout_ms"] = BOOTSTRAP_TIMEOUT_MS
        return conf

    def redacted(self) -> dict[str, Any]:
        """All settings as a dict, secrets replaced by ``***`` (safe to log)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata["secret"] and value else value
        return out

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(key: str, raw: Any, source: str) -> Any:
    f = FIELDS[key]
    kind = type(f.default)
    meta = f.metadata
    try:
        if kind is bool:
            if isinstance(raw, bool):
                value: Any = raw
            elif isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
                value = True
            elif isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
                value = False
            else:
                raise ValueError("expected true or false")
        elif kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError("expected an integer")
            value = int(raw)
        elif kind is float:
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            value = float(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            value = raw
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"setting {key!r} from {source}: {raw!r} is not valid ({exc}); "
            f"expected {_KIND_NAMES[kind]}, e.g. {f.default!r}"
        ) from exc
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(
            f"setting {key!r} from {source}: {value!r} is not allowed; "
            f"choose one of {', '.join(meta['choices'])}"
        )
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(
            f"setting {key!r} from {source}: {value!r} is below the minimum {meta['minimum']}"
        )
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise ConfigError(
            f"setting {key!r} from {source}: {value!r} is above the maximum {meta['maximum']}"
        )
    return value


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(
        f"unknown setting {key!r} in {source}{hint} (all settings: adacode config --help-settings)"
    )


def _flatten_toml(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{key}_{sub}"] = inner
        else:
            flat[key] = value
    for key in flat:
        if key not in FIELDS:
            raise _unknown(key, source)
    return flat


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {path} does not exist; pass an existing file with --config "
            f"or leave --config out to use defaults and ADACODE_* variables"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return _flatten_toml(data, f"config file {path}")


def load_settings(
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from defaults, a TOML file, the environment and explicit overrides.

    ``config`` defaults to ``$ADACODE_CONFIG`` when that is set. ``overrides`` are
    values from command-line flags (``None`` values are ignored).
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config = config or env.get("ADACODE_CONFIG") or None
    if config:
        path = Path(config)
        for key, raw in read_toml(path).items():
            values[key] = _convert(key, raw, f"config file {path}")
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in OPS_ENV or name.startswith("ADACODE_TEST_"):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in FIELDS:
            values[key] = _convert(key, raw, f"environment variable {name}")
        else:
            raise _unknown(key, f"environment variable {name}")
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in FIELDS:
            raise _unknown(key, "command-line flags")
        values[key] = _convert(key, raw, f"flag {flag_name(key)}")
    settings = Settings(**values)
    try:
        re.compile(settings.domain_pattern)
    except re.error as exc:
        raise ConfigError(
            f"setting 'domain_pattern' is not a valid regular expression: {exc}"
        ) from exc
    if not settings.kafka_bootstrap.strip():
        raise ConfigError("setting 'kafka_bootstrap' is empty; give host:port, e.g. 127.0.0.1:9092")
    return settings


def add_setting_flags(parser: argparse.ArgumentParser, keys: Sequence[str] | None = None) -> None:
    """Add a ``--flag`` for each setting (all of them, or ``keys``)."""
    group = parser.add_argument_group("settings (also ADACODE_* variables and --config)")
    for key in keys or list(FIELDS):
        f = FIELDS[key]
        meta = f.metadata
        help_text = f"{meta['help']} [env {env_name(key)}; default {f.default!r}]"
        group.add_argument(flag_name(key), dest=f"setting_{key}", default=None, help=help_text)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags in ``args`` (see :func:`add_setting_flags`)."""
    return {
        name[len("setting_") :]: value
        for name, value in vars(args).items()
        if name.startswith("setting_") and value is not None
    }


def describe_settings() -> str:
    """A table of every setting, its env var, flag, default and help."""
    lines = []
    for key, f in FIELDS.items():
        meta = f.metadata
        allowed = f" (one of {', '.join(meta['choices'])})" if meta["choices"] else ""
        lines.append(
            f"{key:28} {env_name(key):36} {flag_name(key):30} default={f.default!r}\n"
            f"{'':28} {meta['help']}{allowed}"
        )
    return "\n".join(lines)
