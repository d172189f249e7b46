"""How long a served code is: head detection, prefix statistics and length policies.

Every item has a full path of ``L`` digits (see :mod:`quantize.codebook`); it is *served*
a prefix of it. A :class:`LengthPolicy` picks that prefix length per item from the paths,
the items' popularity (time-decayed interaction counts), their head flags and
:class:`PrefixStats` (per prefix node: item count, popularity mass, entropy, head count).
The uniqueness of head codes is not a policy concern: :mod:`quantize.assign` extends head
codes after the policy until no two head items share one.

Policies (registry :data:`POLICIES`, :func:`make_policy`):

* ``fixed``: every item gets ``length`` (default ``L``).
* ``popularity``: ``min_len`` plus a share of the remaining levels growing with
  ``log1p(popularity) / log1p(pop_ref)`` (``pop_ref`` defaults to the largest popularity).
* ``entropy`` (SARQ / SA^2CRQ spirit): tail items get ``min_len``; a head item starts at
  ``min_len`` and goes one level deeper while its prefix node is crowded, i.e. holds
  another head item or has a popularity-weighted *effective item count*
  ``exp(entropy) > max_effective``; it stops at the first depth where it is distinct
  enough.
* ``reverse`` (arXiv 2602.16375: frequent items deserve *shorter* codes): head items get
  ``min_len`` (the assigner then deepens them only as far as uniqueness among head items
  needs), tail items get the full ``L``.

Head detection uses hysteresis on absolute thresholds (:func:`head_flags`): an item
enters the head at ``popularity >= enter_threshold`` and leaves it only below
``exit_threshold <= enter_threshold``. :func:`thresholds_for_fraction` picks the
thresholds for a target head fraction (e.g. the top 20 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from quantize.exceptions import LengthPolicyError

DEFAULT_HEAD_FRACTION = 0.2
#: entropies closer than this count as equal (incremental and full sums differ in the last bits)
ENTROPY_TIE = 1e-9
DEFAULT_EXIT_RATIO = 0.8


# -- input checks ------------------------------------------------------------------------


def check_paths(paths: np.ndarray, what: str) -> np.ndarray:
    """``paths`` as a C-contiguous int64 ``[n, L]`` array with non-negative digits."""
    arr = np.asarray(paths)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise LengthPolicyError(
            f"{what}: paths must be an [n, L>=1] array of codeword digits, got shape "
            f"{arr.shape}; pass ResidualCodebook.encode output"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise LengthPolicyError(f"{what}: paths have dtype {arr.dtype}; pass integer digits")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if out.size and out.min() < 0:
        raise LengthPolicyError(f"{what}: paths hold negative digits; pass full paths only")
    return out


def check_vector(
    values: np.ndarray | None, n: int, what: str, *, default: float = 0.0
) -> np.ndarray:
    """``values`` as float64 ``[n]`` (``default`` everywhere when ``None``), finite and >= 0."""
    if values is None:
        return np.full(n, default, dtype=np.float64)
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise LengthPolicyError(
            f"{what}: expected {n} popularity values, got shape {arr.shape}; pass one per item"
        )
    if n and (not np.isfinite(arr).all() or arr.min() < 0):
        raise LengthPolicyError(
            f"{what}: popularity must be finite and >= 0; clean the counts first"
        )
    return arr


def check_mask(mask: np.ndarray | None, n: int, what: str) -> np.ndarray:
    """``mask`` as bool ``[n]`` (all ``False`` when ``None``)."""
    if mask is None:
        return np.zeros(n, dtype=bool)
    arr = np.asarray(mask)
    if arr.shape != (n,) or arr.dtype != np.bool_:
        raise LengthPolicyError(
            f"{what}: expected a bool array of {n} head flags, got {arr.dtype} {arr.shape}"
        )
    return arr


# -- head detection ------------------------------------------------------------------------


def head_flags(
    popularity: np.ndarray,
    prev_is_head: np.ndarray | None,
    enter_threshold: float,
    exit_threshold: float,
) -> np.ndarray:
    """Head flags with hysteresis: enter at ``>= enter``, stay while ``>= exit``.

    Items with zero popularity are never head, whatever the thresholds.
    """
    pop = check_vector(popularity, len(np.asarray(popularity)), "head_flags")
    prev = check_mask(prev_is_head, len(pop), "head_flags")
    if math.isnan(enter_threshold) or math.isnan(exit_threshold):
        raise LengthPolicyError("head_flags: thresholds are NaN; pass numbers (inf = no head)")
    if exit_threshold > enter_threshold:
        raise LengthPolicyError(
            f"head_flags: exit_threshold={exit_threshold} exceeds enter_threshold="
            f"{enter_threshold}; the exit threshold must not be above the enter threshold"
        )
    flags = np.where(prev, pop >= exit_threshold, pop >= enter_threshold)
    return flags & (pop > 0)


def thresholds_for_fraction(
    popularity: np.ndarray,
    fraction: float = DEFAULT_HEAD_FRACTION,
    exit_ratio: float = DEFAULT_EXIT_RATIO,
) -> tuple[float, float]:
    """``(enter, exit)`` thresholds that make about ``fraction`` of items head.

    ``enter`` is the popularity of the ``round(fraction * n)``-th most popular item (ties
    may admit a few more), never below the smallest positive popularity; ``exit`` is
    ``exit_ratio * enter``. With no positive popularity, ``enter`` is ``inf`` (no head).
    """
    if not 0.0 <= fraction <= 1.0:
        raise LengthPolicyError(
            f"thresholds_for_fraction: fraction={fraction}; pass a value in [0, 1]"
        )
    if not 0.0 < exit_ratio <= 1.0:
        raise LengthPolicyError(
            f"thresholds_for_fraction: exit_ratio={exit_ratio}; pass a value in (0, 1]"
        )
    pop = check_vector(popularity, len(np.asarray(popularity)), "thresholds_for_fraction")
    positive = pop[pop > 0]
    m = round(fraction * len(pop))
    if m == 0 or positive.size == 0:
        return math.inf, math.inf
    # the m-th largest popularity, never below the smallest positive one: when fewer than
    # m items are positive, that smallest one; else the m-th largest of the positive items
    # (np.partition over those only: O(positive), no full sort)
    if positive.size <= m:
        return float(positive.min()), float(positive.min()) * exit_ratio
    enter = float(np.partition(positive, positive.size - m)[positive.size - m])
    return enter, enter * exit_ratio


# -- prefix statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeStats:
    """Statistics of one prefix node."""

    count: int
    mass: float
    entropy: float
    head_count: int

    @property
    def effective_items(self) -> float:
        """``exp(entropy)``: how many equally popular items the node's mass looks like."""
        return math.exp(self.entropy)


