"""Per-domain table versions: immutable records, an atomic current pointer, rollback.

Layout in the ``versions`` column family (``v`` is a big-endian int64; the keys are built by
:func:`worker.state.layout.version_key`)::

    rec    \\0 <domain> \\0 v     -> VersionRecord (JSON)
    table  \\0 <domain> \\0 v     -> model snapshot (npz bytes, written once)
    items  \\0 <domain> \\0 v     -> item ids, their table-row ids and, for models that project
                                  text, their projected text vectors at training time; since
                                  code borrowing, the trained mask and full-path rows (npz)
    current\\0 <domain>           -> v
    next   \\0 <domain>           -> next version number (numbers are never reused)
    switch \\0 <domain> \\0 seq   -> {"from", "to", "reason", "at"}

A version's rows are written once; switching the current version is one write of
the pointer and its switch record, so a reader sees the old table or the new one,
never a mix. Retention keeps the newest ``versions_keep`` published versions, the
current one and pinned ones; older tables are deleted, their records stay.

Item vectors (:class:`ItemVectorizer`): an item's vector is the sum of its code rows
(per-level weighted for ``combine="level"``) plus, when the model projects text
(``text_dim > 0``), the text part ``t(e)`` of the item's frozen embedding ``e``: the text
adaptor ``W @ gelu(A @ e + b)`` (``text_hidden > 0``; ``A``, ``b`` are the snapshot's
``table.text_in.*``, ``W`` its ``table.text_proj.weight``), or ``W @ e`` for versions of a
linear map (:class:`TextMap`). A version stores ``t(e)`` of the items it was trained on
(``text_vectors``, ``[n, hidden]``: 6x smaller than the embeddings at hidden 64 and text_dim
384), so their vectors are rebuilt exactly as trained even if an item is described again
later; an item the version never saw gets ``t`` of its stored embedding. Versions written
before text projection existed (``text_dim = 0``) have no ``text_vectors`` array and read as
before; versions written before the adaptor read as a linear map (their configuration has no
``text_hidden``: :data:`quantize.table_model.ADDED_KEYS`).

Borrowed codes (:meth:`VersionTable.served_rows`): a version also stores which of its
items it trained (``trained``: inputs or targets of a training window) and every item's
full-path rows (``full_rows[i, l] = l * K + path[i, l]``). An item it did not train is
served the deepest prefix of its own full path that the codes of several trained items pass
through (:func:`~quantize.table_model.borrow_trained_codes`), plus its own text part;
trained items are served their own rows. Items coded after the version follow the same
rule through :class:`SharedPrefixes`. Versions written before (no ``trained`` array) read as
"every item trained".
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np
import orjson
import torch
import torch.nn.functional as F

from quantize.exceptions import QuantizeError
from quantize.prefix_nodes import GIL_CHUNK
from quantize.table_model import (
    DOMAIN_PREFIX,
    PAD,
    CodeTableRecommender,
    Snapshot,
    borrow_trained_codes,
    model_from_params,
    served_depth,
    shared_prefixes,
    text_param_shapes,
)
from store.partition import StorePartition, WriteBatch
from worker.state.exceptions import VersionError
from worker.state.layout import (
    CURRENT_PREFIX,
    domain_of_current_key,
    version_key,
    version_kind_prefix,
    version_part_key,
    version_prefix,
)

_V = struct.Struct(">q")

#: a table or items blob larger than this is stored in parts of at most this size (each is one
#: record of the versions topic, whose limit is 64 MiB: worker.ingest.group.MAX_RECORD_BYTES);
#: the blob's own key then holds a manifest that starts with PARTS_MAGIC (blobs are .npz: "PK")
PART_BYTES = 16 * 1024 * 1024
#: the parts' size when they are written ahead of the version's batch (put_blob's
#: ``write_part``, unsynced): a RocksDB write holds the interpreter ~2 ms per MiB, plus
#: ~10-15 ms when it syncs
STAGED_PART_BYTES = 1024 * 1024
PARTS_MAGIC = b"\x00adacode-parts\x00"

TEXT_PROJ = DOMAIN_PREFIX + "text_proj.weight"
"""Snapshot parameter holding the text projection ``W`` ``[hidden, text_hidden or text_dim]``."""
TEXT_IN = DOMAIN_PREFIX + "text_in.weight"
"""Snapshot parameter holding the text adaptor's hidden layer ``A`` ``[text_hidden, text_dim]``."""
TEXT_IN_BIAS = DOMAIN_PREFIX + "text_in.bias"
"""Snapshot parameter holding the text adaptor's hidden bias ``b`` ``[text_hidden]``."""
TEXT_PARAMS = (TEXT_PROJ, TEXT_IN, TEXT_IN_BIAS)
"""Every parameter of the text map."""

