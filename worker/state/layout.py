"""Every key layout of the state partition: the one place keys are built and parsed.

The column families are those of :data:`store.partition.COLUMN_FAMILIES`; their values
are encoded by :mod:`store.records` (items, popularity, interactions, counters),
:mod:`worker.state.users`, :mod:`worker.state.versions`, :mod:`quantize.assign` and
:mod:`quantize.codebook`. ``\\0`` is one zero byte, ``>q``/``>i`` big-endian int64/int32,
``v`` a version number (``>q``). Domains never contain ``\\0`` (they match
``domain_pattern``), so every key of a domain lies in one contiguous prefix range, apart
from any other domain's.

============  ========================================  ===============================  =======================
column family key                                       value                            who writes it
============  ========================================  ===============================  =======================
meta          ``format``                                ``adacode-state-v1``             store (``FORMAT_KEY``)
meta          ``domain/`` domain                        :class:`DomainCounters`          ingest.processor
meta          ``codebook/current``                      the current codebook's id        ingest.coding
meta          ``codebook/`` id                          ResidualCodebook bytes           ingest.coding
meta          ``restore/`` topic ``/`` partition        restore position (``>q``)        ingest.group
meta          ``bootstrap/sample``                      {"n", "keys"} while it trains    ingest.coding
meta          ``bootstrap/cursor``                      last item key coded since        ingest.coding
meta          ``drift/codebook``                        the codebook's drift sums        ingest.coding
meta          ``codes/ns/`` id                          prefix of that codebook's codes  ingest.coding
meta          ``lineage/codebook``                      ids of every codebook, in order  ingest.coding
meta          ``migrate/request``                       {"source"} until it cuts over    ingest.coding
meta          ``migrate/state``                         {"from", "to", ...} until coded  ingest.coding
items         domain \\0 item_id                         :class:`ItemRecord`              ingest.processor
popularity    domain \\0 item_id                         :class:`Popularity`              ingest.processor
interactions  domain \\0 ts(>q) partition(>i) offset(>q)  :class:`LoggedInteraction`       ingest.processor
users         domain \\0 user_id                         recent items' ring header        ingest.processor
                                                          (state.users; older: the list)
recent        domain \\0 user_id \\0 slot(>H)            one recent item: ts(>q), item id ingest.processor
codes         ``state`` \\0 domain                       assigner header (JSON; npz: v1)  ingest.coding
codes         ``row`` \\0 domain \\0 item_id              one item's assigner row          ingest.coding
codes         ``pend`` \\0 domain \\0 item_id             b"" (popularity moved)           ingest.coding
codes         ``hist`` \\0 domain \\0 ts(>q) item \\0 why   {"item", "old", "new", "reason"} ingest.coding
codes         ``ns`` \\0 id \\0 + a key of the 3 above  that key, for codebook id        ingest.coding
versions      ``rec`` \\0 domain \\0 v                    VersionRecord (JSON)             state.versions
versions      ``table`` \\0 domain \\0 v                  model snapshot (npz)             state.versions
versions      ``items`` \\0 domain \\0 v                  the version's items (npz)        state.versions
versions      ``part`` \\0 domain \\0 v \\0 kind \\0 i(>I)  part i of a large table/items     state.versions
versions      ``current`` \\0 domain                     v                                state.versions
versions      ``next`` \\0 domain                        next version number (``>q``)     state.versions
versions      ``switch`` \\0 domain \\0 seq(>q)           {"from", "to", "reason", "at"}   state.versions
versions      ``request`` \\0 domain                     {"requested_at", "source"}       ingest.processor
offsets       topic \\0 partition(>i)                    next offset (``>q``)             store (consumer batches)
============  ========================================  ===============================  =======================

**Code namespaces.** The ``state``, ``row`` and ``pend`` keys of the codes are those of one
codebook. A state that has only ever had one codebook keeps them unprefixed; once another
codebook comes (``adacode codebook train``), each codebook's codes live under their own
prefix, named in ``meta`` by ``codes/ns/`` + the codebook's id (the prefix ``b""``: the
unprefixed keys), and an older codebook's namespace is kept, and fed with every new item,
while a version trained on it may be served (:mod:`worker.ingest.coding`). A prefix is
``ns`` \\0 id \\0 (:func:`namespace_prefix`): it starts with ``n``, apart from every
unprefixed code key, so a domain's unprefixed range never holds a namespaced key.

The ``offsets`` keys are built by the store itself, which commits offsets in the same
batch as the state (:func:`store.partition.offset_key`, :func:`store.partition.decode_offset_key`).

The compacted ``versions`` topic (:mod:`worker.ingest.group`) mirrors the ``versions``
column family under the same keys, and the control topic's offsets under
``\\x01offset\\0`` + their ``offsets`` key (:func:`mirrored_offset_key`): a version kind
never starts with ``\\x01``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Literal

from worker.state.exceptions import KeyLayoutError

_SEP = b"\x00"
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")

# --- items, popularity, users: domain \0 id ----------------------------------------------


def domain_prefix(domain: str) -> bytes:
    """The prefix of every ``items``, ``popularity``, ``interactions`` and ``users`` key of
    ``domain``."""
    return domain.encode() + _SEP


def item_key(domain: str, item_id: str) -> bytes:
    """Key of an item in ``items`` and of its counts in ``popularity``."""
    return f"{domain}\x00{item_id}".encode()


def split_item_key(key: bytes) -> tuple[str, str]:
    """Inverse of :func:`item_key` (and :func:`user_key`): ``(domain, id)``."""
    domain, _, item_id = key.decode().partition("\x00")
    return domain, item_id


def item_ids_of(domain: str, keys: Iterable[bytes]) -> list[str]:
    """The ids of item keys that all lie under :func:`domain_prefix` of ``domain``."""
    cut = len(domain_prefix(domain))
    return [k[cut:].decode() for k in keys]


def user_key(domain: str, user_id: str) -> bytes:
    """Key of a user's recent items in ``users`` (the same ``domain \\0 id`` layout as items)."""
    return item_key(domain, user_id)


