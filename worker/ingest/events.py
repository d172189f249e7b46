"""Event schemas and their validation.

Item event::

    {"item_id": str, "domain": str, "text": str | null, "embedding": [float] | null, "ts": int}

(text or embedding required; an embedding has the deployment's dimension and only
finite values). Interaction event::

    {"user_id": str, "item_id": str, "domain": str, "ts": int, "weight": float = 1}

:func:`parse_item` and :func:`parse_interaction` turn raw bytes into small frozen
dataclasses or raise :class:`~worker.ingest.exceptions.EventError` whose ``reason`` goes
to the dead-letter topic. They are on the hot path: plain type checks, no schema
library. The record's key must be the event's domain (:func:`key_fault`,
:func:`check_keys`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from worker.ingest.exceptions import EventError

MAX_ID_CHARS = 256
_MAX_TS = 1 << 62
_F32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = frozenset({int, float})


@dataclass(frozen=True, slots=True)
class ItemEvent:
    item_id: str
    domain: str
    text: str | None
    embedding: np.ndarray | None  # float32 [dim]
    ts: int


@dataclass(frozen=True, slots=True)
class InteractionEvent:
    user_id: str
    item_id: str
    domain: str
    ts: int
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class EventLimits:
    """What a valid event may hold; built once from the settings."""

    embedding_dim: int
    max_bytes: int
    domain_re: re.Pattern[str]
    max_text_chars: int


def _load(raw: bytes | None, limits: EventLimits) -> dict[str, Any]:
    if raw is None:
        raise EventError("empty message (null value)")
    if len(raw) > limits.max_bytes:
        raise EventError(
            f"payload of {len(raw)} bytes exceeds max_message_bytes={limits.max_bytes}"
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(_not_json(raw, exc)) from exc
    if not isinstance(data, dict):
        raise EventError(f"expected a JSON object, got {type(data).__name__}")
    return data


#: what producers write for non-finite floats (Python's json, JavaScript): no JSON numbers
_NON_FINITE = frozenset({"nan", "infinity", "inf"})
#: a key followed by its value, or by its flat list's values, up to where parsing stopped
_VALUE_OF = re.compile(rb'"([^"\\]{1,64})"\s*:\s*(?:\[[^\[\]{}]*)?$')
_BEFORE_VALUE = frozenset(b"[,:{ \t\r\n")
_AFTER_VALUE = frozenset(b",]} \t\r\n")


def _not_json(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why orjson refused ``raw``, naming a value that is no JSON value and its field.

    NaN and Infinity (which e.g. Python's ``json.dumps`` writes for non-finite floats) are
    named as such, with the field they are in, instead of orjson's "unexpected character"
    at a column.
    """
    start = end = min(exc.pos, len(raw))
    while start > 0 and raw[start - 1] not in _BEFORE_VALUE:
        start -= 1
    while end < len(raw) and raw[end] not in _AFTER_VALUE:
        end += 1
    if exc.pos >= len(raw):  # truncated (e.g. inside a string): no value to name
        return f"not JSON: {exc}"
    token = raw[start:end].decode("utf-8", "replace")
    key = _VALUE_OF.search(raw, 0, start)
    where = "the payload" if key is None else f"field {key.group(1).decode(errors='replace')!r}"
    if token.lstrip("+-").lower() in _NON_FINITE:
        return (
            f"not JSON: {where} holds NaN or Infinity (not JSON numbers): {token!r} at "
            f"character {start}; send finite numbers"
        )
    if key is not None and token and not token.startswith('"'):
        return f"not JSON: {where} holds {token[:40]!r}, not a JSON value ({exc})"
    return f"not JSON: {exc}"


def _str_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise EventError(f"missing field {name!r}")
    if not isinstance(value, str):
        raise EventError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_CHARS:
        raise EventError(f"field {name!r} must have 1 to {MAX_ID_CHARS} characters")
    return value


def _domain(data: dict[str, Any], limits: EventLimits) -> str:
    domain = _str_field(data, "domain")
    if limits.domain_re.fullmatch(domain) is None:
        raise EventError(
            f"domain {domain!r} does not match domain_pattern {limits.domain_re.pattern!r}"
        )
    return domain