PUBLISHED, REJECTED, EXPIRED = "published", "rejected", "expired"


@dataclass(frozen=True)
class VersionRecord:
    version: int
    parent: int | None
    created_at: float
    codebook_id: str
    watermark: dict[str, Any]  # {"offsets": {"topic-partition": next offset}, "ts": event time}
    metrics: dict[str, float]
    status: str = PUBLISHED
    pinned: bool = False
    n_items: int = 0
    table_bytes: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    def of_another_codebook(self, codebook_id: str) -> bool:
        """Whether the version was trained on another codebook than ``codebook_id`` (the one
        the items are coded with now), so its rows stand for other codewords than their
        codes name; unknown on either side (``""``) counts as the same."""
        return bool(self.codebook_id and codebook_id) and self.codebook_id != codebook_id

    @classmethod
    def decode(cls, raw: bytes) -> VersionRecord:
        return cls(**orjson.loads(raw))


@dataclass(frozen=True)
class VersionTable:
    """What serving needs of a version: the model, the items' row ids at training time and,
    when the model projects text, the items' text parts (:class:`TextMap`) at training
    time (``None`` for ``text_dim = 0``). Build one with :meth:`build`.

    ``trained`` (bool ``[n]``) and ``full_rows`` (int64 ``[n, levels]``, the full-path rows
    ``l * K + path[l]``) come together: which items the version trained, and where each
    item sits in the codebook, for serving untrained items borrowed codes (see
    :meth:`served_rows`). ``None`` in versions written before: every item counts as trained.
    """

    snapshot: Snapshot
    item_ids: list[str]
    item_rows: np.ndarray  # int64 [n, width], -1 padded
    text_vectors: np.ndarray | None = None  # float32 [n, hidden]: t(e) per item
    trained: np.ndarray | None = None  # bool [n]: items the version trained
    full_rows: np.ndarray | None = None  # int64 [n, levels]: full-path rows per item

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.item_rows.ndim != 2 or self.item_rows.shape[0] != n:
            raise VersionError(
                f"a version table has {n} item ids but item rows of shape "
                f"{self.item_rows.shape}; pass one padded row-id list per item"
            )
        config = self.snapshot.config
        if config.text_dim > 0:
            want = (n, config.hidden)
            if self.text_vectors is None or self.text_vectors.shape != want:
                got = None if self.text_vectors is None else self.text_vectors.shape
                raise VersionError(
                    f"the model projects text embeddings (text_dim={config.text_dim}) so the "
                    f"version needs text vectors of shape {want}, got {got}; build the table "
                    "with VersionTable.build(..., embeddings=the items' embeddings)"
                )
        elif self.text_vectors is not None:
            raise VersionError(
                "text vectors were given for a model without text projection (text_dim=0); "
                "leave them out"
            )
        self._check_borrowing(n)

    def _check_borrowing(self, n: int) -> None:
        if (self.trained is None) != (self.full_rows is None):
            raise VersionError(
                "a version table needs both the trained mask and the full-path rows of its "
                "items, or neither (a version that counts every item as trained); pass both"
            )
        if self.trained is None or self.full_rows is None:
            return
        if self.trained.shape != (n,) or self.trained.dtype != np.bool_:
            raise VersionError(
                f"the trained mask has shape {self.trained.shape} and dtype "
                f"{self.trained.dtype}; pass one bool per item ({n})"
            )
        full = self.full_rows
        if full.ndim != 2 or full.shape[0] != n or full.shape[1] < 1 or (full < 0).any():
            raise VersionError(
                f"the full-path rows have shape {full.shape} (or hold padding); pass every "
                f"item's full path as level rows l * K + digit, [{n}, levels] without -1"
            )

    @classmethod
    def build(
        cls,
        snapshot: Snapshot,
        item_ids: list[str],
        item_rows: np.ndarray,
        embeddings: np.ndarray | None = None,
        *,
        trained: np.ndarray | None = None,
        full_rows: np.ndarray | None = None,
    ) -> VersionTable:
        """A table whose text vectors are projected from ``embeddings`` ``[n, text_dim]``
        (required when the model projects text, ignored otherwise). ``trained`` and
        ``full_rows``: see the class docstring (both or neither)."""
        rows = np.asarray(item_rows, dtype=np.int64)
        mask = None if trained is None else np.asarray(trained, dtype=bool)
        full = None if full_rows is None else np.asarray(full_rows, dtype=np.int64)
        if snapshot.config.text_dim == 0:
            return cls(snapshot, list(item_ids), rows, None, mask, full)
        if embeddings is None:
            raise VersionError(
                f"the model projects text embeddings (text_dim={snapshot.config.text_dim}); "
                "pass the embeddings of the items it was trained on"
            )
        text = project_text(TextMap.of(snapshot), embeddings)
        return cls(snapshot, list(item_ids), rows, text, mask, full)

    def trained_mask(self) -> np.ndarray:
        """Which items the version trained (bool ``[n]``); all of them in versions written
        before the mask was stored."""
        if self.trained is None:
            return np.ones(len(self.item_ids), dtype=bool)
        return self.trained

    def served_rows(self, borrow: bool = True) -> np.ndarray:
        """The row ids the version serves its items with (``[n, width]``): with ``borrow``,
        untrained items take the deepest prefix their trained relatives share
        (:func:`~quantize.table_model.borrow_trained_codes`); trained items, versions
        without a trained mask and ``borrow=False`` give :attr:`item_rows` unchanged."""
        if not borrow or self.trained is None or self.full_rows is None:
            return self.item_rows
        if self.trained.all() or not len(self.item_ids):
            return self.item_rows
        try:
            return borrow_trained_codes(self.item_rows, self.full_rows, self.trained)
        except QuantizeError as exc:
            raise VersionError(
                f"the version's item rows and full paths do not fit together ({exc}); the "
                "stored version is corrupt: roll back to another version"
            ) from exc