@dataclass(frozen=True, eq=False)
class PrefixStats:
    """Per prefix node statistics, computed vectorized from paths and popularity.

    A node is a prefix of length ``depth`` in ``1..L``. ``node_ids[:, depth - 1]`` gives
    each item's node index at that depth (indices are per depth). Per depth and node:
    ``count`` (items), ``mass`` (sum of popularity), ``entropy`` (natural-log entropy of
    the popularity-weighted distribution over the node's items; for a node with zero mass,
    that of the uniform one, ``log(count)``) and ``head_count``.
    """

    paths: np.ndarray  # int64 [n, L]
    node_ids: np.ndarray  # int64 [n, L]
    count: tuple[np.ndarray, ...]
    mass: tuple[np.ndarray, ...]
    entropy: tuple[np.ndarray, ...]
    head_count: tuple[np.ndarray, ...]

    @property
    def levels(self) -> int:
        return int(self.paths.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.paths.shape[0])

    @classmethod
    def compute(
        cls,
        paths: np.ndarray,
        popularity: np.ndarray | None = None,
        is_head: np.ndarray | None = None,
    ) -> PrefixStats:
        p = check_paths(paths, "PrefixStats.compute")
        n, levels = p.shape
        pop = check_vector(popularity, n, "PrefixStats.compute")
        head = check_mask(is_head, n, "PrefixStats.compute")
        plogp = np.where(pop > 0, pop * np.log(np.where(pop > 0, pop, 1.0)), 0.0)
        node_ids = np.zeros((n, levels), dtype=np.int64)
        counts: list[np.ndarray] = []
        masses: list[np.ndarray] = []
        entropies: list[np.ndarray] = []
        heads: list[np.ndarray] = []
        parent = np.zeros(n, dtype=np.int64)
        width = int(p.max()) + 1 if p.size else 1
        for level in range(levels):
            key = parent * width + p[:, level]
            _, inv = np.unique(key, return_inverse=True)
            inv = inv.reshape(-1).astype(np.int64)
            n_nodes = int(inv.max()) + 1 if n else 0
            cnt = np.bincount(inv, minlength=n_nodes)
            mass = np.bincount(inv, weights=pop, minlength=n_nodes)
            s = np.bincount(inv, weights=plogp, minlength=n_nodes)
            with np.errstate(divide="ignore", invalid="ignore"):
                ent = np.where(mass > 0, np.log(np.where(mass > 0, mass, 1.0)) - s / mass, 0.0)
            ent = np.where(mass > 0, np.maximum(ent, 0.0), np.log(np.maximum(cnt, 1)))
            node_ids[:, level] = inv
            counts.append(cnt)
            masses.append(mass)
            entropies.append(ent)
            heads.append(np.bincount(inv, weights=head.astype(np.float64), minlength=n_nodes))
            parent = inv
        return cls(
            paths=p,
            node_ids=node_ids,
            count=tuple(counts),
            mass=tuple(masses),
            entropy=tuple(entropies),
            head_count=tuple(h.astype(np.int64) for h in heads),
        )

    def _check_depth(self, depth: int) -> int:
        if not 1 <= depth <= self.levels:
            raise LengthPolicyError(
                f"PrefixStats: depth {depth} outside [1, {self.levels}]; prefixes have 1..L digits"
            )
        return depth - 1

    def item_count(self, depth: int) -> np.ndarray:
        """Per item: the number of items in its node at ``depth``."""
        d = self._check_depth(depth)
        return self.count[d][self.node_ids[:, d]]

    def item_mass(self, depth: int) -> np.ndarray:
        d = self._check_depth(depth)
        return self.mass[d][self.node_ids[:, d]]

    def item_entropy(self, depth: int) -> np.ndarray:
        d = self._check_depth(depth)
        return self.entropy[d][self.node_ids[:, d]]

    def item_head_count(self, depth: int) -> np.ndarray:
        d = self._check_depth(depth)
        return self.head_count[d][self.node_ids[:, d]]

    def node(self, prefix: tuple[int, ...]) -> NodeStats:
        """Statistics of the node ``prefix`` (1..L digits); an absent prefix is empty."""
        d = self._check_depth(len(prefix))
        match = np.all(self.paths[:, : d + 1] == np.asarray(prefix, dtype=np.int64), axis=1)
        rows = np.flatnonzero(match)
        if rows.size == 0:
            return NodeStats(count=0, mass=0.0, entropy=0.0, head_count=0)
        node = int(self.node_ids[rows[0], d])
        return NodeStats(
            count=int(self.count[d][node]),
            mass=float(self.mass[d][node]),
            entropy=float(self.entropy[d][node]),
            head_count=int(self.head_count[d][node]),
        )