_SLOT = struct.Struct(">H")


def recent_slot_keys(domain: str, user_id: str, slots: Iterable[int]) -> list[bytes]:
    """Keys of slots of a user's ring of recent items in ``recent``: ``domain \\0 user_id \\0
    slot`` (``>H``; a fixed-length suffix, so no two users' slots share a key whatever their
    ids hold)."""
    head = ring_prefix(domain, user_id)
    return [head + _SLOT.pack(slot) for slot in slots]


def ring_prefix(domain: str, user_id: str) -> bytes:
    """The prefix of the user's slot keys in ``recent``. A slot key is this prefix and two
    bytes; longer keys under it belong to users whose ids extend this one (``u\\0...``), and a
    reader of this user's slots looks its own keys up among what it scanned."""
    return user_key(domain, user_id) + _SEP


# --- interactions: domain \0 ts partition offset --------------------------------------------

_LOG_KEY = struct.Struct(">qiq")  # ts, source partition, source offset


def interaction_key(domain: str, ts: int, partition: int, offset: int) -> bytes:
    """Time-ordered, unique key: replaying a record writes the same key again."""
    return domain_prefix(domain) + _LOG_KEY.pack(ts, partition, offset)


def interaction_keys(
    domains: Sequence[str],
    ts: Sequence[int],
    partitions: Sequence[int],
    offsets: Sequence[int],
) -> list[bytes]:
    """:func:`interaction_key` of many interactions (columns of equal length), same bytes."""
    prefixes = {d: domain_prefix(d) for d in set(domains)}
    pack_key = _LOG_KEY.pack
    return [
        prefixes[d] + pack_key(t, p, o)
        for d, t, p, o in zip(domains, ts, partitions, offsets, strict=True)
    ]


def interaction_key_ts(key: bytes) -> int:
    """The event time of an :func:`interaction_key`."""
    ts, _, _ = _LOG_KEY.unpack(key[-_LOG_KEY.size :])
    return int(ts)


# --- meta: per-domain counters, the codebook, restore positions ----------------------------

DOMAIN_COUNTERS_PREFIX = b"domain/"
"""The prefix of every :func:`domain_counters_key` (one per domain ever consumed)."""


def domain_counters_key(domain: str) -> bytes:
    return DOMAIN_COUNTERS_PREFIX + domain.encode()


def domain_of_counters_key(key: bytes) -> str:
    """Inverse of :func:`domain_counters_key`."""
    return key[len(DOMAIN_COUNTERS_PREFIX) :].decode()