class SharedPrefixes:
    """The path prefixes items coded after a version borrow (the rule of
    :func:`~quantize.table_model.borrow_trained_codes`: the deepest prefix that the served
    codes of several of the version's trained items pass through).

    Built once per index (:meth:`of`, ``O(n * levels)`` in numpy); :meth:`borrow` is
    ``O(levels)`` set lookups per item. ``prefixes``: the shared prefixes, as tuples of
    full-path rows.
    """

    def __init__(self, prefixes: set[tuple[int, ...]], levels: int) -> None:
        self.prefixes = prefixes
        self.levels = levels

    @classmethod
    def of(cls, table: VersionTable, levels: int) -> SharedPrefixes:
        """The shared prefixes of ``table``. A version with full-path rows cuts each trained
        item's full path at its :func:`~quantize.table_model.served_depth`; one without
        (written before) counts every item as trained and cuts its served rows at
        ``levels`` (the disambiguation row sits at position ``levels``)."""
        rows = table.item_rows
        if not len(table.item_ids):
            return cls(set(), levels)
        if table.full_rows is not None:
            levels = int(table.full_rows.shape[1])
            try:
                depth = served_depth(rows, table.full_rows)
            except QuantizeError as exc:
                raise VersionError(
                    f"the version's item rows and full paths do not fit together ({exc}); the "
                    "stored version is corrupt: roll back to another version"
                ) from exc
            paths = table.full_rows
        else:
            paths = rows[:, :levels]
            depth = np.cumprod(paths != PAD, axis=1).sum(axis=1)
        prefixes = {
            tuple(prefix)
            for level in shared_prefixes(paths, depth, table.trained_mask())
            for prefix in level.tolist()
        }
        return cls(prefixes, levels)

    def borrow(self, full_rows: np.ndarray) -> tuple[int, ...] | None:
        """The deepest shared prefix of the path ``full_rows`` (its level rows), or ``None``
        when none of its prefixes is shared."""
        path = tuple(int(r) for r in full_rows[: self.levels])
        for d in range(len(path), 0, -1):
            if path[:d] in self.prefixes:
                return path[:d]
        return None