def _ts(data: dict[str, Any]) -> int:
    ts = data.get("ts")
    if ts is None:
        raise EventError("missing field 'ts'")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise EventError(f"field 'ts' must be an integer, got {type(ts).__name__}")
    if not 0 <= ts < _MAX_TS:
        raise EventError(f"field 'ts' out of range: {ts}")
    return ts


def parse_item(raw: bytes | None, limits: EventLimits) -> ItemEvent:
    """Validate an item event; raise :class:`EventError` with the reason."""
    data = _load(raw, limits)
    item_id = _str_field(data, "item_id")
    domain = _domain(data, limits)
    ts = _ts(data)
    text = data.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise EventError(f"field 'text' must be a string or null, got {type(text).__name__}")
        text = text.strip()[: limits.max_text_chars] or None
    emb_raw = data.get("embedding")
    embedding = None
    if emb_raw is not None:
        if not isinstance(emb_raw, list):
            raise EventError(
                f"field 'embedding' must be a list of numbers or null, got {type(emb_raw).__name__}"
            )
        if len(emb_raw) != limits.embedding_dim:
            raise EventError(
                f"field 'embedding' has {len(emb_raw)} values, expected embedding_dim="
                f"{limits.embedding_dim}"
            )
        if not set(map(type, emb_raw)) <= _NUMBER_TYPES:  # bool is rejected: type(True) is bool
            raise EventError("field 'embedding' must hold only numbers")
        wide = np.asarray(emb_raw, dtype=np.float64)
        if not np.isfinite(wide).all() or np.abs(wide).max() > _F32_MAX:
            raise EventError("field 'embedding' holds NaN or infinite values (as float32)")
        embedding = wide.astype(np.float32)
        # the float32 norm overflows when the squares, summed in float64, pass float32's
        # largest value; no BLAS call here: numpy releases the GIL around each one, and a
        # batch of events re-taking it thousands of times kept other threads (the HTTP
        # server's) from getting it for up to ~0.4 s
        narrow = embedding.astype(np.float64)
        if not embedding.any() or float((narrow * narrow).sum()) > _F32_MAX:
            raise EventError("field 'embedding' is all zeros or overflows")
    if text is None and embedding is None:
        raise EventError("an item needs 'text' or 'embedding' (both are missing or null)")
    return ItemEvent(item_id, domain, text, embedding, ts)


def parse_interaction(raw: bytes | None, limits: EventLimits) -> InteractionEvent:
    """Validate an interaction event; raise :class:`EventError` with the reason."""
    data = _load(raw, limits)
    user_id = _str_field(data, "user_id")
    item_id = _str_field(data, "item_id")
    domain = _domain(data, limits)
    ts = _ts(data)
    weight = data.get("weight", 1.0)
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise EventError(f"field 'weight' must be a number, got {type(weight).__name__}")
    weight = float(weight)
    if not math.isfinite(weight) or weight <= 0 or weight > 1e6:
        raise EventError(f"field 'weight' must be finite, > 0 and <= 1e6, got {weight}")
    return InteractionEvent(user_id, item_id, domain, ts, weight)


@dataclass(slots=True)
class InteractionColumns:
    """A batch of interaction events as columns, plus the records that failed.

    ``index[k]`` is the position in the input of the ``k``-th valid event; ``bad`` holds
    ``(position, reason)`` of every invalid one, in input order.
    """

    index: list[int]
    user_ids: list[str]
    item_ids: list[str]
    domains: list[str]
    ts: list[int]
    weights: list[float]
    bad: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.ts)


class _Irregular(Exception):
    """The batch is not uniformly valid: parse it record by record.

    Control flow inside :func:`parse_interactions`, which always catches it: never raised
    to a caller, so not part of the error tree (a plain :class:`Exception`).
    """


def _id_column(values: list[Any]) -> None:
    if set(map(type, values)) != {str}:
        raise _Irregular
    if min(map(len, values)) < 1 or max(map(len, values)) > MAX_ID_CHARS:
        raise _Irregular


