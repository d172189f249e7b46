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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
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
    """
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
            raise AssignmentError(f"assign_codes: is_head has shape {head.shape}, expected ({n},)")
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


@dataclass(frozen=True, eq=False)
class AssignerState:
    """Everything a :class:`CodeAssigner` holds, as plain arrays and scalars."""

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
            paths=self.paths,
            popularity=self.popularity,
            is_head=self.is_head,
            lengths=self.lengths,
            digits=self.digits,
            uses_digit=self.uses_digit,
            shrink_streak=self.shrink_streak,
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
                arrays = {
                    name: np.array(npz[name])
                    for name in (
                        "paths",
                        "popularity",
                        "is_head",
                        "lengths",
                        "digits",
                        "uses_digit",
                        "shrink_streak",
                    )
                }
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
        self._paths = np.zeros((0, levels), dtype=np.int64)
        self._pop = np.zeros(0, dtype=np.float64)
        self._head = np.zeros(0, dtype=bool)
        self._lengths = np.zeros(0, dtype=np.int64)
        self._digits = np.zeros(0, dtype=np.int64)
        self._uses = np.zeros(0, dtype=bool)
        self._streak = np.zeros(0, dtype=np.int64)
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
        base = tuple(int(c) for c in self._paths[i, : self._lengths[i]])
        return (*base, int(self._digits[i])) if self._uses[i] else base

    def served_code(self, key: str) -> Code:
        return self._code(self._idx(key))

    def full_path(self, key: str) -> Code:
        return tuple(int(c) for c in self._paths[self._idx(key)])

    def is_head(self, key: str) -> bool:
        return bool(self._head[self._idx(key)])

    def popularity(self, key: str) -> float:
        return float(self._pop[self._idx(key)])

    def row_ids(self, key: str) -> np.ndarray:
        return row_ids(self.served_code(key), self.k, self.levels)

    def served(self) -> ServedCodes:
        """A snapshot of all served codes, in insertion order of the keys."""
        return ServedCodes(
            self._paths.copy(),
            self._lengths.copy(),
            self._digits.copy(),
            self._uses.copy(),
            self._head.copy(),
            self.k,
            self._next_digit,
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
        updates its popularity when given. Returns the code changes, new items first.
        """
        stamp = self._tick(ts)
        keys = [str(key) for key in keys]
        p = check_paths(paths, "CodeAssigner.add")
        if p.shape != (len(keys), self.levels):
            raise AssignmentError(
                f"CodeAssigner.add: {len(keys)} keys but paths of shape {p.shape}; pass one "
                f"path of {self.levels} digits per key"
            )
        if p.size and p.max() >= self.k:
            raise AssignmentError(
                f"CodeAssigner.add: paths hold digit {int(p.max())} >= k={self.k}; encode "
                "with this domain's codebook"
            )
        if len(set(keys)) != len(keys):
            raise AssignmentError("CodeAssigner.add: duplicate keys in one call; deduplicate")
        pop = None if popularity is None else check_vector(popularity, len(keys), "add")
        before: dict[int, Code] = {}
        reasons: dict[int, str] = {}
        new_rows: list[int] = []
        for j, key in enumerate(keys):
            i = self._index.get(key)
            if i is None:
                new_rows.append(j)
                continue
            if not np.array_equal(self._paths[i], p[j]):
                before[i] = self._code(i)
                self._paths[i] = p[j]
                self._lengths[i] = 0
                self._uses[i] = False
                self._digits[i] = -1
                self._streak[i] = 0
                reasons[i] = "recode"
            if pop is not None:
                self._pop[i] = pop[j]
        start = len(self._keys)
        if new_rows:
            rows = np.asarray(new_rows)
            m = rows.size
            for j in new_rows:
                self._index[keys[j]] = len(self._keys)
                self._keys.append(keys[j])
            self._paths = np.concatenate([self._paths, p[rows]])
            self._pop = np.concatenate([self._pop, np.zeros(m) if pop is None else pop[rows]])
            self._head = np.concatenate([self._head, np.zeros(m, dtype=bool)])
            self._lengths = np.concatenate([self._lengths, np.zeros(m, dtype=np.int64)])
            self._digits = np.concatenate([self._digits, np.full(m, -1, dtype=np.int64)])
            self._uses = np.concatenate([self._uses, np.zeros(m, dtype=bool)])
            self._streak = np.concatenate([self._streak, np.zeros(m, dtype=np.int64)])
            for i in range(start, len(self._keys)):
                reasons[i] = "new"
                before[i] = ()
        return self._reassign(before, reasons, stamp, round_=False)

    def update_popularity(
        self, keys: Sequence[str], popularity: np.ndarray, *, ts: int | None = None
    ) -> list[CodeChange]:
        """Set the popularity of ``keys`` and re-evaluate every item (one popularity round)."""
        stamp = self._tick(ts)
        keys = [str(key) for key in keys]
        pop = check_vector(popularity, len(keys), "CodeAssigner.update_popularity")
        idx = np.asarray([self._idx(key) for key in keys], dtype=np.int64)
        self._pop[idx] = pop
        return self._reassign({}, {}, stamp, round_=True)

    def set_thresholds(
        self, enter_threshold: float, exit_threshold: float, *, ts: int | None = None
    ) -> list[CodeChange]:
        """Move the head thresholds and re-evaluate every item (one popularity round)."""
        self._check_thresholds(enter_threshold, exit_threshold)
        stamp = self._tick(ts)
        self.enter_threshold = float(enter_threshold)
        self.exit_threshold = float(exit_threshold)
        return self._reassign({}, {}, stamp, round_=True)

    def _reassign(
        self, before: dict[int, Code], reasons: dict[int, str], stamp: int, *, round_: bool
    ) -> list[CodeChange]:
        """Re-evaluate every item; ``before`` holds the old codes of new/re-coded items."""
        n = len(self._keys)
        if n == 0:
            return []
        was_head = self._head.copy()
        old_len = self._lengths.copy()
        old_uses = self._uses.copy()
        head = head_flags(self._pop, self._head, self.enter_threshold, self.exit_threshold)
        stats = PrefixStats.compute(self._paths, self._pop, head)
        try:
            target = policy_lengths(self.policy, self._paths, self._pop, head, stats)
        except LengthPolicyError as exc:
            raise AssignmentError(f"CodeAssigner: the length policy failed ({exc})") from exc
        cur = self._lengths
        fresh = cur == 0  # new or re-coded items take the policy length at once
        # head items never get shorter; other items only after demote_after rounds in
        # which their policy length stayed below their served length (digit included)
        below = ~head & (target < cur + self._uses.astype(np.int64))
        if round_:
            self._streak = np.where(below, self._streak + 1, 0)
        shrink = below & ~fresh & (self._streak >= self.demote_after)
        new_len = np.where(fresh | shrink, target, np.maximum(target, cur))
        uses = self._uses & ~fresh & ~shrink & (new_len >= self.levels)
        self._streak[shrink] = 0
        # incumbents (served this very code before) keep it, then the more popular item
        incumbent = ~fresh & (new_len == cur) & (uses == self._uses)
        top = float(self._pop.max()) + 1.0
        priority = self._pop + np.where(incumbent, top, 0.0)
        new_len = new_len.astype(np.int64)
        self._next_digit = _make_head_unique(
            self._paths, new_len, uses, self._digits, head, priority, self._next_digit
        )
        self._lengths = new_len
        self._uses = uses
        self._head = head
        changed = (new_len != old_len) | (uses != old_uses)
        if before:
            changed[np.fromiter(before, dtype=np.int64, count=len(before))] = True
        changes: list[CodeChange] = []
        for i in np.flatnonzero(changed).tolist():
            new = self._code(i)
            if i in before:
                old = before[i]
            else:
                old = tuple(int(c) for c in self._paths[i, : old_len[i]])
                if old_uses[i]:
                    old = (*old, int(self._digits[i]))
            if new == old:
                continue
            reason = reasons.get(i)
            if reason is None:
                if len(new) < len(old):
                    reason = "demote"
                elif head[i] and not was_head[i]:
                    reason = "promote"
                elif len(new) == self.levels + 1 and self._uses[i]:
                    reason = "disambiguate"
                else:
                    reason = "deepen"
            changes.append(CodeChange(self._keys[i], old, new, reason, stamp))
        return changes

    # -- state -----------------------------------------------------------------------------

    def state(self) -> AssignerState:
        return AssignerState(
            keys=tuple(self._keys),
            paths=self._paths.astype(np.int32),
            popularity=self._pop.copy(),
            is_head=self._head.copy(),
            lengths=self._lengths.copy(),
            digits=self._digits.copy(),
            uses_digit=self._uses.copy(),
            shrink_streak=self._streak.copy(),
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
        """Rebuild an assigner equal to the one that produced ``state``."""
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
        n = len(state.keys)
        paths = check_paths(state.paths.reshape(n, state.levels), "CodeAssigner.from_state")
        arrays: Iterable[tuple[str, np.ndarray]] = (
            ("popularity", state.popularity),
            ("is_head", state.is_head),
            ("lengths", state.lengths),
            ("digits", state.digits),
            ("uses_digit", state.uses_digit),
            ("shrink_streak", state.shrink_streak),
        )
        for name, arr in arrays:
            if np.shape(arr) != (n,):
                raise AssignmentError(
                    f"CodeAssigner.from_state: {name} has shape {np.shape(arr)}, expected "
                    f"({n},); the state is corrupt, rebuild it from the items"
                )
        if len(set(state.keys)) != n:
            raise AssignmentError("CodeAssigner.from_state: duplicate keys; the state is corrupt")
        out._keys = list(state.keys)
        out._index = {key: i for i, key in enumerate(out._keys)}
        out._paths = paths
        out._pop = np.asarray(state.popularity, dtype=np.float64).copy()
        out._head = np.asarray(state.is_head, dtype=bool).copy()
        out._lengths = np.asarray(state.lengths, dtype=np.int64).copy()
        out._digits = np.asarray(state.digits, dtype=np.int64).copy()
        out._uses = np.asarray(state.uses_digit, dtype=bool).copy()
        out._streak = np.asarray(state.shrink_streak, dtype=np.int64).copy()
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