@dataclass(frozen=True)
class TextMap:
    """A version's map from frozen text embeddings ``e`` to the text part of item vectors:
    ``W @ gelu(A @ e + b)`` with the text adaptor (``text_hidden > 0``), ``W @ e`` without.

    ``weight``: ``W`` ``[hidden, width]`` (the snapshot's :data:`TEXT_PROJ`); ``hidden_weight``
    / ``hidden_bias``: ``A`` ``[text_hidden, text_dim]`` / ``b`` (:data:`TEXT_IN`,
    :data:`TEXT_IN_BIAS`), ``None`` for a linear map. Applied with torch's own linear and
    GELU, so the numbers are the model's.
    """

    weight: np.ndarray
    hidden_weight: np.ndarray | None = None
    hidden_bias: np.ndarray | None = None

    @property
    def text_dim(self) -> int:
        source = self.weight if self.hidden_weight is None else self.hidden_weight
        return int(source.shape[1])

    @classmethod
    def of(cls, snapshot: Snapshot) -> TextMap | None:
        """The snapshot's text map (float32), or ``None`` when it projects no text."""
        config = snapshot.config
        expected = text_param_shapes(config)
        if not expected:
            return None
        for name, shape in expected.items():
            array = snapshot.params.get(name)
            if array is None or array.shape != shape:
                got = None if array is None else array.shape
                raise VersionError(
                    f"the snapshot says text_dim={config.text_dim}, "
                    f"text_hidden={config.text_hidden} but {name!r} has shape {got}, not "
                    f"{shape}; the stored version is corrupt: roll back to another version"
                )
        arrays = {n: np.asarray(snapshot.params[n], dtype=np.float32) for n in expected}
        return cls(arrays[TEXT_PROJ], arrays.get(TEXT_IN), arrays.get(TEXT_IN_BIAS))

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """The text parts (float32 ``[n, hidden]``) of ``embeddings`` ``[n, text_dim]``
        (float16 or float32), :data:`PROJECT_CHUNK` rows at a time."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[1] != self.text_dim:
            raise VersionError(
                f"embeddings of shape {emb.shape} do not fit the text map of "
                f"text_dim={self.text_dim}; pass [n, {self.text_dim}] embeddings (the "
                "worker's embedding_dim)"
            )
        out = np.empty((emb.shape[0], self.weight.shape[0]), dtype=np.float32)
        weight = torch.from_numpy(self.weight)
        hidden = None
        if self.hidden_weight is not None and self.hidden_bias is not None:
            hidden = (torch.from_numpy(self.hidden_weight), torch.from_numpy(self.hidden_bias))
        with torch.no_grad():
            for start in range(0, emb.shape[0], PROJECT_CHUNK):
                part = torch.from_numpy(
                    np.ascontiguousarray(emb[start : start + PROJECT_CHUNK], dtype=np.float32)
                )
                if hidden is not None:
                    part = F.gelu(F.linear(part, *hidden))
                out[start : start + len(part)] = F.linear(part, weight).numpy()
        return out


PROJECT_CHUNK = 1 << 16
"""Embeddings widened to float32 at once by :meth:`TextMap.apply` (float16 ones are not
copied whole)."""


def project_text(text_map: TextMap | None, embeddings: np.ndarray) -> np.ndarray:
    """The text parts of ``embeddings`` by ``text_map`` (:meth:`TextMap.apply`); an error
    for a version that projects no text."""
    if text_map is None:
        raise VersionError("the version projects no text (text_dim=0); there is no text map")
    return text_map.apply(embeddings)


class ItemVectorizer:
    """A version's item-vector function (see the module docstring).

    :attr:`model` is the version's model without its text projection (same code table and
    sequence encoder): its ``item_vectors`` are the code parts, and its ``encode`` gives
    the user states of the full version.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.config = snapshot.config
        self.text_map = TextMap.of(snapshot)
        params = {k: v for k, v in snapshot.params.items() if k not in TEXT_PARAMS}
        try:
            model = model_from_params(replace(snapshot.config, text_dim=0), params)
        except QuantizeError as exc:
            raise VersionError(
                f"the stored model cannot be rebuilt ({exc}); roll back to another version"
            ) from exc
        self.model: CodeTableRecommender = model.eval()
        self.n_rows = int(model.table.n_rows)

    @property
    def hidden(self) -> int:
        return self.config.hidden

    @property
    def text_dim(self) -> int:
        return self.config.text_dim

    def code_part(self, item_rows: np.ndarray) -> np.ndarray:
        """Sums of code rows ``[n, hidden]`` (float32); rows this version never had are left
        out (a disambiguation digit handed out after it was trained)."""
        rows = np.asarray(item_rows, dtype=np.int64)
        if rows.shape[0] == 0:
            return np.zeros((0, self.hidden), dtype=np.float32)
        rows = np.where(rows < self.n_rows, rows, -1)
        with torch.no_grad():
            out = self.model.item_vectors(torch.as_tensor(rows))
        return out.numpy().astype(np.float32)

    def text_part(self, embeddings: np.ndarray) -> np.ndarray:
        """The text map of each embedding row (``[n, hidden]``); only for ``text_dim > 0``."""
        return project_text(self.text_map, embeddings)

    def vectors(self, item_rows: np.ndarray, text_vectors: np.ndarray | None) -> np.ndarray:
        """Item vectors ``[n, hidden]``: code parts plus the given text parts (:meth:`text_part`)."""
        out = self.code_part(item_rows)
        if self.text_map is None:
            return out
        if text_vectors is None or text_vectors.shape != out.shape:
            got = None if text_vectors is None else text_vectors.shape
            raise VersionError(
                f"the version projects text (text_dim={self.text_dim}): item vectors need "
                f"text parts of shape {out.shape}, got {got}; pass the text part of each item (text_part)"
            )
        return out + text_vectors.astype(np.float32, copy=False)