# -- policies ---------------------------------------------------------------------------------


@runtime_checkable
class LengthPolicy(Protocol):
    """Picks a served prefix length in ``[1, L]`` per item."""

    @property
    def name(self) -> str:
        """The registry name of the policy."""
        ...

    def served_lengths(
        self,
        paths: np.ndarray,
        popularity: np.ndarray,
        is_head: np.ndarray,
        stats: PrefixStats,
    ) -> np.ndarray:
        """Lengths (int64 ``[n]``) for items with full ``paths`` ``[n, L]``."""
        ...


def _check_min_len(min_len: int, name: str) -> int:
    if min_len < 1:
        raise LengthPolicyError(f"{name} policy: min_len={min_len}; it must be at least 1")
    return min_len


@dataclass(frozen=True)
class FixedLength:
    """Every item gets ``length`` digits (``None``: the full ``L``; clipped to ``L``)."""

    length: int | None = None
    name: str = "fixed"

    #: an item's length depends only on its own values (see :func:`is_per_item`)
    per_item = True

    def __post_init__(self) -> None:
        if self.length is not None and self.length < 1:
            raise LengthPolicyError(f"fixed policy: length={self.length}; use at least 1")

    def served_lengths(
        self,
        paths: np.ndarray,
        popularity: np.ndarray,
        is_head: np.ndarray,
        stats: PrefixStats,
    ) -> np.ndarray:
        n, levels = np.shape(paths)
        length = levels if self.length is None else min(self.length, levels)
        return np.full(n, length, dtype=np.int64)