CODEBOOK_CURRENT = b"codebook/current"
"""Key of the current codebook's id (the id's UTF-8 bytes)."""


def codebook_key(codebook_id: bytes) -> bytes:
    """Key of a codebook by its id, as stored under :data:`CODEBOOK_CURRENT`."""
    return b"codebook/" + codebook_id


CODEBOOK_DRIFT = b"drift/codebook"
"""``meta`` key of the current codebook's drift sums (JSON of
:meth:`quantize.drift.CodebookDrift.to_dict`; written with the items coded)."""

CODE_NAMESPACES_PREFIX = b"codes/ns/"
"""The prefix of every :func:`code_namespace_key` (none until a second codebook came)."""


def code_namespace_key(codebook_id: str) -> bytes:
    """``meta`` key naming the prefix of codebook ``codebook_id``'s codes (see the module
    docstring's code namespaces)."""
    return CODE_NAMESPACES_PREFIX + codebook_id.encode()


def codebook_of_namespace_key(key: bytes) -> str:
    """Inverse of :func:`code_namespace_key`."""
    return key[len(CODE_NAMESPACES_PREFIX) :].decode()


def namespace_prefix(codebook_id: str) -> bytes:
    """The prefix of the codes of codebook ``codebook_id`` in their own namespace."""
    return b"ns" + _SEP + codebook_id.encode() + _SEP


CODEBOOK_LINEAGE = b"lineage/codebook"
"""``meta`` key of the ids of every codebook the state was coded with, oldest first, the
current one last (JSON list; absent in a state from before it: the current one alone). A
state whose first codebook is the group's takes the group's chain up to it as its own
(it descends from those codebooks: versions trained on them are older than its codes)."""

MIGRATE_REQUEST = b"migrate/request"
"""``meta`` key of a requested codebook migration, until the candidate is trained and the
worker cuts over to it (JSON ``{"source"}``; see :mod:`worker.ingest.coding`)."""

MIGRATE_STATE = b"migrate/state"
"""``meta`` key of a migration cut over, while its catch-up codes the items held before it
(JSON ``{"from", "to", "source"}``)."""

BOOTSTRAP_SAMPLE = b"bootstrap/sample"
"""``meta`` key of the sample the bootstrap codebook trains on, while it trains (JSON)."""

BOOTSTRAP_CURSOR = b"bootstrap/cursor"
"""``meta`` key of the last item key coded since the codebook came (while items held from
before it are coded in chunks; ``b""``: none yet)."""


def restore_position_key(topic: str, partition: int) -> bytes:
    """Key of how far the ``versions`` topic partition was restored (see
    :mod:`worker.ingest.group`)."""
    return f"restore/{topic}/{partition}".encode()


# --- codes: assigner state, code history ---------------------------------------------------

ASSIGNER_PREFIX = b"state\x00"
"""The prefix of every :func:`assigner_key` (of the unprefixed namespace)."""


def assigner_key(domain: str, *, ns: bytes = b"") -> bytes:
    """Key of a domain's code assigner state in ``codes`` (``ns``: the namespace's prefix,
    ``b""`` for the unprefixed keys)."""
    return ns + ASSIGNER_PREFIX + domain.encode()


def domain_of_assigner_key(key: bytes, *, ns: bytes = b"") -> str:
    """Inverse of :func:`assigner_key`."""
    return key[len(ns) + len(ASSIGNER_PREFIX) :].decode()


def code_row_prefix(domain: str, *, ns: bytes = b"") -> bytes:
    """The prefix of every :func:`code_row_key` of ``domain``."""
    return ns + b"row\x00" + domain.encode() + _SEP


def code_row_key(domain: str, item_id: str, *, ns: bytes = b"") -> bytes:
    """Key of one item's saved assigner row (:meth:`CodeAssigner.take_rows`)."""
    return code_row_prefix(domain, ns=ns) + item_id.encode()


UNPREFIXED_CODE_PREFIXES = (ASSIGNER_PREFIX, b"row\x00", b"pend\x00")
"""The prefixes of the unprefixed namespace's keys (every domain's), ``hist`` aside."""


def round_pending_prefix(domain: str, *, ns: bytes = b"") -> bytes:
    """The prefix of every :func:`round_pending_key` of ``domain``."""
    return ns + b"pend\x00" + domain.encode() + _SEP