def _narrow(values: np.ndarray) -> np.ndarray:
    """Integer row ids in the smallest signed type that holds them (int16 for any codebook
    of up to 32,767 rows); read back as int64 (:func:`decode_items`)."""
    a = np.asarray(values, dtype=np.int64)
    if not a.size:
        return a
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= int(a.min()) and int(a.max()) <= info.max:
            return a.astype(dtype)
    return a


def utf8_ids(item_ids: Sequence[str]) -> np.ndarray:
    """The ids as one array of UTF-8 bytes (what ``np.char.encode`` of their unicode array
    gives), :data:`~quantize.prefix_nodes.GIL_CHUNK` ids per C-level call: the two
    whole-catalogue calls held the interpreter ~0.5 s at a million ids, while a version was
    written beside the threads that answer HTTP."""
    raw: list[bytes] = []
    for lo in range(0, len(item_ids), GIL_CHUNK):
        raw += [i.encode() for i in item_ids[lo : lo + GIL_CHUNK]]
    width = max((len(b) for b in raw), default=1)
    out = np.empty(len(raw), dtype=f"S{max(width, 1)}")
    for lo in range(0, len(raw), GIL_CHUNK):
        out[lo : lo + GIL_CHUNK] = raw[lo : lo + GIL_CHUNK]
    return out


def encode_items(
    item_ids: list[str],
    item_rows: np.ndarray,
    text_vectors: np.ndarray | None = None,
    trained: np.ndarray | None = None,
    full_rows: np.ndarray | None = None,
) -> bytes:
    """A version's items as one ``.npz`` blob: ids as UTF-8 bytes and row ids in the
    smallest integer type (about 35 bytes an item at 5 levels, where unicode ids and int64
    rows took ~142: a version of 1M items is ~35 MB, under the versions topic's 64 MiB
    record; blobs written before are read as they are)."""
    arrays: dict[str, np.ndarray] = {
        "ids_utf8": utf8_ids(item_ids),
        "rows": _narrow(item_rows),
    }
    if text_vectors is not None:
        arrays["text_vectors"] = np.asarray(text_vectors, dtype=np.float32)
    if trained is not None:
        arrays["trained"] = np.asarray(trained, dtype=bool)
    if full_rows is not None:
        arrays["full_rows"] = _narrow(full_rows)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


@dataclass(frozen=True)
class StoredItems:
    """A version's items blob, decoded (optional arrays are ``None`` in older versions)."""

    item_ids: list[str]
    item_rows: np.ndarray
    text_vectors: np.ndarray | None
    trained: np.ndarray | None
    full_rows: np.ndarray | None


def decode_items(raw: bytes) -> StoredItems:
    """Item ids, row ids, and the optional text vectors (``None`` in versions without text
    projection), trained mask and full-path rows (``None`` in versions before borrowing)."""
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        names = set(z.files)

        def optional(name: str) -> np.ndarray | None:
            return z[name] if name in names else None

        if "ids_utf8" in names:
            raw_ids = z["ids_utf8"]
            ids = []
            for lo in range(0, len(raw_ids), GIL_CHUNK):  # a million in one tolist: ~30 ms held
                ids += [b.decode("utf-8") for b in raw_ids[lo : lo + GIL_CHUNK].tolist()]
        else:  # written before ids were stored as UTF-8 bytes
            ids = [str(s) for s in z["ids"]]
        full = optional("full_rows")
        return StoredItems(
            ids,
            z["rows"].astype(np.int64, copy=False),
            optional("text_vectors"),
            optional("trained"),
            None if full is None else full.astype(np.int64, copy=False),
        )


# --- blobs in parts ---------------------------------------------------------------------------

BlobKind = Literal["table", "items"]


PartWriter = Callable[[bytes, bytes], None]
"""Writes one part of a blob (a ``versions`` key and value) ahead of the version's batch."""


def put_blob(
    batch: WriteBatch,
    kind: BlobKind,
    domain: str,
    version: int,
    blob: bytes,
    *,
    part_bytes: int = PART_BYTES,
    write_part: PartWriter | None = None,
    store: StorePartition | None = None,
) -> None:
    """Put a version's ``kind`` blob: under its key when it fits in ``part_bytes``, else in
    parts (:func:`version_part_key`) with a manifest under its key.

    With ``write_part`` (and the ``store`` it writes to), parts of at most
    :data:`STAGED_PART_BYTES` are written one by one ahead of ``batch``, which takes only the
    manifest: a RocksDB write holds the interpreter while it runs, and one batch of a million
    items' version (~0.2 GB) stalled every other thread, the HTTP server's included, for
    0.5-1.5 s. Nothing reads parts before the manifest lands with the version's record, and
    a run that dies in between leaves parts under a number the next run takes again: they
    are overwritten, and those past the new blob's parts are deleted in ``batch``."""
    key = version_key(kind, domain, version)
    if write_part is not None:
        part_bytes = min(part_bytes, STAGED_PART_BYTES)
    if len(blob) <= part_bytes:
        if write_part is not None and store is not None:
            _delete_stale_parts(store, batch, kind, domain, version, 0)
        batch.put("versions", key, blob)
        return
    view = memoryview(blob)
    parts = range(0, len(blob), part_bytes)
    put = batch.put if write_part is None else lambda cf, k, v: write_part(k, v)
    for index, start in enumerate(parts):
        put(
            "versions",
            version_part_key(kind, domain, version, index),
            bytes(view[start : start + part_bytes]),
        )
    if write_part is not None and store is not None:
        _delete_stale_parts(store, batch, kind, domain, version, len(parts))
    manifest = {"parts": len(parts), "bytes": len(blob), "crc32": zlib.crc32(blob)}
    batch.put("versions", key, PARTS_MAGIC + orjson.dumps(manifest))