def parse_interactions(raws: Sequence[bytes | None], limits: EventLimits) -> InteractionColumns:
    """Validate many interaction events at once, with :func:`parse_interaction`'s rules.

    The fast path parses every record, reads each field as a column and checks the
    columns with a few C-level passes (type sets, min/max, the domain pattern once per
    distinct domain). A batch with any invalid record is parsed again record by record,
    so each bad record gets its exact reason; the valid ones are the same either way.
    """
    n = len(raws)
    try:
        if not n:
            return InteractionColumns([], [], [], [], [], [], [])
        if max(map(len, raws)) > limits.max_bytes:  # type: ignore[arg-type]  # None: TypeError
            raise _Irregular
        loads = orjson.loads
        data = [loads(raw) for raw in raws]  # type: ignore[arg-type]
        if set(map(type, data)) != {dict}:
            raise _Irregular
        user_ids = [d["user_id"] for d in data]
        item_ids = [d["item_id"] for d in data]
        domains = [d["domain"] for d in data]
        ts = [d["ts"] for d in data]
        weights = [d.get("weight", 1.0) for d in data]
        _id_column(user_ids)
        _id_column(item_ids)
        distinct = set(domains)
        if not all(type(d) is str for d in distinct):
            raise _Irregular
        for domain in distinct:
            if (
                not domain
                or len(domain) > MAX_ID_CHARS
                or limits.domain_re.fullmatch(domain) is None
            ):
                raise _Irregular
        if set(map(type, ts)) != {int} or min(ts) < 0 or max(ts) >= _MAX_TS:
            raise _Irregular
        kinds = set(map(type, weights))
        if not kinds <= _NUMBER_TYPES:  # bool and None go the slow way
            raise _Irregular
        if int in kinds:
            weights = [float(w) for w in weights]
        # orjson never yields NaN or infinities, so the range check is complete
        if not (min(weights) > 0 and max(weights) <= 1e6):
            raise _Irregular
    except (_Irregular, TypeError, KeyError, orjson.JSONDecodeError):
        return _parse_one_by_one(raws, limits)
    return InteractionColumns(list(range(n)), user_ids, item_ids, domains, ts, weights, [])


#: the longest part of a wrong key a reason shows (keys are domains: short)
_KEY_SHOWN_CHARS = 80


def key_fault(key: bytes | None, domain: str) -> str | None:
    """Why a record keyed ``key`` may not carry an event of ``domain``; ``None``: it may.

    Events and commands are keyed by their domain: the key picks the partition, and the
    partition the one worker of a group that owns the domain. An event under another key,
    or under none (a null key spreads records over partitions), would be applied by a
    worker that does not own its domain, so it is dead-lettered with this reason. A command
    for the whole worker (``migrate``: no domain) may have any key.
    """
    if not domain:
        return None
    if key is None:
        return (
            f"no key: events are keyed by their domain {domain!r}, so that one worker owns "
            f"each domain; produce it with key={domain!r}"
        )
    if key == domain.encode():
        return None
    shown = key[: _KEY_SHOWN_CHARS * 4].decode(errors="replace")
    if len(shown) > _KEY_SHOWN_CHARS or len(key) > _KEY_SHOWN_CHARS * 4:
        shown = f"{shown[:_KEY_SHOWN_CHARS]}... ({len(key)} bytes)"
    return (
        f"key {shown!r} is not the event's domain {domain!r}: events are keyed by their "
        f"domain, so that one worker owns each domain; produce it with key={domain!r}"
    )


