"""Served codes: which prefix of its full path each item is served, kept stable over time.

Served code
    A tuple of digits. Digit ``i < L`` is the item's codeword index at level ``i`` (so the
    code is always a prefix of the item's full path); an optional digit at position ``L``
    (only after all ``L`` path digits) is a *disambiguation digit*.

Disambiguation digits
    Head items never share a served code. Where head items still collide at full depth
    (identical full paths, e.g. near-duplicate texts), all but one keep the plain path
    and the others get a disambiguation digit. Digits count ``0, 1, 2, ...`` in a
    deterministic order, as in TIGER, but the counter is per *domain* (per assigner), not
    per full path: the digit is then a compact id of a disambiguation row that belongs to
    that one item only. With a per-path counter, the rows ``(L, 0)``, ``(L, 1)`` would be
    shared by unrelated items of different paths, and the deepest row of a disambiguated
    head item would not be its own. An item keeps its digit for life (it gets the same
    digit, hence the same trained row, back after a demotion and re-promotion).

Table rows (VQ-Rec style, see :func:`row_ids`)
    Level digit ``c`` at level ``i`` uses row ``i * K + c``: rows are per (level, codeword)
    and shared by every item whose code holds that digit there. Disambiguation digit ``j``
    uses row ``L * K + j``. The item vector is a combination (the model decides: sum or
    mean) of the rows of its served code, so two head items that differ only at a deep
    level share all rows but one, and a disambiguated item owns its last row. The table
    has ``L * K + (number of digits handed out)`` rows.

Stability rules of :class:`CodeAssigner`
    * Full paths never change, except by re-adding a key with a new path (``recode``).
    * Lengthening is immediate and only *appends* digits (promotion, deeper policy length,
      uniqueness): the served prefix never changes.
    * Head items never get shorter. Shortening is lazy *demotion*: a non-head item is
      shortened (to its policy length, its disambiguation digit dropped) only after its
      policy length stayed below its served length for ``demote_after`` consecutive
      popularity rounds (calls of :meth:`CodeAssigner.update_popularity` /
      :meth:`CodeAssigner.set_thresholds`). With the head hysteresis (enter/exit
      thresholds), a head item is shortened only after it fell below the exit threshold
      and stayed non-head that long. Consequence for the ``reverse`` policy (head items
      short): an item promoted later keeps its longer tail code, since promotion may only
      append; reverse lengths apply to items that are head when added and to rebuilds
      with :func:`assign_codes`.
    * Head uniqueness: when head items share a served code, the *incumbent* (the one
      already served that code) keeps it, then the more popular one, then the one added
      first; the others are deepened by one digit (or get a disambiguation digit at full
      depth) until all head codes differ.
    * A head item may share its code with tail items: they borrow its vector, which is
      the point of sharing rows. Tail items may share codes with each other.
"""

from __future__ import annotations

import gc
import io
import json
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from quantize.exceptions import AssignmentError, LengthPolicyError
from quantize.lengths import (
    DEFAULT_HEAD_FRACTION,
    POLICIES,
    LengthPolicy,
    PrefixStats,
    check_paths,
    check_vector,
    head_flags,
    is_per_item,
    make_policy,
    policy_lengths,
    thresholds_for_fraction,
)
from quantize.prefix_nodes import (
    GIL_CHUNK,
    PrefixNodes,
    code_key,
    join_records,
    number_keys,
    row_keys,
    row_tuples,
    take_items,
)

STATE_VERSION = 1
DEFAULT_DEMOTE_AFTER = 3

Code = tuple[int, ...]
#: a served code as the key of the assigner's long-lived dictionaries (:func:`code_key`)
CodeKey = bytes