def _delete_stale_parts(
    store: StorePartition,
    batch: WriteBatch,
    kind: BlobKind,
    domain: str,
    version: int,
    first: int,
) -> None:
    """Delete the parts from index ``first`` on that an earlier, unfinished write of the same
    version left (a run writes its parts in index order, so they follow each other)."""
    index = first
    while store.get("versions", version_part_key(kind, domain, version, index)) is not None:
        batch.delete("versions", version_part_key(kind, domain, version, index))
        index += 1


def _manifest(raw: bytes | None) -> dict[str, Any] | None:
    """The manifest a blob's key holds when the blob is in parts (``None``: a whole blob, or
    nothing stored)."""
    if raw is None or not raw.startswith(PARTS_MAGIC):
        return None
    return cast(dict[str, Any], orjson.loads(raw[len(PARTS_MAGIC) :]))


def get_blob(store: StorePartition, kind: BlobKind, domain: str, version: int) -> bytes | None:
    """A version's ``kind`` blob, joined from its parts when it was stored in parts
    (``None``: not stored; a part missing or corrupt: :class:`VersionError`)."""
    raw = store.get("versions", version_key(kind, domain, version))
    manifest = _manifest(raw)
    if manifest is None:
        return raw
    keys = [version_part_key(kind, domain, version, i) for i in range(int(manifest["parts"]))]
    # one part per read: a read copies its values into Python while it holds the
    # interpreter, and one multi-get of a million items' ~0.3 GB held it ~150 ms
    parts = [store.get("versions", key) for key in keys]
    missing = [i for i, part in enumerate(parts) if part is None]
    if missing:
        raise VersionError(
            f"version {version} of {domain!r}: {len(missing)} of {len(keys)} parts of its "
            f"{kind} are missing (first: part {missing[0]}); roll back to another version"
        )
    blob = b"".join(p for p in parts if p is not None)
    if len(blob) != manifest["bytes"] or zlib.crc32(blob) != manifest["crc32"]:
        raise VersionError(
            f"version {version} of {domain!r}: its {kind} parts do not add up to what was "
            f"written ({len(blob)} of {manifest['bytes']} bytes or a checksum mismatch)"
        )
    return blob


def delete_blob(
    store: StorePartition, batch: WriteBatch, kind: BlobKind, domain: str, version: int
) -> None:
    """Delete a version's ``kind`` blob and its parts (each a tombstone on the topic)."""
    key = version_key(kind, domain, version)
    raw = store.get("versions", key)
    manifest = _manifest(raw)
    if manifest is not None:
        for index in range(int(manifest["parts"])):
            batch.delete("versions", version_part_key(kind, domain, version, index))
    batch.delete("versions", key)


# --- reads ---------------------------------------------------------------------------------


def current_version(store: StorePartition, domain: str) -> int | None:
    raw = store.get("versions", version_key("current", domain))
    return None if raw is None else int(_V.unpack(raw)[0])


def get_record(store: StorePartition, domain: str, version: int) -> VersionRecord | None:
    raw = store.get("versions", version_key("rec", domain, version))
    return None if raw is None else VersionRecord.decode(raw)


def list_records(store: StorePartition, domain: str) -> list[VersionRecord]:
    prefix = version_prefix("rec", domain)
    return [VersionRecord.decode(v) for _, v in store.items("versions", prefix=prefix)]


def switches(store: StorePartition, domain: str) -> list[dict[str, Any]]:
    prefix = version_prefix("switch", domain)
    return [orjson.loads(v) for _, v in store.items("versions", prefix=prefix)]


def codebooks_in_use(store: StorePartition) -> set[str]:
    """The codebooks that a published version of any domain was trained on: the codes that
    serving it, now or after a rollback, needs (expired and rejected versions need none)."""
    used = set()
    for _, raw in store.items("versions", prefix=version_kind_prefix("rec")):
        record = VersionRecord.decode(raw)
        if record.status == PUBLISHED and record.codebook_id:
            used.add(record.codebook_id)
    return used