def check_keys(cols: InteractionColumns, keys: Sequence[bytes | None]) -> int:
    """Move the valid events whose record key (``keys[position]``) is not their domain
    (:func:`key_fault`) from the columns to ``cols.bad``; returns how many moved.

    On the interactions' hot path: each distinct domain is encoded once and the keys are
    compared as one list, in C; only a batch with a wrong key is looked at record by record.
    """
    if not cols.index:
        return 0
    encoded = {domain: domain.encode() for domain in set(cols.domains)}
    want = list(map(encoded.__getitem__, cols.domains))
    got = list(keys) if len(keys) == len(cols.index) else [keys[k] for k in cols.index]
    if got == want:
        return 0
    keep: list[int] = []
    bad: list[tuple[int, str]] = []
    for row, (position, domain) in enumerate(zip(cols.index, cols.domains, strict=True)):
        reason = key_fault(got[row], domain)
        if reason is None:
            keep.append(row)
        else:
            bad.append((position, reason))
    cols.index = [cols.index[row] for row in keep]
    cols.user_ids = [cols.user_ids[row] for row in keep]
    cols.item_ids = [cols.item_ids[row] for row in keep]
    cols.domains = [cols.domains[row] for row in keep]
    cols.ts = [cols.ts[row] for row in keep]
    cols.weights = [cols.weights[row] for row in keep]
    cols.bad = sorted(cols.bad + bad)
    return len(bad)


def _parse_one_by_one(raws: Sequence[bytes | None], limits: EventLimits) -> InteractionColumns:
    out = InteractionColumns([], [], [], [], [], [], [])
    for position, raw in enumerate(raws):
        try:
            event = parse_interaction(raw, limits)
        except EventError as exc:
            out.bad.append((position, exc.reason))
            continue
        out.index.append(position)
        out.user_ids.append(event.user_id)
        out.item_ids.append(event.item_id)
        out.domains.append(event.domain)
        out.ts.append(event.ts)
        out.weights.append(event.weight)
    return out


def item_payload(
    item_id: str,
    domain: str,
    ts: int,
    text: str | None = None,
    embedding: list[float] | np.ndarray | None = None,
) -> bytes:
    """Serialize an item event (producer side)."""
    emb = None if embedding is None else [float(v) for v in np.asarray(embedding).ravel()]
    return orjson.dumps(
        {"item_id": item_id, "domain": domain, "text": text, "embedding": emb, "ts": ts}
    )


def interaction_payload(
    user_id: str, item_id: str, domain: str, ts: int, weight: float = 1.0
) -> bytes:
    """Serialize an interaction event (producer side)."""
    return orjson.dumps(
        {"user_id": user_id, "item_id": item_id, "domain": domain, "ts": ts, "weight": weight}
    )


CONTROL_OPS = ("rollback", "pin", "unpin", "finetune", "migrate")


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """An operator command on the control topic, applied in order by the worker.

    ``{"op": "rollback", "domain": d, "version": V | null, "previous": bool}``,
    ``{"op": "pin" | "unpin", "domain": d, "version": V}``, ``{"op": "finetune", "domain": d}``,
    ``{"op": "migrate"}`` (the worker's codebook, for every domain: ``domain`` may be left out,
    and is ``""`` then; see :meth:`worker.ingest.coding.CodeService.request_migration`).
    """

    op: str
    domain: str
    version: int | None = None
    previous: bool = False


def parse_control(raw: bytes | None, limits: EventLimits) -> ControlCommand:
    data = _load(raw, limits)
    op = data.get("op")
    if op not in CONTROL_OPS:
        raise EventError(f"field 'op' must be one of {', '.join(CONTROL_OPS)}, got {op!r}")
    domain = "" if op == "migrate" and data.get("domain") in (None, "") else _domain(data, limits)
    version = data.get("version")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise EventError(f"field 'version' must be a positive integer or null, got {version!r}")
    previous = data.get("previous", False)
    if not isinstance(previous, bool):
        raise EventError("field 'previous' must be true or false")
    if op == "rollback" and (version is None) == (not previous):
        raise EventError("a rollback needs exactly one of 'version' and 'previous': true")
    if op in ("pin", "unpin") and version is None:
        raise EventError(f"{op} needs a 'version'")
    return ControlCommand(op, domain, version, previous)


def control_payload(
    op: str, domain: str, version: int | None = None, previous: bool = False
) -> bytes:
    return orjson.dumps({"op": op, "domain": domain, "version": version, "previous": previous})