@dataclass(frozen=True)
class PopularityLength:
    """``min_len + round((L - min_len) * clip(log1p(pop) / log1p(pop_ref), 0, 1))``.

    ``pop_ref=None`` uses the largest popularity of the batch.
    """

    min_len: int = 1
    pop_ref: float | None = None
    name: str = "popularity"

    @property
    def per_item(self) -> bool:
        """Without ``pop_ref`` every length depends on the largest popularity."""
        return self.pop_ref is not None

    def __post_init__(self) -> None:
        _check_min_len(self.min_len, self.name)
        if self.pop_ref is not None and not self.pop_ref > 0:
            raise LengthPolicyError(f"popularity policy: pop_ref={self.pop_ref}; use > 0")

    def served_lengths(
        self,
        paths: np.ndarray,
        popularity: np.ndarray,
        is_head: np.ndarray,
        stats: PrefixStats,
    ) -> np.ndarray:
        n, levels = np.shape(paths)
        lo = min(self.min_len, levels)
        pop = np.asarray(popularity, dtype=np.float64)
        ref = self.pop_ref if self.pop_ref is not None else (float(pop.max()) if n else 0.0)
        if ref <= 0:
            return np.full(n, lo, dtype=np.int64)
        share = np.clip(np.log1p(pop) / math.log1p(ref), 0.0, 1.0)
        return (lo + np.rint((levels - lo) * share)).astype(np.int64)