def domains_with_versions(store: StorePartition) -> list[str]:
    return sorted(
        domain_of_current_key(k) for k, _ in store.items("versions", prefix=CURRENT_PREFIX)
    )


def load_table(store: StorePartition, domain: str, version: int) -> VersionTable:
    table = get_blob(store, "table", domain, version)
    items = get_blob(store, "items", domain, version)
    if table is None or items is None:
        record = get_record(store, domain, version)
        status = "unknown" if record is None else record.status
        raise VersionError(
            f"domain {domain!r} has no table for version {version} (status {status}); "
            f"list the versions with: adacode versions --domain {domain}"
        )
    stored = decode_items(items)
    try:
        snapshot = Snapshot.from_bytes(table)
    except QuantizeError as exc:
        raise VersionError(f"version {version} of {domain!r}: {exc}") from exc
    return VersionTable(
        snapshot,
        stored.item_ids,
        stored.item_rows,
        stored.text_vectors,
        stored.trained,
        stored.full_rows,
    )


def item_vectors(
    table: VersionTable, positions: np.ndarray | None = None, *, borrow: bool = True
) -> np.ndarray:
    """The version's served item vectors ``[n_items, hidden]`` (float32), in
    ``table.item_ids`` order (only the items at ``positions`` when given); ``borrow``: see
    :meth:`VersionTable.served_rows`."""
    rows, text = table.served_rows(borrow), table.text_vectors
    if positions is not None:
        rows = rows[positions]
        text = None if text is None else text[positions]
    return ItemVectorizer(table.snapshot).vectors(rows, text)


