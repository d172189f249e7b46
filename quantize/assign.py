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

import io
import json
import zipfile
from collections.abc import Iterator, Sequence
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
    make_policy,
    policy_lengths,
    thresholds_for_fraction,
)

STATE_VERSION = 1
DEFAULT_DEMOTE_AFTER = 3

Code = tuple[int, ...]


@contextmanager
def _bad_input() -> Iterator[None]:
    """Raise the input and policy errors of :mod:`quantize.lengths` as
    :class:`AssignmentError` (the one error class of this module's entry points)."""
    try:
        yield
    except LengthPolicyError as exc:
        raise AssignmentError(str(exc)) from exc


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


def _make_head_unique(
    paths: np.ndarray,
    lengths: np.ndarray,
    uses_digit: np.ndarray,
    digits: np.ndarray,
    is_head: np.ndarray,
    priority: np.ndarray,
    next_digit: int,
) -> int:
    """Deepen colliding head items in place until head codes are unique.

    ``priority`` (float, higher wins) decides who keeps a contested code; the others get
    one more digit (or a disambiguation digit at full depth; ``digits`` of those without
    one are allocated from ``next_digit`` in index order). Returns the new ``next_digit``.
    """
    levels = paths.shape[1]
    heads = np.flatnonzero(is_head)
    # every round deepens at least one item by one digit, and no code has more than L + 1
    for _ in range((levels + 2) * max(1, heads.size)):
        if heads.size < 2:
            break
        keys = _code_keys(paths[heads], lengths[heads], digits[heads], uses_digit[heads])
        _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        dup = counts[inv] > 1
        if not dup.any():
            break
        # keeper per group: highest priority, then lowest index
        cand = heads[dup]
        groups = inv[dup]
        order = np.lexsort((cand, -priority[cand], groups))
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
) -> dict[str, Any]:
    """Metadata of a field of :class:`_Items`: its dtype, the value a new item starts with
    (``None``: :meth:`CodeAssigner.add` gives it), the dtype kept in :class:`AssignerState`
    (default: the same) and whether it holds a digit per level (``[n, L]``, checked as
    paths) instead of one value per item (``[n]``).
    """
    return {"dtype": dtype, "new": new, "saved": saved or dtype, "per_level": per_level}


@dataclass(eq=False)
class _Items:
    """The per-item arrays of a :class:`CodeAssigner`; row ``i`` belongs to its ``i``-th key.

    The one declaration of them: a field's name is also its :class:`AssignerState` field
    and its member in the saved bytes (in this order); its :func:`_array` metadata gives
    its dtype, its value for a new item and its dtype in the state.
    """

    paths: np.ndarray = field(metadata=_array(np.int64, None, saved=np.int32, per_level=True))
    popularity: np.ndarray = field(metadata=_array(np.float64, 0.0))  # 0 = cold
    is_head: np.ndarray = field(metadata=_array(np.bool_, False))
    lengths: np.ndarray = field(metadata=_array(np.int64, 0))  # path digits served, 0 = none yet
    digits: np.ndarray = field(metadata=_array(np.int64, -1))  # disambiguation digit, -1 = none
    uses_digit: np.ndarray = field(metadata=_array(np.bool_, False))  # code ends with its digit
    shrink_streak: np.ndarray = field(metadata=_array(np.int64, 0))  # rounds due for demotion

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

    def extend(self, other: _Items) -> None:
        """Append the rows of ``other``."""
        for f in fields(self):
            setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(other, f.name)]))

    def saved(self) -> dict[str, np.ndarray]:
        """Copies in the state's dtypes, by :class:`AssignerState` field name."""
        return {f.name: getattr(self, f.name).astype(f.metadata["saved"]) for f in fields(self)}


_ITEM_ARRAYS = tuple(f.name for f in fields(_Items))
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