@contextmanager
def _bad_input() -> Iterator[None]:
    """Raise the input and policy errors of :mod:`quantize.lengths` as
    :class:`AssignmentError` (the one error class of this module's entry points)."""
    try:
        yield
    except LengthPolicyError as exc:
        raise AssignmentError(str(exc)) from exc


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: a round makes many short-lived tuples and
    lists (codes) but no cycles, and each collection they trigger would walk every tracked
    object of the process (the catalogue's too), a cost growing with the catalogue."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


@dataclass(frozen=True)
class CodeChange:
    """One served-code change: ``new`` replaces ``old`` (``()`` for a new item).

    ``reason`` is one of ``new``, ``recode`` (new full path), ``promote`` (became head and
    got longer), ``deepen`` (longer for another reason), ``disambiguate`` (a
    disambiguation digit was appended), ``demote`` (a non-head item got shorter, lazily:
    after leaving the head, or after its policy length dropped, ``demote_after`` rounds).
    """

    key: str
    old: Code
    new: Code
    reason: str
    ts: int


def row_ids(served_code: Sequence[int], k: int, levels: int) -> np.ndarray:
    """Embedding-table rows of a served code (int64): ``i * k + digit`` per level digit,
    ``levels * k + digit`` for a disambiguation digit at position ``levels``.

    The item vector is the combination of these rows (see the module docstring).
    """
    code = [int(c) for c in served_code]
    if len(code) > levels + 1:
        raise AssignmentError(
            f"row_ids: a served code has at most {levels + 1} digits (L={levels} plus one "
            f"disambiguation digit), got {len(code)}; pass a code from this domain"
        )
    if any(c < 0 for c in code) or any(c >= k for c in code[:levels]):
        raise AssignmentError(
            f"row_ids: code {tuple(code)} holds digits outside [0, {k}); pass a code made "
            f"with a K={k} codebook"
        )
    rows = [level * k + c for level, c in enumerate(code[:levels])]
    if len(code) == levels + 1:
        rows.append(levels * k + code[levels])
    return np.asarray(rows, dtype=np.int64)


# -- vectorized core ------------------------------------------------------------------------


def _code_keys(
    paths: np.ndarray, lengths: np.ndarray, digits: np.ndarray, uses_digit: np.ndarray
) -> np.ndarray:
    """A row per item that is equal for two items iff their served codes are equal."""
    levels = paths.shape[1]
    cols = np.arange(levels)[None, :]
    prefix = np.where(cols < lengths[:, None], paths, -1)
    last = np.where(uses_digit, digits, -1)
    return np.concatenate([lengths[:, None], prefix, last[:, None]], axis=1)


def group_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of an int matrix ``[n, m]``, in lexicographic (numeric) order:
    ``(inverse, counts, first)``: each row's group, each group's size and the index of its
    first row (in a stable sort). The groups of ``np.unique(rows, axis=0)``, by
    :func:`numpy.lexsort` over the columns: ``np.unique(axis=0)`` compares rows as bytes
    in one call that holds the interpreter (~0.3 s at 200k rows of 8), every other thread
    waiting; lexsort lets them run and is several times faster."""
    n = rows.shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    order = np.lexsort(rows.T[::-1])
    ranked = rows[order]
    starts = np.concatenate([[True], np.any(ranked[1:] != ranked[:-1], axis=1)])
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    at = np.flatnonzero(starts)
    return inverse, np.diff(np.append(at, n)), order[at]


def _make_head_unique(
    paths: np.ndarray,
    lengths: np.ndarray,
    uses_digit: np.ndarray,
    digits: np.ndarray,
    is_head: np.ndarray,
    popularity: np.ndarray,
    next_digit: int,
    incumbent: np.ndarray | None = None,
) -> int:
    """Deepen colliding head items in place until head codes are unique.

    Who keeps a contested code: an ``incumbent`` (served that very code before), then the
    more popular item, then the lower index; the others get one more digit (or a
    disambiguation digit at full depth; ``digits`` of those without one are allocated from
    ``next_digit`` in index order). Returns the new ``next_digit``.
    """
    held = np.zeros(len(popularity), dtype=bool) if incumbent is None else incumbent
    levels = paths.shape[1]
    heads = np.flatnonzero(is_head)
    # every round deepens at least one item by one digit, and no code has more than L + 1
    for _ in range((levels + 2) * max(1, heads.size)):
        if heads.size < 2:
            break
        keys = _code_keys(paths[heads], lengths[heads], digits[heads], uses_digit[heads])
        inv, counts, _ = group_rows(keys)
        dup = counts[inv] > 1
        if not dup.any():
            break
        # keeper per group: highest priority, then lowest index
        cand = heads[dup]
        groups = inv[dup]
        order = np.lexsort((cand, -popularity[cand], ~held[cand], groups))
        first = np.ones(order.size, dtype=bool)
        first[1:] = groups[order][1:] != groups[order][:-1]
        losers = np.sort(cand[order][~first])
        was_full = lengths[losers] >= levels
        deeper = losers[~was_full]
        at_full = losers[was_full & ~uses_digit[losers]]
        lengths[deeper] += 1
        if at_full.size == 0 and deeper.size == 0:
            raise AssignmentError(
                "head codes cannot be made unique: colliding head items already hold "
                "disambiguation digits; the assigner state is inconsistent, rebuild it"
            )
        for i in at_full:
            if digits[i] < 0:
                digits[i] = next_digit
                next_digit += 1
            uses_digit[i] = True
    else:
        raise AssignmentError(
            "head codes could not be made unique within the round limit; the assigner "
            "state is inconsistent, rebuild it"
        )
    return next_digit


@dataclass(frozen=True, eq=False)
class ServedCodes:
    """Served codes of a batch of items, as arrays (see the module docstring).

    ``lengths`` counts path digits only; ``digits[i] >= 0`` with ``uses_digit[i]`` means
    item ``i``'s code ends with disambiguation digit ``digits[i]``.
    """

    paths: np.ndarray  # int64 [n, L]
    lengths: np.ndarray  # int64 [n]
    digits: np.ndarray  # int64 [n], -1 = none
    uses_digit: np.ndarray  # bool [n]
    is_head: np.ndarray  # bool [n]
    k: int
    n_digit_rows: int

    @property
    def levels(self) -> int:
        return int(self.paths.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.paths.shape[0])

    @property
    def served_lengths(self) -> np.ndarray:
        """Digits per served code, disambiguation digit included."""
        return self.lengths + self.uses_digit.astype(np.int64)

    @property
    def table_rows(self) -> int:
        """Rows of the code table: ``L * K`` level rows plus the disambiguation rows."""
        return self.levels * self.k + self.n_digit_rows

    def code(self, i: int) -> Code:
        base = tuple(int(c) for c in self.paths[i, : self.lengths[i]])
        return (*base, int(self.digits[i])) if self.uses_digit[i] else base

    def codes(self) -> list[Code]:
        return [self.code(i) for i in range(self.n_items)]

    def row_matrix(self) -> np.ndarray:
        """Row ids per item, int64 ``[n, L + 1]``, padded with ``-1`` (for batched lookup)."""
        levels = self.paths.shape[1]
        cols = np.arange(levels)[None, :]
        rows = np.where(cols < self.lengths[:, None], cols * self.k + self.paths, -1)
        extra = np.where(self.uses_digit, levels * self.k + self.digits, -1)
        return np.concatenate([rows, extra[:, None]], axis=1)


def assign_codes(
    paths: np.ndarray,
    popularity: np.ndarray | None,
    policy: LengthPolicy,
    *,
    k: int,
    is_head: np.ndarray | None = None,
    head_fraction: float = DEFAULT_HEAD_FRACTION,
    unique_head: bool = True,
) -> ServedCodes:
    """Served codes for a whole batch at once (benchmarks, re-coding a domain).

    ``is_head=None`` makes the top ``head_fraction`` of items by popularity head
    (:func:`thresholds_for_fraction`). ``unique_head=False`` skips the uniqueness step (to
    measure a policy's raw collisions). Deterministic: ties go to the lower index.
    Every bad input raises :class:`AssignmentError`.
    """
    with _bad_input():
        p = check_paths(paths, "assign_codes")
        n = p.shape[0]
        if p.size and p.max() >= k:
            raise AssignmentError(
                f"assign_codes: paths hold digit {int(p.max())} >= k={k}; pass the codebook's K"
            )
        pop = check_vector(popularity, n, "assign_codes")
        if is_head is None:
            enter, exit_ = thresholds_for_fraction(pop, head_fraction)
            head = head_flags(pop, None, enter, exit_)
        else:
            head = np.asarray(is_head, dtype=bool)
            if head.shape != (n,):
                raise AssignmentError(
                    f"assign_codes: is_head has shape {head.shape}, expected ({n},)"
                )
        stats = PrefixStats.compute(p, pop, head)
        lengths = policy_lengths(policy, p, pop, head, stats).copy()
    digits = np.full(n, -1, dtype=np.int64)
    uses = np.zeros(n, dtype=bool)
    next_digit = 0
    if unique_head:
        next_digit = _make_head_unique(p, lengths, uses, digits, head, pop, 0)
    return ServedCodes(p, lengths, digits, uses, head, k, next_digit)


# -- the stateful assigner ----------------------------------------------------------------


def _policy_spec(policy: LengthPolicy) -> tuple[str, dict[str, Any]]:
    name = policy.name
    if name not in POLICIES:
        raise AssignmentError(
            f"policy {name!r} is not registered; register it with "
            "quantize.lengths.register_policy so the assigner state can be rebuilt"
        )
    try:
        params = {f.name: getattr(policy, f.name) for f in fields(policy)}  # type: ignore[arg-type]
    except TypeError as exc:
        raise AssignmentError(
            f"policy {name!r} is not a dataclass; its parameters cannot be saved"
        ) from exc
    params.pop("name", None)
    return name, params


def _array(
    dtype: type[np.generic],
    new: float | None,
    *,
    saved: type[np.generic] | None = None,
    per_level: bool = False,
    in_state: bool = True,
) -> dict[str, Any]:
    """Metadata of a field of :class:`_Items`: its dtype, the value a new item starts with
    (``None``: :meth:`CodeAssigner.add` gives it), the dtype kept in :class:`AssignerState`
    (default: the same), whether it holds a digit per level (``[n, L]``, checked as
    paths) instead of one value per item (``[n]``), and whether :class:`AssignerState`
    holds it (the bookkeeping of lazy demotions does not: it is derived on load).
    """
    return {
        "dtype": dtype,
        "new": new,
        "saved": saved or dtype,
        "per_level": per_level,
        "in_state": in_state,
    }


@dataclass(eq=False)
class _Items:
    """The per-item arrays of a :class:`CodeAssigner`; row ``i`` belongs to its ``i``-th key.

    The one declaration of them: a field's name is also its :class:`AssignerState` field
    and its member in the saved bytes (in this order); its :func:`_array` metadata gives
    its dtype, its value for a new item and its dtype in the state. The arrays are views
    of buffers with spare room, so appending a few items does not copy all of them.
    """

    paths: np.ndarray = field(metadata=_array(np.int64, None, saved=np.int32, per_level=True))
    popularity: np.ndarray = field(metadata=_array(np.float64, 0.0))  # 0 = cold
    is_head: np.ndarray = field(metadata=_array(np.bool_, False))
    lengths: np.ndarray = field(metadata=_array(np.int64, 0))  # path digits served, 0 = none yet
    digits: np.ndarray = field(metadata=_array(np.int64, -1))  # disambiguation digit, -1 = none
    uses_digit: np.ndarray = field(metadata=_array(np.bool_, False))  # code ends with its digit
    shrink_streak: np.ndarray = field(metadata=_array(np.int64, 0))  # at ``eval_round``
    #: the assigner's round count when the item was last evaluated
    eval_round: np.ndarray = field(metadata=_array(np.int64, 0, in_state=False))
    #: whether the item was due for demotion then (its streak grows each round since)
    below: np.ndarray = field(metadata=_array(np.bool_, False, in_state=False))

    @classmethod
    def new(cls, paths: np.ndarray, popularity: np.ndarray | None = None) -> _Items:
        """Rows of new items with these full paths (and popularity, else cold)."""
        given = {"paths": paths, "popularity": popularity}
        arrays: dict[str, np.ndarray] = {}
        for f in fields(cls):
            value = given.get(f.name)
            if value is None:
                value = np.full(len(paths), f.metadata["new"], dtype=f.metadata["dtype"])
            arrays[f.name] = value
        return cls(**arrays)

    @classmethod
    def from_state(cls, state: AssignerState) -> _Items:
        """Checked copies of the arrays of ``state``, in the assigner's dtypes."""
        n, levels = len(state.keys), state.levels
        arrays: dict[str, np.ndarray] = {}
        for f in fields(cls):
            if not f.metadata["in_state"]:
                arrays[f.name] = np.full(n, f.metadata["new"], dtype=f.metadata["dtype"])
                continue
            value = getattr(state, f.name)
            shape = (n, levels) if f.metadata["per_level"] else (n,)
            if f.metadata["per_level"] and np.size(value) == n * levels:
                with _bad_input():
                    value = check_paths(np.reshape(value, shape), "CodeAssigner.from_state")
            if np.shape(value) != shape:
                raise AssignmentError(
                    f"CodeAssigner.from_state: {f.name} has shape {np.shape(value)}, expected "
                    f"{shape}; the state is corrupt, rebuild it from the items"
                )
            arrays[f.name] = np.array(value, dtype=f.metadata["dtype"])
        return cls(**arrays)

    def __len__(self) -> int:
        return int(self.popularity.shape[0])

    def extend(self, other: _Items) -> None:
        """Append the rows of ``other`` (amortized: the buffers double when full)."""
        n, m = len(self), len(other)
        buffers: dict[str, np.ndarray] = self.__dict__.setdefault("_buffers", {})
        for f in fields(self):
            view = getattr(self, f.name)
            buf = buffers.get(f.name)
            if buf is None or buf.shape[0] < n + m or view.base is not buf:
                buf = np.empty((max(64, 2 * (n + m)), *view.shape[1:]), dtype=view.dtype)
                buf[:n] = view
                buffers[f.name] = buf
            buf[n : n + m] = getattr(other, f.name)
            setattr(self, f.name, buf[: n + m])

    def saved(self) -> dict[str, np.ndarray]:
        """Copies in the state's dtypes, by :class:`AssignerState` field name."""
        return {
            f.name: getattr(self, f.name).astype(f.metadata["saved"])
            for f in fields(self)
            if f.metadata["in_state"]
        }


_ITEM_ARRAYS = tuple(f.name for f in fields(_Items) if f.metadata["in_state"])
"""Names of the per-item arrays of :class:`AssignerState`, in the order they are saved."""


@dataclass(frozen=True, eq=False)
class AssignerState:
    """Everything a :class:`CodeAssigner` holds, as plain arrays and scalars.

    The arrays are the fields of :class:`_Items` (same names, order and dtypes but for
    ``paths``, kept as int32); ``to_bytes``, ``from_bytes`` and the assigner go by them.
    """

    keys: tuple[str, ...]
    paths: np.ndarray  # int32 [n, L]
    popularity: np.ndarray  # float64 [n]
    is_head: np.ndarray  # bool [n]
    lengths: np.ndarray  # int64 [n]
    digits: np.ndarray  # int64 [n]
    uses_digit: np.ndarray  # bool [n]
    shrink_streak: np.ndarray  # int64 [n]
    levels: int
    k: int
    enter_threshold: float
    exit_threshold: float
    demote_after: int
    next_digit: int
    clock: int
    policy_name: str
    policy_params: dict[str, Any]

    def to_bytes(self) -> bytes:
        """Self-describing bytes (``np.savez`` of the arrays plus JSON scalars)."""
        meta = {
            "version": STATE_VERSION,
            "levels": self.levels,
            "k": self.k,
            "enter_threshold": self.enter_threshold,
            "exit_threshold": self.exit_threshold,
            "demote_after": self.demote_after,
            "next_digit": self.next_digit,
            "clock": self.clock,
            "policy_name": self.policy_name,
            "policy_params": self.policy_params,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            keys=np.frombuffer(json.dumps(list(self.keys)).encode(), dtype=np.uint8),
            **{name: getattr(self, name) for name in _ITEM_ARRAYS},
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> AssignerState:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode())
                if meta.get("version") != STATE_VERSION:
                    raise AssignmentError(
                        f"AssignerState.from_bytes: state version {meta.get('version')} is not "
                        f"supported (this build reads {STATE_VERSION}); rebuild the state"
                    )
                keys = tuple(json.loads(npz["keys"].tobytes().decode()))
                arrays = {name: np.array(npz[name]) for name in _ITEM_ARRAYS}
        except AssignmentError:
            raise
        except (
            ValueError,
            KeyError,
            OSError,
            EOFError,
            TypeError,
            UnicodeDecodeError,
            zipfile.BadZipFile,
        ) as exc:
            raise AssignmentError(
                f"AssignerState.from_bytes: {len(data)} bytes are not a saved assigner state "
                f"({exc}); pass bytes produced by AssignerState.to_bytes"
            ) from exc
        return cls(
            keys=keys,
            levels=int(meta["levels"]),
            k=int(meta["k"]),
            enter_threshold=float(meta["enter_threshold"]),
            exit_threshold=float(meta["exit_threshold"]),
            demote_after=int(meta["demote_after"]),
            next_digit=int(meta["next_digit"]),
            clock=int(meta["clock"]),
            policy_name=str(meta["policy_name"]),
            policy_params=dict(meta["policy_params"]),
            **arrays,
        )


@dataclass(frozen=True)
class CodeStats:
    """Counts of an assigner's served codes, kept up to date change by change (so reading
    them costs nothing per item); :func:`quantize.code_metrics.code_report` computes the
    same figures, and more, from a :class:`ServedCodes` snapshot."""

    n_items: int
    n_head: int
    distinct_codes: int
    distinct_head_codes: int
    utilization: tuple[float, ...]  # per level: distinct codewords of the full paths / K
    mean_len_head: float
    mean_len_tail: float
    table_rows: int

    @property
    def collision_all(self) -> float:
        return 1.0 - self.distinct_codes / self.n_items if self.n_items else 0.0

    @property
    def collision_head(self) -> float:
        return 1.0 - self.distinct_head_codes / self.n_head if self.n_head else 0.0


#: format of :meth:`CodeAssigner.header` and :meth:`CodeAssigner.take_rows`
ROWS_FORMAT = 2


def _row_dtype(levels: int) -> np.dtype[Any]:
    """One saved item of :meth:`CodeAssigner.take_rows` (fixed size, little-endian)."""
    return np.dtype(
        [
            ("seq", "<i8"),
            ("paths", "<i4", (levels,)),
            ("popularity", "<f8"),
            ("is_head", "u1"),
            ("lengths", "<i2"),
            ("digits", "<i8"),
            ("uses_digit", "u1"),
            ("shrink_streak", "<i8"),
            ("eval_round", "<i8"),
            ("below", "u1"),
        ]
    )


class CodeAssigner:
    """Per-domain served codes, in memory, deterministic, rebuildable from arrays.

    See the module docstring for the stability rules. Thresholds are absolute popularity
    values (time-decayed counts, supplied by the caller); pick them with
    :func:`quantize.lengths.thresholds_for_fraction` and move them with
    :meth:`set_thresholds`.

    Cost: with a per-item policy (:func:`quantize.lengths.is_per_item`; ``fixed``,
    ``entropy``, ``reverse``, ``popularity`` with ``pop_ref``) a call re-evaluates only the
    items whose inputs moved (added, re-coded, new popularity or head flag, a lazy
    demotion falling due, a head item whose prefix node's crowding flipped, a head item
    that loses its code to another) and gives the same result as re-evaluating every
    item, which ``incremental=False`` does (the reference of the tests, and the way of
    policies that are not per item). Prefix statistics (:class:`PrefixNodes`), the head
    codes and the :class:`CodeStats` counts are kept up to date change by change, and
    :meth:`take_rows` hands over only the items that changed since it was last called.
    """

    def __init__(
        self,
        levels: int,
        k: int,
        policy: LengthPolicy,
        *,
        enter_threshold: float,
        exit_threshold: float,
        demote_after: int = DEFAULT_DEMOTE_AFTER,
        incremental: bool = True,
    ) -> None:
        if levels < 1 or k < 2:
            raise AssignmentError(
                f"CodeAssigner: levels={levels}, k={k}; use levels >= 1 and k >= 2 (the "
                "codebook's shape)"
            )
        if demote_after < 1:
            raise AssignmentError(f"CodeAssigner: demote_after={demote_after}; use >= 1")
        self._check_thresholds(enter_threshold, exit_threshold)
        self._policy_name, self._policy_params = _policy_spec(policy)
        self.policy = policy
        self.levels = levels
        self.k = k
        self.enter_threshold = float(enter_threshold)
        self.exit_threshold = float(exit_threshold)
        self.demote_after = demote_after
        self.incremental = incremental and is_per_item(policy)
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        self._items = _Items.new(np.zeros((0, levels), dtype=np.int64))
        self._next_digit = 0
        self._clock = 0
        #: popularity rounds so far (lazy demotions count them)
        self._rounds = 0
        self._nodes = PrefixNodes(levels, k)
        #: served code (its key) -> the head item serving it (head codes are unique)
        self._head_codes: dict[CodeKey, int] = {}
        #: round -> items whose lazy demotion falls due then (checked when popped)
        self._due: dict[int, list[np.ndarray]] = {}
        #: rows changed since :meth:`take_rows`
        self._unsaved: set[int] = set()
        #: served code (its key) -> how many items serve it
        self._code_count: Counter[CodeKey] = Counter()
        self._len_sum = [0, 0]  # served digits of tail, head items
        self._level_use = np.zeros((levels, k), dtype=np.int64)

    @staticmethod
    def _check_thresholds(enter: float, exit_: float) -> None:
        if not exit_ <= enter or exit_ < 0 or np.isnan(enter) or np.isnan(exit_):
            raise AssignmentError(
                f"CodeAssigner: thresholds enter={enter}, exit={exit_}; need "
                "0 <= exit <= enter (hysteresis)"
            )

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    @property
    def n_digit_rows(self) -> int:
        return self._next_digit

    @property
    def table_rows(self) -> int:
        return self.levels * self.k + self._next_digit

    @property
    def n_head(self) -> int:
        return len(self._head_codes)  # head codes are unique: one per head item

    @property
    def rounds(self) -> int:
        return self._rounds

    def _idx(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError as exc:
            raise AssignmentError(
                f"CodeAssigner: unknown item {key!r}; add it with add() first"
            ) from exc

    def _code(self, i: int) -> Code:
        items = self._items
        base = tuple(int(c) for c in items.paths[i, : items.lengths[i]])
        return (*base, int(items.digits[i])) if items.uses_digit[i] else base

    def _codes(
        self,
        rows: Sequence[int] | np.ndarray,
        lengths: np.ndarray | None = None,
        uses: np.ndarray | None = None,
    ) -> list[Code]:
        """The served codes of ``rows`` (with these ``lengths`` / ``uses`` instead of the
        current ones when given): one array read for all of them."""
        return self._code_rows(rows, lengths, uses, row_tuples)

    def _code_keys(self, rows: Sequence[int] | np.ndarray) -> list[CodeKey]:
        """:func:`code_key` of the served codes of ``rows``, made from the arrays."""
        return self._code_rows(rows, None, None, row_keys)

    def _code_rows(
        self,
        rows: Sequence[int] | np.ndarray,
        lengths: np.ndarray | None,
        uses: np.ndarray | None,
        convert: Callable[[np.ndarray], list[Any]],
    ) -> list[Any]:
        """The served codes of ``rows``, each shape's digits ``convert``-ed a table at a
        time."""
        items = self._items
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return []
        lens = items.lengths[idx] if lengths is None else np.asarray(lengths, dtype=np.int64)
        flags = items.uses_digit[idx] if uses is None else np.asarray(uses, dtype=bool)
        # items grouped by code shape (length, digit or not): one slice per shape
        shape = lens * 2 + flags
        order = np.argsort(shape, kind="stable")
        shape = shape[order]
        table = np.concatenate([items.paths[idx[order]], items.digits[idx[order]][:, None]], axis=1)
        cuts = (np.flatnonzero(shape[1:] != shape[:-1]) + 1).tolist()
        grouped: list[Any] = []
        for start, stop in zip([0, *cuts], [*cuts, idx.size], strict=True):
            n, digit = divmod(int(shape[start]), 2)
            cols = [*range(n), self.levels] if digit else list(range(n))
            grouped += convert(table[start:stop][:, cols])
        place = np.empty(idx.size, dtype=np.int64)
        place[order] = np.arange(idx.size)
        return take_items(grouped, place)

    def served_code(self, key: str) -> Code:
        return self._code(self._idx(key))

    def full_path(self, key: str) -> Code:
        return tuple(int(c) for c in self._items.paths[self._idx(key)])

    def is_head(self, key: str) -> bool:
        return bool(self._items.is_head[self._idx(key)])

    def popularity(self, key: str) -> float:
        return float(self._items.popularity[self._idx(key)])

    def _indices(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of known ``keys`` (int64); an unknown key raises as :meth:`_idx`."""
        try:
            return np.fromiter(map(self._index.__getitem__, keys), dtype=np.int64, count=len(keys))
        except KeyError:
            return np.asarray([self._idx(key) for key in keys], dtype=np.int64)

    def popularity_of(self, keys: Sequence[str]) -> np.ndarray:
        """The popularity of known ``keys`` (float64), as the assigner holds it."""
        return self._items.popularity[self._indices(keys)]

    def all_popularity(self) -> np.ndarray:
        """Every item's popularity (a read-only view, insertion order)."""
        view = self._items.popularity.view()
        view.flags.writeable = False
        return view

    def head_mask(self) -> np.ndarray:
        """Every item's head flag (a read-only view, insertion order)."""
        view = self._items.is_head.view()
        view.flags.writeable = False
        return view

    def row_ids(self, key: str) -> np.ndarray:
        return row_ids(self.served_code(key), self.k, self.levels)

    def served(self) -> ServedCodes:
        """A snapshot of all served codes, in insertion order of the keys."""
        items = self._items
        return ServedCodes(
            paths=items.paths.copy(),
            lengths=items.lengths.copy(),
            digits=items.digits.copy(),
            uses_digit=items.uses_digit.copy(),
            is_head=items.is_head.copy(),
            k=self.k,
            n_digit_rows=self._next_digit,
        )

    def stats(self) -> CodeStats:
        """The :class:`CodeStats` of the served codes (O(L x K), whatever the item count)."""
        n, n_head = len(self._keys), self.n_head
        tail_sum, head_sum = self._len_sum
        return CodeStats(
            n_items=n,
            n_head=n_head,
            distinct_codes=len(self._code_count),
            distinct_head_codes=len(self._head_codes),
            utilization=tuple(float(u) for u in (self._level_use > 0).sum(axis=1) / float(self.k)),
            mean_len_head=head_sum / n_head if n_head else 0.0,
            mean_len_tail=tail_sum / (n - n_head) if n - n_head else 0.0,
            table_rows=self.table_rows,
        )

    # -- mutations -------------------------------------------------------------------------

    def _tick(self, ts: int | None) -> int:
        self._clock = self._clock + 1 if ts is None else max(self._clock, int(ts))
        return self._clock

    def add(
        self,
        keys: Sequence[str],
        paths: np.ndarray,
        popularity: np.ndarray | None = None,
        *,
        ts: int | None = None,
    ) -> list[CodeChange]:
        """Add items (or re-code existing keys whose path changed); new items start short.

        ``popularity`` defaults to 0 (cold). Re-adding a key with the same path only
        updates its popularity when given. Returns the code changes, in item order. Every
        bad input raises :class:`AssignmentError`.
        """
        stamp = self._tick(ts)
        keys, p, pop = self._checked_batch(keys, paths, popularity)
        moved = _Moved()
        self._update_known(keys, p, pop, moved)
        unknown = moved.unknown
        if unknown:
            rows = np.asarray(unknown)
            batch = _Items.new(p[rows], None if pop is None else pop[rows])
            self._append([keys[j] for j in unknown], batch, moved)
        return self._reassign(moved, stamp, round_=False)

    def _checked_batch(
        self, keys: Sequence[str], paths: np.ndarray, popularity: np.ndarray | None
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """The keys as strings, the paths as int64 ``[n, L]`` and the popularity, checked."""
        names = [str(key) for key in keys]
        with _bad_input():
            p = check_paths(paths, "CodeAssigner.add")
        if p.shape != (len(names), self.levels):
            raise AssignmentError(
                f"CodeAssigner.add: {len(names)} keys but paths of shape {p.shape}; pass one "
                f"path of {self.levels} digits per key"
            )
        if p.size and p.max() >= self.k:
            raise AssignmentError(
                f"CodeAssigner.add: paths hold digit {int(p.max())} >= k={self.k}; encode "
                "with this domain's codebook"
            )
        if len(set(names)) != len(names):
            raise AssignmentError("CodeAssigner.add: duplicate keys in one call; deduplicate")
        if popularity is None:
            return names, p, None
        with _bad_input():
            return names, p, check_vector(popularity, len(names), "CodeAssigner.add")

    def _update_known(
        self,
        keys: list[str],
        paths: np.ndarray,
        popularity: np.ndarray | None,
        moved: _Moved,
    ) -> None:
        """Re-code the known keys whose path changed (their code starts over) and set their
        popularity when given; the batch rows of the unknown keys go to ``moved.unknown``."""
        items = self._items
        known: list[int] = []
        batch_rows: list[int] = []
        for j, key in enumerate(keys):
            i = self._index.get(key)
            if i is None:
                moved.unknown.append(j)
            else:
                known.append(i)
                batch_rows.append(j)
        if not known:
            return
        rows = np.asarray(known, dtype=np.int64)
        given = np.asarray(batch_rows, dtype=np.int64)
        recoded = np.any(items.paths[rows] != paths[given], axis=1)
        if recoded.any():
            self._recode(rows[recoded], paths[given[recoded]], moved)
        noted = rows if popularity is not None else rows[recoded]
        moved.note(noted, items.popularity[noted], items.is_head[noted])
        if popularity is not None:
            items.popularity[rows] = popularity[given]

    def _recode(self, rows: np.ndarray, paths: np.ndarray, moved: _Moved) -> None:
        """Known items ``rows`` take new ``paths``: their code starts over (as a new item's,
        their popularity and head flag kept).

        Incrementally (O(items re-coded), whatever the catalogue): their old code leaves the
        counts, the head codes and the length sums; they leave their old prefix nodes (whose
        crowding flags are kept, to find those that flip) and join the new ones as cold
        items, which is how they are noted; the round re-evaluates them like new items.
        Otherwise :meth:`_reassign_all` re-evaluates every item and rebuilds the rest.
        """
        items = self._items
        old_codes = self._codes(rows)
        for i, code in zip(rows.tolist(), old_codes, strict=True):
            moved.fixed[i] = (code, "recode")
        if self.incremental:
            self._leave_codes(rows, old_codes, moved)
        items.paths[rows] = paths
        items.lengths[rows] = 0
        items.uses_digit[rows] = False
        items.digits[rows] = -1
        items.shrink_streak[rows] = 0
        items.eval_round[rows] = self._rounds
        items.below[rows] = False
        if self.incremental:
            self._nodes.place(rows, paths)
            self._use_levels(paths, 1)
        else:
            moved.recoded = True

    def _leave_codes(self, rows: np.ndarray, old_codes: list[Code], moved: _Moved) -> None:
        """Take ``rows`` (about to be re-coded) out of what their old path and code count
        in; they are noted as cold tail items, as the prefix statistics now hold them."""
        items = self._items
        heads = items.is_head[rows]
        self._uncount(old_codes)
        self._sum_lengths(items.lengths[rows] + items.uses_digit[rows], heads, -1)
        for i, code, head in zip(rows.tolist(), old_codes, heads.tolist(), strict=True):
            if head and self._head_codes.get(key := code_key(code)) == i:
                del self._head_codes[key]
        if getattr(self.policy, "node_flags", None) is not None:
            for d, nodes in enumerate(self._nodes.nodes_of(rows)):
                moved.left.append((d, nodes, self._flags(d, nodes)))
        self._nodes.remove(rows, items.popularity[rows], heads)
        self._use_levels(items.paths[rows], -1)
        moved.note(rows, np.zeros(rows.size), np.zeros(rows.size, dtype=bool))

    def _append(self, keys: list[str], batch: _Items, moved: _Moved) -> None:
        """Append new items (their rows in ``batch``); they get old code ``()``."""
        start = len(self._keys)
        for key in keys:
            self._index[key] = len(self._keys)
            self._keys.append(key)
        batch.eval_round[:] = self._rounds
        self._items.extend(batch)
        rows = np.arange(start, len(self._keys), dtype=np.int64)
        self._nodes.place(rows, batch.paths)
        self._use_levels(batch.paths, 1)
        moved.fixed.update(dict.fromkeys(rows.tolist(), ((), "new")))
        moved.note(rows, np.zeros(rows.size), np.zeros(rows.size, dtype=bool))

    def _use_levels(self, paths: np.ndarray, sign: int) -> None:
        for level in range(self.levels):
            np.add.at(self._level_use[level], paths[:, level], sign)

    def update_popularity(
        self, keys: Sequence[str], popularity: np.ndarray, *, ts: int | None = None
    ) -> list[CodeChange]:
        """Set the popularity of ``keys`` and re-evaluate (one popularity round).

        Every bad input (unknown key, popularity not finite, negative or of another length
        than ``keys``) raises :class:`AssignmentError`.
        """
        stamp = self._tick(ts)
        keys = list(map(str, keys))
        with _bad_input():
            pop = check_vector(popularity, len(keys), "CodeAssigner.update_popularity")
        idx = self._indices(keys)
        moved = _Moved()
        items = self._items
        moved.note(idx, items.popularity[idx], items.is_head[idx])
        items.popularity[idx] = pop
        return self._reassign(moved, stamp, round_=True)

    def set_thresholds(
        self, enter_threshold: float, exit_threshold: float, *, ts: int | None = None
    ) -> list[CodeChange]:
        """Move the head thresholds and re-evaluate (one popularity round): the items whose
        head flag the new thresholds change, and those that depend on them."""
        self._check_thresholds(enter_threshold, exit_threshold)
        stamp = self._tick(ts)
        self.enter_threshold = float(enter_threshold)
        self.exit_threshold = float(exit_threshold)
        items = self._items
        moved = _Moved()
        if self.incremental and len(self._keys):
            flips = head_flags(
                items.popularity, items.is_head, self.enter_threshold, self.exit_threshold
            )
            rows = np.flatnonzero(flips != items.is_head)
            moved.note(rows, items.popularity[rows], items.is_head[rows])
        return self._reassign(moved, stamp, round_=True)

    def rescale_popularity(self, factor: float) -> None:
        """Multiply every popularity and both thresholds by ``factor`` (>= 0): the head flags,
        lengths and codes stay (a power of two keeps every value exact; a factor that
        underflows to 0 forgets popularity too old to matter). Costs O(items); callers do it
        rarely (a new reference time for decayed counts)."""
        if not factor >= 0 or not np.isfinite(factor):
            raise AssignmentError(f"rescale_popularity: factor={factor}; use a number >= 0")
        self._items.popularity *= factor
        self.enter_threshold *= factor
        self.exit_threshold *= factor
        self._rebuild_derived()
        self._unsaved.update(range(len(self._keys)))

    def _reassign(self, moved: _Moved, stamp: int, *, round_: bool) -> list[CodeChange]:
        """Re-evaluate the items ``moved`` names and those that depend on them (every item
        when not :attr:`incremental`); a popularity ``round_`` counts towards lazy
        demotions."""
        if round_:
            self._rounds += 1
        if not self._keys:
            return []
        with _collector_paused():
            if not self.incremental or moved.recoded:
                return self._reassign_all(moved.fixed, stamp, round_=round_)
            return self._reassign_some(moved, stamp, round_=round_)

    # -- re-evaluating every item (the reference) -----------------------------------------

    def _reassign_all(
        self, fixed: dict[int, tuple[Code, str]], stamp: int, *, round_: bool
    ) -> list[CodeChange]:
        """Re-evaluate every item; ``fixed`` holds the old code and the reason of the new and
        re-coded items.

        1. Head flags (with hysteresis) and policy lengths from the current popularity.
        2. Served lengths under the stability rules (see the module docstring).
        3. Head codes made unique.
        4. The code changes against the codes served before.
        """
        items = self._items
        items.shrink_streak[:] = self._streaks(np.arange(len(items)), round_=round_)
        was_head = items.is_head.copy()
        old_len = items.lengths.copy()
        old_uses = items.uses_digit.copy()
        head, target = self._policy_targets()
        lengths, uses, streak = self._stable_lengths(
            head, target, old_len, old_uses, items.shrink_streak, round_=round_
        )
        items.shrink_streak[:] = streak
        fresh = old_len == 0
        incumbent = ~fresh & (lengths == old_len) & (uses == old_uses)
        self._next_digit = _make_head_unique(
            items.paths,
            lengths,
            uses,
            items.digits,
            head,
            items.popularity,
            self._next_digit,
            incumbent,
        )
        items.lengths[:] = lengths
        items.uses_digit[:] = uses
        items.is_head[:] = head
        items.eval_round[:] = self._rounds
        items.below[:] = ~head & (target < lengths + uses.astype(np.int64))
        changes = self._changes_all(fixed, was_head, old_len, old_uses, stamp)
        self._rebuild_derived()
        self._unsaved.update(range(len(self._keys)))
        return changes

    def _policy_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Head flags (hysteresis on the thresholds) and the policy's length per item."""
        items = self._items
        try:
            head = head_flags(
                items.popularity, items.is_head, self.enter_threshold, self.exit_threshold
            )
            stats = PrefixStats.compute(items.paths, items.popularity, head)
            target = policy_lengths(self.policy, items.paths, items.popularity, head, stats)
        except LengthPolicyError as exc:
            raise AssignmentError(f"CodeAssigner: the length policy failed ({exc})") from exc
        return head, target

    def _stable_lengths(
        self,
        head: np.ndarray,
        target: np.ndarray,
        cur: np.ndarray,
        cur_uses: np.ndarray,
        streak: np.ndarray,
        *,
        round_: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Served path lengths, disambiguation flags and demotion streaks under the
        stability rules.

        New or re-coded items (length 0) take the policy length at once; others only grow,
        except that a non-head item is shortened to its policy length (its digit dropped)
        after ``demote_after`` rounds in which that length stayed below its served one.
        """
        fresh = cur == 0
        below = ~head & (target < cur + cur_uses.astype(np.int64))
        if round_:
            streak = np.where(below, streak + 1, 0)
        shrink = below & ~fresh & (streak >= self.demote_after)
        lengths = np.where(fresh | shrink, target, np.maximum(target, cur))
        uses = cur_uses & ~fresh & ~shrink & (lengths >= self.levels)
        streak = np.where(shrink, 0, streak)
        return lengths.astype(np.int64), uses, streak.astype(np.int64)

    def _streaks(self, rows: np.ndarray, *, round_: bool) -> np.ndarray:
        """The demotion streaks of ``rows`` before this call's round: each item's streak
        is saved when it is evaluated and grows by one each round since while it is
        below its policy length (``below``), else it is 0 after the first round."""
        items = self._items
        now = self._rounds - (1 if round_ else 0)
        last = items.eval_round[rows]
        saved = items.shrink_streak[rows]
        grown = np.where(items.below[rows], saved + (now - last), 0)
        return np.where(last >= now, saved, grown).astype(np.int64)

    def _changes_all(
        self,
        fixed: dict[int, tuple[Code, str]],
        was_head: np.ndarray,
        old_len: np.ndarray,
        old_uses: np.ndarray,
        stamp: int,
    ) -> list[CodeChange]:
        """The served-code changes against the old lengths and digit flags, in item order."""
        items = self._items
        changed = (items.lengths != old_len) | (items.uses_digit != old_uses)
        if fixed:
            changed[np.fromiter(fixed, dtype=np.int64, count=len(fixed))] = True
        moved = np.flatnonzero(changed)
        old = dict(
            zip(moved.tolist(), self._codes(moved, old_len[moved], old_uses[moved]), strict=True)
        )
        return self._changes(old, fixed, was_head, stamp)

    def _changes(
        self,
        old: dict[int, Code],
        fixed: dict[int, tuple[Code, str]],
        was_head: np.ndarray | dict[int, bool],
        stamp: int,
        codes: dict[int, Code] | None = None,
    ) -> list[CodeChange]:
        """The changes of the items of ``old`` (item -> code served before), in item order
        (``codes``: their current codes, where the caller has them)."""
        changes: list[CodeChange] = []
        order = sorted(old)
        rows = np.asarray(order, dtype=np.int64)
        news = self._codes(rows) if codes is None else [codes[i] for i in order]
        heads = self._items.is_head[rows].tolist()
        uses = self._items.uses_digit[rows].tolist()
        full = self.levels + 1
        keys = self._keys
        for i, new, head, digit in zip(order, news, heads, uses, strict=True):
            if i in fixed:
                before, reason = fixed[i]
                if new != before:
                    changes.append(CodeChange(keys[i], before, new, reason, stamp))
                continue
            before = old[i]
            if new == before:
                continue
            # why the code moved (neither new nor re-coded)
            if len(new) < len(before):
                reason = "demote"
            elif head and not was_head[i]:
                reason = "promote"
            elif len(new) == full and digit:
                reason = "disambiguate"
            else:
                reason = "deepen"
            changes.append(CodeChange(keys[i], before, new, reason, stamp))
        return changes

    # -- re-evaluating what moved -----------------------------------------------------------

    def _reassign_some(self, moved: _Moved, stamp: int, *, round_: bool) -> list[CodeChange]:
        """Re-evaluate the items whose inputs moved, with the result of
        :meth:`_reassign_all`.

        1. Items whose lazy demotion falls due in this round join.
        2. Head flags of these items; the prefix statistics follow them.
        3. Head items of prefix nodes whose crowding flipped join.
        4. Policy lengths and served lengths under the stability rules.
        5. Head codes made unique: contested codes go to their incumbents first.
        6. The code changes; the counts follow; the items wait for :meth:`take_rows`.
        """
        if round_:
            self._join_due(moved)
        rows, old_pop, was_head = moved.noted()
        if not rows.size:
            return []
        flipped, nodes = self._follow_heads(rows, old_pop, was_head)
        flipped = self._flipped_left(flipped, moved)
        if any(f.size for f in flipped):
            rows, _, was_head = self._join_crowded(flipped, moved)
        lengths, uses, old_len, old_uses = self._settle_lengths(rows, nodes, round_=round_)
        fresh = old_len == 0
        touched = fresh | (lengths != old_len) | (uses != old_uses)
        touched |= was_head != self._items.is_head[rows]
        had = touched & ~fresh
        old = dict(
            zip(
                rows[had].tolist(),
                self._codes(rows[had], old_len[had], old_uses[had]),
                strict=True,
            )
        )
        # only the items that moved: the others keep their head flag and code
        moved_idx = rows[touched]
        moved_rows = moved_idx.tolist()
        heads_before = dict(zip(moved_rows, was_head[touched].tolist(), strict=True))
        self._sum_lengths(old_len[had] + old_uses[had], was_head[had], -1)
        incumbent = ~fresh & (lengths == old_len) & (uses == old_uses)
        held = dict(zip(moved_rows, incumbent[touched].tolist(), strict=True))
        extra = self._settle_heads(moved_rows, held, old, set(moved_rows), heads_before)
        items = self._items
        every = np.concatenate([moved_idx, np.asarray(extra, dtype=np.int64)])
        self._sum_lengths(items.lengths[every] + items.uses_digit[every], items.is_head[every], 1)
        # the items whose code changed (those that kept theirs stay counted, unchanged)
        kept = incumbent[touched] & (items.lengths[moved_idx] == lengths[touched])
        kept &= items.uses_digit[moved_idx] == uses[touched]
        self._uncount([old[i] for i in moved_idx[kept ^ had[touched]].tolist()])
        changed = [*moved_idx[~kept].tolist(), *extra]
        codes = self._codes(changed)
        self._code_count.update(map(code_key, codes))
        for i in extra:
            heads_before.setdefault(i, True)
        self._unsaved.update(rows.tolist())
        self._unsaved.update(extra)
        return self._changes(
            {i: old.get(i, ()) for i in changed},
            moved.fixed,
            heads_before,
            stamp,
            dict(zip(changed, codes, strict=True)),
        )

    def _join_due(self, moved: _Moved) -> None:
        """Items whose lazy demotion falls due in this round join ``moved``."""
        parts = self._due.pop(self._rounds, None)
        if not parts:
            return
        items = self._items
        cand = np.concatenate(parts)
        due = items.eval_round[cand] + self.demote_after - items.shrink_streak[cand]
        hit = cand[items.below[cand] & (due == self._rounds)]
        moved.note(hit, items.popularity[hit], items.is_head[hit])

    def _schedule_due(self, rows: np.ndarray, due: np.ndarray) -> None:
        """Items ``rows`` wait for their lazy demotion in rounds ``due``."""
        if not rows.size:
            return
        order = np.argsort(due, kind="stable")
        due = due[order]
        starts = np.flatnonzero(np.concatenate([[True], due[1:] != due[:-1]]))
        parts = np.split(rows[order], starts[1:])
        for round_, part in zip(due[starts].tolist(), parts, strict=True):
            self._due.setdefault(round_, []).append(part)

    def _follow_heads(
        self, rows: np.ndarray, old_pop: np.ndarray, old_head: np.ndarray
    ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]] | None]:
        """New head flags of ``rows``; the prefix statistics take their new popularity and
        flags (instead of ``old_pop``, ``old_head``). Returns, per depth, the nodes whose
        crowding flipped (policy's node flags), and the nodes of ``rows`` with their new
        entropy (``None`` without node flags)."""
        items = self._items
        head = head_flags(
            items.popularity[rows], items.is_head[rows], self.enter_threshold, self.exit_threshold
        )
        flags = getattr(self.policy, "node_flags", None)
        touched = self._nodes.nodes_of(rows) if flags is not None else []
        before = [self._flags(d, nodes) for d, nodes in enumerate(touched)]
        self._nodes.contribute(rows, old_pop, old_head, -1)
        self._nodes.contribute(rows, items.popularity[rows], head, 1)
        items.is_head[rows] = head
        if flags is None:
            return [], None
        now = [(nodes, self._nodes.entropy(d, nodes)) for d, nodes in enumerate(touched)]
        flipped = [
            nodes[self._flags(d, nodes, entropy) != was]
            for d, ((nodes, entropy), was) in enumerate(zip(now, before, strict=True))
        ]
        return flipped, now

    def _flipped_left(self, flipped: list[np.ndarray], moved: _Moved) -> list[np.ndarray]:
        """``flipped`` with the nodes that re-coded items left whose crowding flipped."""
        if not moved.left:
            return flipped
        out = list(flipped) or [np.zeros(0, dtype=np.int64) for _ in range(self.levels)]
        for d, nodes, before in moved.left:
            now = nodes[self._flags(d, nodes) != before]
            if now.size:
                out[d] = np.union1d(out[d], now)
        return out

    def _flags(self, d: int, nodes: np.ndarray, entropy: np.ndarray | None = None) -> np.ndarray:
        flags = self.policy.node_flags  # type: ignore[attr-defined]
        if entropy is None:
            entropy = self._nodes.entropy(d, nodes)
        return np.asarray(flags(self._nodes.head_count(d, nodes), entropy), dtype=bool)

    def _join_crowded(
        self, flipped: list[np.ndarray], moved: _Moved
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The items of the flipped nodes (head items only when the policy's flags matter
        for head items only) join ``moved``; returns all of its items, as
        :meth:`_Moved.noted`."""
        items = self._items
        hit = self._nodes.members(flipped)
        if getattr(self.policy, "node_flags_heads_only", False):
            hit = hit[items.is_head[hit]]
        moved.note(hit, items.popularity[hit], items.is_head[hit])
        return moved.noted()

    def _settle_lengths(
        self,
        rows: np.ndarray,
        nodes: list[tuple[np.ndarray, np.ndarray]] | None,
        *,
        round_: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Policy and served lengths of ``rows`` (as :meth:`_stable_lengths`; ``nodes``: per
        depth, their distinct nodes and entropy, where known); the lazy demotion
        bookkeeping is saved and due demotions are scheduled."""
        items = self._items
        paths = items.paths[rows]
        head = items.is_head[rows]
        try:
            stats = self._nodes.stats_for(rows, paths, nodes)
            target = policy_lengths(self.policy, paths, items.popularity[rows], head, stats)
        except LengthPolicyError as exc:
            raise AssignmentError(f"CodeAssigner: the length policy failed ({exc})") from exc
        old_len = items.lengths[rows].copy()
        old_uses = items.uses_digit[rows].copy()
        streak = self._streaks(rows, round_=round_)
        lengths, uses, streak = self._stable_lengths(
            head, target, old_len, old_uses, streak, round_=round_
        )
        below = ~head & (target < lengths + uses.astype(np.int64))
        items.lengths[rows] = lengths
        items.uses_digit[rows] = uses
        items.shrink_streak[rows] = streak
        items.eval_round[rows] = self._rounds
        items.below[rows] = below
        self._schedule_due(rows[below], self._rounds + self.demote_after - streak[below])
        return lengths, uses, old_len, old_uses

    def _settle_heads(
        self,
        moved_rows: list[int],
        held: dict[int, bool],
        old: dict[int, Code],
        known: set[int],
        was_head: dict[int, bool],
    ) -> list[int]:
        """Make head codes unique again after ``moved_rows`` (the re-evaluated items whose
        code or head flag moved; ``held``: whether each kept its code, the others did)
        changed; returns the other items that had to deepen (their old codes added to
        ``old``, taken out of the counts).

        As :func:`_make_head_unique` over every head item: the head items that did not
        move hold unique codes, so a contested code always involves an item that moved or
        deepened in the round before; who keeps it is decided by the same rule (incumbent,
        more popular, lower index) and the losers deepen in index order.
        """
        items = self._items
        codes = self._head_codes
        for i, code in old.items():  # the items of moved_rows that served a code before
            if was_head[i] and codes.get(key := code_key(code)) == i:
                del codes[key]
        heads = items.is_head[np.asarray(moved_rows, dtype=np.int64)].tolist()
        active = [i for i, head in zip(moved_rows, heads, strict=True) if head]
        extra: list[int] = []
        limit = (self.levels + 2) * max(1, len(active) + 1)
        for _ in range(limit):
            if not active:
                return extra
            losers = self._contest(active, held)
            for i in losers:
                if i not in known:  # a head item whose code had not moved
                    known.add(i)
                    old[i] = self._code(i)
                    self._uncount([old[i]])
                    self._len_sum[1] -= len(old[i])
                    extra.append(i)
            self._deepen(losers)
            active = losers
        raise AssignmentError(
            "head codes could not be made unique within the round limit; the assigner "
            "state is inconsistent, rebuild it"
        )

    def _contest(self, active: list[int], held: dict[int, bool]) -> list[int]:
        """One round of :func:`_make_head_unique` for the codes of ``active``: the keeper of
        each code is recorded, the losers are returned in index order."""
        items = self._items
        codes = self._head_codes
        mine = self._code_keys(active)

        def rank(i: int) -> tuple[bool, float, int]:
            return held.get(i, True), float(items.popularity[i]), -i

        losers: list[int] = []
        if len(set(mine)) == len(mine):  # the usual case: only a holder may contest
            for i, code in zip(active, mine, strict=True):
                holder = codes.get(code)
                if holder is None or holder == i:
                    codes[code] = i
                else:
                    keeper = codes[code] = max(holder, i, key=rank)
                    losers.append(i if keeper == holder else holder)
            return sorted(losers)
        groups: dict[CodeKey, list[int]] = {}
        for i, code in zip(active, mine, strict=True):
            groups.setdefault(code, []).append(i)
        for code, members in groups.items():
            holder = codes.get(code)
            if holder is not None and holder not in members:
                members = [holder, *members]
            if len(members) == 1:
                codes[code] = members[0]
                continue
            keeper = max(members, key=rank)
            codes[code] = keeper
            losers += [i for i in members if i != keeper]
        return sorted(losers)

    def _deepen(self, losers: list[int]) -> None:
        """One more digit for each loser (a disambiguation digit at full depth)."""
        items = self._items
        stuck = True
        for i in losers:
            if items.lengths[i] < self.levels:
                items.lengths[i] += 1
                stuck = False
            elif not items.uses_digit[i]:
                if items.digits[i] < 0:
                    items.digits[i] = self._next_digit
                    self._next_digit += 1
                items.uses_digit[i] = True
                stuck = False
        if stuck and losers:
            raise AssignmentError(
                "head codes cannot be made unique: colliding head items already hold "
                "disambiguation digits; the assigner state is inconsistent, rebuild it"
            )

    # -- derived structures -----------------------------------------------------------------

    def _uncount(self, codes: Iterable[Code]) -> None:
        """Take ``codes`` (served before) out of the counts (the callers keep the length
        sums)."""
        counts = self._code_count
        for code in map(code_key, codes):
            left = counts[code] - 1
            if left:
                counts[code] = left
            else:
                counts.pop(code)

    def _sum_lengths(self, served: np.ndarray, heads: np.ndarray, sign: int) -> None:
        """Add (``sign=1``) or take away (``-1``) served code lengths to the sums of the
        tail and head items (``heads``: whether each is head)."""
        self._len_sum[0] += sign * int(served[~heads].sum())
        self._len_sum[1] += sign * int(served[heads].sum())

    def _count_codes(self, n: int) -> Counter[CodeKey]:
        """How many of the first ``n`` items serve each code: the distinct codes found as
        rows of one array (paths cut at their length, the digit or -1), a key built per
        distinct code, not per item."""
        items = self._items
        if n == 0:
            return Counter()
        lens = items.lengths[:n]
        cut = np.arange(self.levels) < lens[:, None]
        table = np.where(cut, items.paths[:n], -1)
        digit = np.where(items.uses_digit[:n], items.digits[:n], -1)
        rows = np.concatenate([table, digit[:, None]], axis=1)
        _, counts, first = group_rows(rows)
        out: Counter[CodeKey] = Counter()
        # summed, not set: a path cut at length l + 1 and a path cut at l plus a digit can
        # be the same code (digits are numbered from 0)
        for code, count in zip(self._code_keys(first), counts.tolist(), strict=True):
            out[code] += count
        return out

    def _rebuild_derived(self) -> None:
        """Prefix statistics, head codes, counts and the demotion schedule from the arrays.

        The codes' keys are ``bytes`` (:func:`code_key`), which the collector does not
        track, so a load leaves it nothing to walk (tuple keys left it a young pass over a
        million objects that held the interpreter 60-170 ms: a fine-tune's read, the index
        build, a restart's load)."""
        items = self._items
        n = len(self._keys)
        rows = np.arange(n, dtype=np.int64)
        if self.incremental:
            self._nodes = PrefixNodes(self.levels, self.k)
            self._nodes.place(rows, items.paths)
            self._nodes.contribute(rows, items.popularity, items.is_head, 1)
            self._nodes.index_members()  # here, with the other O(items) work, not in a round
        self._code_count = self._count_codes(n)
        heads = np.flatnonzero(items.is_head[:n])
        self._head_codes = {}
        head_codes, head_rows = self._code_keys(heads), heads.tolist()
        for lo in range(0, len(head_rows), GIL_CHUNK):
            hi = lo + GIL_CHUNK
            self._head_codes.update(zip(head_codes[lo:hi], head_rows[lo:hi], strict=True))
        served = items.lengths[:n] + items.uses_digit[:n]
        self._len_sum = [0, 0]
        self._sum_lengths(served, items.is_head[:n], 1)
        self._level_use = np.zeros((self.levels, self.k), dtype=np.int64)
        self._use_levels(items.paths, 1)
        self._due = {}
        below = np.flatnonzero(items.below)
        self._schedule_due(
            below, items.eval_round[below] + self.demote_after - items.shrink_streak[below]
        )

    # -- state -----------------------------------------------------------------------------

    def state(self) -> AssignerState:
        saved = self._items.saved()
        saved["shrink_streak"] = self._streaks(np.arange(len(self._keys)), round_=False)
        return AssignerState(
            keys=tuple(self._keys),
            **saved,
            levels=self.levels,
            k=self.k,
            enter_threshold=self.enter_threshold,
            exit_threshold=self.exit_threshold,
            demote_after=self.demote_after,
            next_digit=self._next_digit,
            clock=self._clock,
            policy_name=self._policy_name,
            policy_params=dict(self._policy_params),
        )

    @classmethod
    def from_state(cls, state: AssignerState, *, incremental: bool = True) -> CodeAssigner:
        """Rebuild an assigner equal to the one that produced ``state``.

        A state that cannot be rebuilt raises :class:`AssignmentError`.
        """
        out = cls._empty(
            state.levels,
            state.k,
            state.policy_name,
            state.policy_params,
            state.enter_threshold,
            state.exit_threshold,
            state.demote_after,
            incremental,
        )
        items = _Items.from_state(state)
        if len(set(state.keys)) != len(state.keys):
            raise AssignmentError("CodeAssigner.from_state: duplicate keys; the state is corrupt")
        out._keys = list(state.keys)
        out._index = {}
        number_keys(out._keys, 0, out._index)
        out._items = items
        out._next_digit = int(state.next_digit)
        out._clock = int(state.clock)
        if out._keys:
            _, target = out._policy_targets()
            items.below[:] = ~items.is_head & (
                target < items.lengths + items.uses_digit.astype(np.int64)
            )
        out._rebuild_derived()
        return out

    @classmethod
    def _empty(
        cls,
        levels: int,
        k: int,
        policy_name: str,
        policy_params: dict[str, Any],
        enter: float,
        exit_: float,
        demote_after: int,
        incremental: bool,
    ) -> CodeAssigner:
        try:
            policy = make_policy(policy_name, **policy_params)
        except LengthPolicyError as exc:
            raise AssignmentError(f"CodeAssigner: cannot rebuild policy ({exc})") from exc
        return cls(
            levels,
            k,
            policy,
            enter_threshold=enter,
            exit_threshold=exit_,
            demote_after=demote_after,
            incremental=incremental,
        )

    # -- rows: the state saved item by item ----------------------------------------------------

    def header(self, extra: dict[str, Any] | None = None) -> bytes:
        """The assigner's parameters and counters (small, JSON); with :meth:`take_rows`, what
        :meth:`from_rows` rebuilds it from. ``extra`` is kept for the caller."""
        return json.dumps(
            {
                "format": ROWS_FORMAT,
                "levels": self.levels,
                "k": self.k,
                "enter_threshold": self.enter_threshold,
                "exit_threshold": self.exit_threshold,
                "demote_after": self.demote_after,
                "next_digit": self._next_digit,
                "clock": self._clock,
                "rounds": self._rounds,
                "items": len(self._keys),
                "policy_name": self._policy_name,
                "policy_params": self._policy_params,
                "extra": extra or {},
            }
        ).encode()

    def take_rows(self, *, everything: bool = False) -> tuple[list[str], list[bytes]]:
        """The keys and saved rows of the items changed since the last call (all of them
        with ``everything``), in insertion order; the change set starts empty again."""
        if everything:
            idx = np.arange(len(self._keys), dtype=np.int64)
        else:
            idx = np.sort(np.fromiter(self._unsaved, dtype=np.int64, count=len(self._unsaved)))
        self._unsaved.clear()
        items = self._items
        out = np.zeros(idx.size, dtype=_row_dtype(self.levels))
        out["seq"] = idx
        for name in out.dtype.names or ():
            if name != "seq":
                out[name] = getattr(items, name)[idx]
        # one bytes object per row (a void scalar's bytes keep every byte)
        raw = out.view(np.dtype((np.void, out.dtype.itemsize))).tolist()
        return list(map(self._keys.__getitem__, idx.tolist())), raw

    @property
    def unsaved(self) -> int:
        """Items changed since :meth:`take_rows`."""
        return len(self._unsaved)

    @classmethod
    def from_rows(
        cls, header: bytes, keys: Sequence[str], rows: Sequence[bytes]
    ) -> tuple[CodeAssigner, dict[str, Any]]:
        """Rebuild an assigner from its :meth:`header` and every item's last saved row
        (in any order); returns it and the header's ``extra``."""
        try:
            meta = json.loads(header)
            if meta.get("format") != ROWS_FORMAT:
                raise AssignmentError(
                    f"CodeAssigner.from_rows: header format {meta.get('format')} is not "
                    f"supported (this build reads {ROWS_FORMAT})"
                )
            levels = int(meta["levels"])
            arr = join_records(rows, _row_dtype(levels))
        except (ValueError, KeyError, TypeError) as exc:
            raise AssignmentError(
                f"CodeAssigner.from_rows: the saved rows are corrupt ({exc}); rebuild them"
            ) from exc
        if arr.size != len(keys) or arr.size != int(meta["items"]):
            raise AssignmentError(
                f"CodeAssigner.from_rows: {arr.size} rows for {len(keys)} keys, the header "
                f"says {meta['items']} items; the saved rows are incomplete"
            )
        order = np.argsort(arr["seq"], kind="stable")
        arr = arr[order]
        if not np.array_equal(arr["seq"], np.arange(arr.size)):
            raise AssignmentError("CodeAssigner.from_rows: item sequence numbers have gaps")
        out = cls._empty(
            levels,
            int(meta["k"]),
            str(meta["policy_name"]),
            dict(meta["policy_params"]),
            float(meta["enter_threshold"]),
            float(meta["exit_threshold"]),
            int(meta["demote_after"]),
            True,
        )
        out._keys = take_items(keys, order)
        out._index = {}
        number_keys(out._keys, 0, out._index)
        arrays = {
            f.name: np.ascontiguousarray(arr[f.name], dtype=f.metadata["dtype"])
            for f in fields(_Items)
        }
        out._items = _Items(**arrays)
        out._next_digit = int(meta["next_digit"])
        out._clock = int(meta["clock"])
        out._rounds = int(meta["rounds"])
        out._rebuild_derived()
        return out, dict(meta.get("extra") or {})


@dataclass
class _Moved:
    """The items a call re-evaluates, with their popularity and head flag as the prefix
    statistics hold them (the values of the first :meth:`note` of an item: new items
    count there as cold tail items), as arrays: noting costs no Python work per item."""

    fixed: dict[int, tuple[Code, str]] = field(default_factory=dict)
    unknown: list[int] = field(default_factory=list)
    recoded: bool = False  # a known item got a new path (and the call re-evaluates all)
    #: the prefix nodes re-coded items left, per depth, with their crowding flags before
    left: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    _parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def note(self, rows: np.ndarray, pop: np.ndarray, head: np.ndarray) -> None:
        """Items ``rows`` with these values (an item noted before keeps its first ones)."""
        if len(rows):
            self._parts.append(
                (
                    np.asarray(rows, dtype=np.int64),
                    np.asarray(pop, dtype=np.float64),
                    np.asarray(head, dtype=bool),
                )
            )

    def noted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The noted items (sorted, each once) with their first noted values."""
        if not self._parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, bool)
        rows, pop, head = (np.concatenate(part) for part in zip(*self._parts, strict=True))
        order = np.argsort(rows, kind="stable")  # the first note of an item comes first
        keep = np.ones(rows.size, dtype=bool)
        keep[1:] = rows[order[1:]] != rows[order[:-1]]
        first = order[keep]
        self._parts = [(rows[first], pop[first], head[first])]
        return self._parts[0]


def state_equal(a: AssignerState, b: AssignerState) -> bool:
    """True when two states hold the same items, codes and parameters."""
    for f in fields(AssignerState):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


__all__ = [
    "AssignerState",
    "CodeAssigner",
    "CodeChange",
    "CodeStats",
    "ServedCodes",
    "assign_codes",
    "row_ids",
    "state_equal",
]