def export_arrays(
    table: VersionTable, *, borrow: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What a serving system needs of a version, as named arrays with their descriptions.

    Always: ``item_ids``, ``item_vectors`` (the served vectors), ``item_rows`` (the served
    row ids: borrowed codes for untrained items, see :meth:`VersionTable.served_rows`) and
    the code table ``rows``; ``level_weight`` for ``combine="level"``; with text projection,
    ``text_proj`` (``W``), for the text adaptor ``text_in`` / ``text_in_bias`` (``A``, ``b``),
    and ``item_text_vectors`` (the text parts of the version's items), so a new item's
    vector is ``sum_j level_weight[j] * rows[r_j] + W @ gelu(A @ e + b)`` (``W @ e`` without
    the adaptor);
    with a trained mask, ``item_trained`` and ``item_full_rows`` (a new item borrows the
    deepest ``item_rows`` of a trained item that is a prefix of its full-path rows).
    """
    params = table.snapshot.params
    arrays: dict[str, np.ndarray] = {
        "item_ids": np.asarray(table.item_ids, dtype=str),
        "item_vectors": item_vectors(table, borrow=borrow),
        "item_rows": np.asarray(table.served_rows(borrow), dtype=np.int64),
        "rows": params[DOMAIN_PREFIX + "rows"],
    }
    described = {
        "item_ids": "item ids",
        "item_vectors": "float32 [n, dim]: code part + text part (the served vectors)",
        "item_rows": "served table row ids per item (-1 pad)",
        "rows": "the code table [n_rows, dim]",
    }
    if table.trained is not None and table.full_rows is not None:
        arrays["item_trained"] = table.trained
        arrays["item_full_rows"] = table.full_rows
        described["item_trained"] = "bool [n]: items the version trained"
        described["item_full_rows"] = "int64 [n, levels]: full-path rows l * K + digit"
    if DOMAIN_PREFIX + "level_weight" in params:
        arrays["level_weight"] = params[DOMAIN_PREFIX + "level_weight"]
        described["level_weight"] = "weight of the row at each code position"
    text_map = TextMap.of(table.snapshot)
    if text_map is not None and table.text_vectors is not None:
        arrays["text_proj"] = text_map.weight
        arrays["item_text_vectors"] = table.text_vectors
        if text_map.hidden_weight is not None and text_map.hidden_bias is not None:
            arrays["text_in"] = text_map.hidden_weight
            arrays["text_in_bias"] = text_map.hidden_bias
            described["text_in"] = "float32 [text_hidden, text_dim] A: the text adaptor's layer"
            described["text_in_bias"] = "float32 [text_hidden] b: its bias"
            described["text_proj"] = (
                "float32 [dim, text_hidden] W: an item's vector adds "
                "W @ gelu(A @ e + b) of its frozen text embedding e (exact, erf GELU)"
            )
        else:
            described["text_proj"] = (
                "float32 [dim, text_dim] W: an item's vector adds W @ its frozen text embedding"
            )
        described["item_text_vectors"] = "float32 [n, dim]: the text part of each item"
    return arrays, described


# --- writes --------------------------------------------------------------------------------


def _next_number(store: StorePartition, domain: str) -> int:
    raw = store.get("versions", version_key("next", domain))
    return 1 if raw is None else int(_V.unpack(raw)[0])


def _put_switch(
    store: StorePartition, batch: WriteBatch, domain: str, old: int | None, new: int, reason: str
) -> None:
    prefix = version_prefix("switch", domain)
    seq = sum(1 for _ in store.items("versions", prefix=prefix))
    batch.put("versions", version_key("current", domain), _V.pack(new))
    batch.put(
        "versions",
        version_key("switch", domain, seq),
        orjson.dumps({"from": old, "to": new, "reason": reason, "at": time.time()}),
    )


def add_version(
    store: StorePartition,
    batch: WriteBatch,
    domain: str,
    record: VersionRecord,
    table: VersionTable | None,
    *,
    keep: int,
    write_part: PartWriter | None = None,
) -> VersionRecord:
    """Put a new version (numbered here) into ``batch``; switch to it if it is published.
    ``write_part``: where the parts of its large blobs are written ahead of ``batch`` (see
    :func:`put_blob`); without it every part goes into ``batch``.

    1. Take the next version number (never reused, even for rejected candidates).
    2. Write the table and the item rows once (published versions only).
    3. Write the record.
    4. Switch the current pointer and log the switch (published versions only).
    5. Expire tables beyond the retention (records stay, with status ``expired``).
    """
    # -- 1. number ------------------------------------------------------------------------
    number = _next_number(store, domain)
    record = replace(record, version=number)
    batch.put("versions", version_key("next", domain), _V.pack(number + 1))
    # -- 2. table -------------------------------------------------------------------------
    if record.status == PUBLISHED:
        if table is None:
            raise VersionError(f"version {number} of {domain!r} is published without a table")
        table_bytes = table.snapshot.to_bytes()
        put_blob(batch, "table", domain, number, table_bytes, write_part=write_part, store=store)
        items = encode_items(
            table.item_ids, table.item_rows, table.text_vectors, table.trained, table.full_rows
        )
        put_blob(batch, "items", domain, number, items, write_part=write_part, store=store)
    # -- 3. record ------------------------------------------------------------------------
    batch.put("versions", version_key("rec", domain, number), record.encode())
    # -- 4. switch ------------------------------------------------------------------------
    if record.status == PUBLISHED:
        _put_switch(store, batch, domain, current_version(store, domain), number, "publish")
    # -- 5. retention ---------------------------------------------------------------------
    if record.status == PUBLISHED:
        published = [r for r in list_records(store, domain) if r.status == PUBLISHED] + [record]
        published.sort(key=lambda r: r.version)
        for old in published[:-keep] if keep > 0 else []:
            if old.pinned or old.version == number:
                continue
            delete_blob(store, batch, "table", domain, old.version)
            delete_blob(store, batch, "items", domain, old.version)
            batch.put(
                "versions",
                version_key("rec", domain, old.version),
                replace(old, status=EXPIRED).encode(),
            )
    return record


def rollback(
    store: StorePartition,
    batch: WriteBatch,
    domain: str,
    *,
    to: int | None = None,
    previous: bool = False,
) -> tuple[int | None, int]:
    """Switch ``domain`` to version ``to`` (or the published one before the current).

    Returns ``(from, to)``. Raises :class:`VersionError` naming what is available.
    """
    current = current_version(store, domain)
    records = {r.version: r for r in list_records(store, domain)}
    servable = sorted(v for v, r in records.items() if r.status == PUBLISHED)
    if previous:
        older = [v for v in servable if current is None or v < current]
        if not older:
            raise VersionError(
                f"domain {domain!r} has no published version before {current}; "
                f"servable versions: {servable or 'none'}"
            )
        to = older[-1]
    if to is None:
        raise VersionError("rollback needs a version (--to V) or --previous")
    if to not in records or records[to].status != PUBLISHED:
        status = records[to].status if to in records else "unknown"
        raise VersionError(
            f"cannot roll domain {domain!r} back to version {to} ({status}); "
            f"servable versions: {servable or 'none'}"
        )
    _put_switch(store, batch, domain, current, to, "rollback")
    return current, to


def set_pinned(
    store: StorePartition, batch: WriteBatch, domain: str, version: int, pinned: bool
) -> None:
    record = get_record(store, domain, version)
    if record is None:
        raise VersionError(f"domain {domain!r} has no version {version}")
    batch.put(
        "versions", version_key("rec", domain, version), replace(record, pinned=pinned).encode()
    )