class CodeAssigner:
    """Per-domain served codes, in memory, deterministic, rebuildable from arrays.

    See the module docstring for the stability rules. Thresholds are absolute popularity
    values (time-decayed counts, supplied by the caller); pick them with
    :func:`quantize.lengths.thresholds_for_fraction` and move them with
    :meth:`set_thresholds`.
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
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        self._items = _Items.new(np.zeros((0, levels), dtype=np.int64))
        self._next_digit = 0
        self._clock = 0

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

    def served_code(self, key: str) -> Code:
        return self._code(self._idx(key))

    def full_path(self, key: str) -> Code:
        return tuple(int(c) for c in self._items.paths[self._idx(key)])

    def is_head(self, key: str) -> bool:
        return bool(self._items.is_head[self._idx(key)])

    def popularity(self, key: str) -> float:
        return float(self._items.popularity[self._idx(key)])

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
        fixed, unknown = self._update_known(keys, p, pop)
        if unknown:
            rows = np.asarray(unknown)
            batch = _Items.new(p[rows], None if pop is None else pop[rows])
            fixed.update(self._append([keys[j] for j in unknown], batch))
        return self._reassign(fixed, stamp, round_=False)

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
        self, keys: list[str], paths: np.ndarray, popularity: np.ndarray | None
    ) -> tuple[dict[int, tuple[Code, str]], list[int]]:
        """Re-code the known keys whose path changed (their code starts over) and set their
        popularity when given. Returns the re-coded items (old code, reason) and the batch
        rows of the unknown keys."""
        items = self._items
        recoded: dict[int, tuple[Code, str]] = {}
        unknown: list[int] = []
        for j, key in enumerate(keys):
            i = self._index.get(key)
            if i is None:
                unknown.append(j)
                continue
            if not np.array_equal(items.paths[i], paths[j]):
                recoded[i] = (self._code(i), "recode")
                items.paths[i] = paths[j]
                items.lengths[i] = 0
                items.uses_digit[i] = False
                items.digits[i] = -1
                items.shrink_streak[i] = 0
            if popularity is not None:
                items.popularity[i] = popularity[j]
        return recoded, unknown

    def _append(self, keys: list[str], batch: _Items) -> dict[int, tuple[Code, str]]:
        """Append new items (their rows in ``batch``); returns them with old code ``()``."""
        start = len(self._keys)
        for key in keys:
            self._index[key] = len(self._keys)
            self._keys.append(key)
        self._items.extend(batch)
        return {i: ((), "new") for i in range(start, len(self._keys))}

    def update_popularity(
        self, keys: Sequence[str], popularity: np.ndarray, *, ts: int | None = None
    ) -> list[CodeChange]:
        """Set the popularity of ``keys`` and re-evaluate every item (one popularity round).

        Every bad input (unknown key, popularity not finite, negative or of another length
        than ``keys``) raises :class:`AssignmentError`.
        """
        stamp = self._tick(ts)
        keys = [str(key) for key in keys]
        with _bad_input():
            pop = check_vector(popularity, len(keys), "CodeAssigner.update_popularity")
        idx = np.asarray([self._idx(key) for key in keys], dtype=np.int64)
        self._items.popularity[idx] = pop
        return self._reassign({}, stamp, round_=True)

    def set_thresholds(
        self, enter_threshold: float, exit_threshold: float, *, ts: int | None = None
    ) -> list[CodeChange]:
        """Move the head thresholds and re-evaluate every item (one popularity round)."""
        self._check_thresholds(enter_threshold, exit_threshold)
        stamp = self._tick(ts)
        self.enter_threshold = float(enter_threshold)
        self.exit_threshold = float(exit_threshold)
        return self._reassign({}, stamp, round_=True)

    def _reassign(
        self, fixed: dict[int, tuple[Code, str]], stamp: int, *, round_: bool
    ) -> list[CodeChange]:
        """Re-evaluate every item; ``fixed`` holds the old code and the reason of the new and
        re-coded items. A popularity ``round_`` counts towards lazy demotions.

        1. Head flags (with hysteresis) and policy lengths from the current popularity.
        2. Served lengths under the stability rules (see the module docstring).
        3. Head codes made unique.
        4. The code changes against the codes served before.
        """
        if not self._keys:
            return []
        items = self._items
        was_head = items.is_head.copy()
        old_len = items.lengths.copy()
        old_uses = items.uses_digit.copy()
        head, target = self._policy_targets()
        lengths, uses = self._stable_lengths(head, target, round_=round_)
        self._make_unique(head, lengths, uses)
        items.lengths = lengths
        items.uses_digit = uses
        items.is_head = head
        return self._changes(fixed, was_head, old_len, old_uses, stamp)

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
        self, head: np.ndarray, target: np.ndarray, *, round_: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Served path lengths and disambiguation flags under the stability rules.

        New or re-coded items (length 0) take the policy length at once; others only grow,
        except that a non-head item is shortened to its policy length (its digit dropped)
        after ``demote_after`` rounds in which that length stayed below its served one.
        """
        items = self._items
        cur = items.lengths
        fresh = cur == 0
        below = ~head & (target < cur + items.uses_digit.astype(np.int64))
        if round_:
            items.shrink_streak = np.where(below, items.shrink_streak + 1, 0)
        shrink = below & ~fresh & (items.shrink_streak >= self.demote_after)
        lengths = np.where(fresh | shrink, target, np.maximum(target, cur))
        uses = items.uses_digit & ~fresh & ~shrink & (lengths >= self.levels)
        items.shrink_streak[shrink] = 0
        return lengths.astype(np.int64), uses

    def _make_unique(self, head: np.ndarray, lengths: np.ndarray, uses: np.ndarray) -> None:
        """Deepen colliding head codes in place: the incumbent (served this very code
        before) keeps it, then the more popular item, then the one added first."""
        items = self._items
        fresh = items.lengths == 0  # new or re-coded: nothing to defend
        incumbent = ~fresh & (lengths == items.lengths) & (uses == items.uses_digit)
        top = float(items.popularity.max()) + 1.0
        priority = items.popularity + np.where(incumbent, top, 0.0)
        self._next_digit = _make_head_unique(
            items.paths, lengths, uses, items.digits, head, priority, self._next_digit
        )

    def _changes(
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
        changes: list[CodeChange] = []
        for i in np.flatnonzero(changed).tolist():
            new = self._code(i)
            if i in fixed:
                old, reason = fixed[i]
            else:
                old = tuple(int(c) for c in items.paths[i, : old_len[i]])
                if old_uses[i]:
                    old = (*old, int(items.digits[i]))
                reason = self._reason(i, old, new, was_head[i])
            if new != old:
                changes.append(CodeChange(self._keys[i], old, new, reason, stamp))
        return changes

    def _reason(self, i: int, old: Code, new: Code, was_head: bool) -> str:
        """Why item ``i``'s code went from ``old`` to ``new`` (neither new nor re-coded)."""
        if len(new) < len(old):
            return "demote"
        if self._items.is_head[i] and not was_head:
            return "promote"
        if len(new) == self.levels + 1 and self._items.uses_digit[i]:
            return "disambiguate"
        return "deepen"

    # -- state -----------------------------------------------------------------------------

    def state(self) -> AssignerState:
        return AssignerState(
            keys=tuple(self._keys),
            **self._items.saved(),
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
    def from_state(cls, state: AssignerState) -> CodeAssigner:
        """Rebuild an assigner equal to the one that produced ``state``.

        A state that cannot be rebuilt raises :class:`AssignmentError`.
        """
        try:
            policy = make_policy(state.policy_name, **state.policy_params)
        except LengthPolicyError as exc:
            raise AssignmentError(
                f"CodeAssigner.from_state: cannot rebuild policy ({exc})"
            ) from exc
        out = cls(
            state.levels,
            state.k,
            policy,
            enter_threshold=state.enter_threshold,
            exit_threshold=state.exit_threshold,
            demote_after=state.demote_after,
        )
        items = _Items.from_state(state)
        if len(set(state.keys)) != len(state.keys):
            raise AssignmentError("CodeAssigner.from_state: duplicate keys; the state is corrupt")
        out._keys = list(state.keys)
        out._index = {key: i for i, key in enumerate(out._keys)}
        out._items = items
        out._next_digit = int(state.next_digit)
        out._clock = int(state.clock)
        return out


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
    "ServedCodes",
    "assign_codes",
    "row_ids",
    "state_equal",
]