def round_pending_key(domain: str, item_id: str, *, ns: bytes = b"") -> bytes:
    """Key marking an item whose popularity moved since the domain's last code round."""
    return round_pending_prefix(domain, ns=ns) + item_id.encode()


def history_prefix(domain: str) -> bytes:
    """The prefix of every :func:`history_key` of ``domain`` (its changes in time order)."""
    return b"hist\x00" + domain.encode() + _SEP


def history_key(domain: str, ts: int, item_id: str, reason: str) -> bytes:
    """Key of one recorded code change."""
    return history_prefix(domain) + _I64.pack(ts) + f"{item_id}\x00{reason}".encode()


def history_key_ts(domain: str, key: bytes) -> int:
    """The event time of a :func:`history_key` of ``domain``."""
    start = len(history_prefix(domain))
    return int(_I64.unpack(key[start : start + _I64.size])[0])


# --- versions: kind \0 domain [\0 v] --------------------------------------------------------

VersionKind = Literal["rec", "table", "items", "current", "next", "switch", "request", "part"]
"""What a ``versions`` key holds (see the module docstring)."""


def version_key(kind: VersionKind, domain: str, version: int | None = None) -> bytes:
    """Key of a domain's ``kind`` (``version``: the number, or a switch's sequence number)."""
    base = kind.encode() + _SEP + domain.encode()
    return base if version is None else base + _SEP + _I64.pack(version)


def version_prefix(kind: VersionKind, domain: str) -> bytes:
    """The prefix of every numbered ``kind`` key of ``domain``, in number order."""
    return version_key(kind, domain) + _SEP


def version_kind_prefix(kind: VersionKind) -> bytes:
    """The prefix of every ``kind`` key of every domain."""
    return kind.encode() + _SEP


def version_part_key(
    kind: Literal["table", "items"], domain: str, version: int, index: int
) -> bytes:
    """Key of part ``index`` of a version's ``kind`` blob when it is stored in parts
    (``part \0 domain \0 version(>q) \0 kind \0 index(>I)``; see
    :func:`worker.state.versions.put_blob`)."""
    return version_key("part", domain, version) + _SEP + kind.encode() + _SEP + _U32.pack(index)


CURRENT_PREFIX = b"current\x00"
"""The prefix of every current-version pointer (one per domain with a version)."""


def domain_of_current_key(key: bytes) -> str:
    """The domain of a ``current`` key (faster than :func:`version_key_domain`)."""
    return key[len(CURRENT_PREFIX) :].decode()


def version_key_domain(key: bytes) -> str:
    """The domain of any ``versions`` key (``kind \\0 domain [\\0 ...]``)."""
    parts = key.split(_SEP, 2)
    if len(parts) < 2:
        raise KeyLayoutError(f"versions key {key!r} names no domain; it was not written by adacode")
    return parts[1].decode()


# --- fine-tune requests: ``request`` \0 domain in ``versions`` ------------------------------
# A pending fine-tune request is state (worker.state.requests). It lives in the ``versions``
# column family, not in ``meta``, so that it is mirrored to the compacted versions topic with
# the control offset that consumed it: in a group the domain's next owner restores it.

REQUEST_PREFIX = b"request\x00"
"""The prefix of every :func:`finetune_request_key` (one per domain with a pending request)."""


def finetune_request_key(domain: str) -> bytes:
    """Key of ``domain``'s pending fine-tune request in ``versions``."""
    return version_key("request", domain)


def domain_of_request_key(key: bytes) -> str:
    """Inverse of :func:`finetune_request_key`."""
    return key[len(REQUEST_PREFIX) :].decode()


# --- the versions topic ---------------------------------------------------------------------

_MIRRORED_OFFSET_PREFIX = b"\x01offset\x00"


def mirrored_offset_key(offset_key: bytes) -> bytes:
    """The ``versions`` topic key of a control-topic ``offsets`` key."""
    return _MIRRORED_OFFSET_PREFIX + offset_key


def split_mirrored_offset_key(key: bytes) -> bytes | None:
    """The ``offsets`` key a ``versions`` topic key mirrors, or ``None`` when it mirrors a
    ``versions`` key."""
    if key.startswith(_MIRRORED_OFFSET_PREFIX):
        return key[len(_MIRRORED_OFFSET_PREFIX) :]
    return None