@dataclass(frozen=True)
class EntropyLength:
    """Tail items: ``min_len``; head items: deepen while their prefix node is crowded.

    A node is crowded when it holds another head item, or when its popularity-weighted
    effective item count ``exp(entropy)`` exceeds ``max_effective`` (the item does not
    dominate its node's traffic). The head item stops at the first depth where neither
    holds, or at ``L``.
    """

    min_len: int = 1
    max_effective: float = 2.0
    name: str = "entropy"

    #: an item's length depends on its own values and :meth:`node_flags` of its nodes
    per_item = True
    #: :meth:`node_flags` matter for head items only (tail items get ``min_len``)
    node_flags_heads_only = True

    def __post_init__(self) -> None:
        _check_min_len(self.min_len, self.name)
        if not self.max_effective >= 1.0:
            raise LengthPolicyError(
                f"entropy policy: max_effective={self.max_effective}; use a value >= 1 "
                "(1 = deepen until the item is alone in its node's traffic)"
            )

    def served_lengths(
        self,
        paths: np.ndarray,
        popularity: np.ndarray,
        is_head: np.ndarray,
        stats: PrefixStats,
    ) -> np.ndarray:
        n, levels = np.shape(paths)
        lo = min(self.min_len, levels)
        head = np.asarray(is_head, dtype=bool)
        lengths = np.full(n, lo, dtype=np.int64)
        active = head.copy()
        for depth in range(lo, levels):
            active &= self.node_flags(stats.item_head_count(depth), stats.item_entropy(depth))
            lengths[active] = depth + 1
        return lengths

    def node_flags(self, head_count: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        """Whether nodes are crowded: another head item, or an effective item count above
        ``max_effective`` (entropies within ``ENTROPY_TIE`` of the limit count as equal, so
        sums taken in another order decide alike)."""
        limit = math.log(self.max_effective) + ENTROPY_TIE
        return (np.asarray(head_count) > 1) | (np.asarray(entropy) > limit)


@dataclass(frozen=True)
class ReverseLength:
    """Head items get ``min_len`` (shorter codes for frequent items), tail items ``L``."""

    min_len: int = 1
    name: str = "reverse"

    per_item = True

    def __post_init__(self) -> None:
        _check_min_len(self.min_len, self.name)

    def served_lengths(
        self,
        paths: np.ndarray,
        popularity: np.ndarray,
        is_head: np.ndarray,
        stats: PrefixStats,
    ) -> np.ndarray:
        levels = np.shape(paths)[1]
        head = np.asarray(is_head, dtype=bool)
        return np.where(head, min(self.min_len, levels), levels).astype(np.int64)


def is_per_item(policy: LengthPolicy) -> bool:
    """Whether ``policy`` gives an item a length from its own popularity and head flag (and
    the :meth:`EntropyLength.node_flags` of its prefix nodes) only: then an assigner can
    re-evaluate just the items whose inputs moved. Policies that do not say are not."""
    return bool(getattr(policy, "per_item", False))


PolicyFactory = Callable[..., LengthPolicy]

POLICIES: dict[str, PolicyFactory] = {
    "fixed": FixedLength,
    "popularity": PopularityLength,
    "entropy": EntropyLength,
    "reverse": ReverseLength,
}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Add a policy factory under ``name`` (an existing name is an error)."""
    if name in POLICIES:
        raise LengthPolicyError(
            f"register_policy: a policy named {name!r} exists; pick another name"
        )
    POLICIES[name] = factory


def make_policy(name: str, **params: object) -> LengthPolicy:
    """Build the policy registered as ``name`` with ``params``."""
    try:
        factory = POLICIES[name]
    except KeyError as exc:
        raise LengthPolicyError(
            f"make_policy: unknown length policy {name!r}; use one of {sorted(POLICIES)}"
        ) from exc
    try:
        return factory(**params)
    except TypeError as exc:
        raise LengthPolicyError(
            f"make_policy: bad parameters {sorted(params)} for policy {name!r} ({exc})"
        ) from exc


def policy_lengths(
    policy: LengthPolicy,
    paths: np.ndarray,
    popularity: np.ndarray,
    is_head: np.ndarray,
    stats: PrefixStats | None = None,
) -> np.ndarray:
    """Run ``policy`` with checked inputs; the result is clipped to ``[1, L]``."""
    p = check_paths(paths, f"{policy.name} policy")
    n, levels = p.shape
    pop = check_vector(popularity, n, f"{policy.name} policy")
    head = check_mask(is_head, n, f"{policy.name} policy")
    st = PrefixStats.compute(p, pop, head) if stats is None else stats
    if st.n_items != n or st.levels != levels:
        raise LengthPolicyError(
            f"{policy.name} policy: stats cover {st.n_items} items x {st.levels} levels, the "
            f"paths {n} x {levels}; compute PrefixStats from the same paths"
        )
    out = np.asarray(policy.served_lengths(p, pop, head, st), dtype=np.int64)
    if out.shape != (n,):
        raise LengthPolicyError(
            f"{policy.name} policy returned shape {out.shape}, expected ({n},); fix the policy"
        )
    return np.clip(out, 1, levels)
