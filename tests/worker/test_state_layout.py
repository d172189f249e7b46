"""The key layouts of worker.state.layout: every build/parse pair round-trips, a domain's keys
form one prefix range apart from every other domain's, and the bytes are pinned to the
on-disk format (a change here makes existing state unreadable)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import worker.state.layout as layout
from store.partition import COLUMN_FAMILIES, offset_key
from worker.core.exceptions import WorkerError
from worker.core.settings import Settings
from worker.state.exceptions import KeyLayoutError
from worker.state.layout import (
    CODEBOOK_CURRENT,
    CODEBOOK_DRIFT,
    CURRENT_PREFIX,
    DOMAIN_COUNTERS_PREFIX,
    UNPREFIXED_CODE_PREFIXES,
    assigner_key,
    code_namespace_key,
    code_row_key,
    code_row_prefix,
    codebook_key,
    codebook_of_namespace_key,
    domain_counters_key,
    domain_of_assigner_key,
    domain_of_counters_key,
    domain_of_current_key,
    domain_prefix,
    history_key,
    history_key_ts,
    history_prefix,
    interaction_key,
    interaction_key_ts,
    interaction_keys,
    item_ids_of,
    item_key,
    mirrored_offset_key,
    namespace_prefix,
    restore_position_key,
    round_pending_key,
    round_pending_prefix,
    split_item_key,
    split_mirrored_offset_key,
    user_key,
    version_key,
    version_key_domain,
    version_kind_prefix,
    version_part_key,
    version_prefix,
)

#: domains with odd characters: anything but the separator (``domain_pattern`` is stricter)
domains = st.text(min_size=1, max_size=20).filter(lambda d: "\x00" not in d)
ids = st.text(min_size=1, max_size=30)  # ids may hold any character, \x00 too
i64 = st.integers(0, 2**63 - 1)
kinds = st.sampled_from(["rec", "table", "items", "current", "next", "switch"])

ROUND_TRIPS = settings(max_examples=100, deadline=None)


# --- round trips ---------------------------------------------------------------------------


@ROUND_TRIPS
@given(domains, ids)
def test_item_and_user_keys_split_back(domain: str, item_id: str) -> None:
    assert split_item_key(item_key(domain, item_id)) == (domain, item_id)
    assert split_item_key(user_key(domain, item_id)) == (domain, item_id)
    assert item_ids_of(domain, [item_key(domain, item_id)]) == [item_id]


@ROUND_TRIPS
@given(domains, i64, st.integers(0, 2**31 - 1), i64)
def test_interaction_keys_give_back_their_time(domain: str, ts: int, part: int, off: int) -> None:
    key = interaction_key(domain, ts, part, off)
    assert interaction_key_ts(key) == ts
    assert interaction_keys([domain], [ts], [part], [off]) == [key]


@ROUND_TRIPS
@given(domains)
def test_domain_keys_give_back_their_domain(domain: str) -> None:
    assert domain_of_counters_key(domain_counters_key(domain)) == domain
    assert domain_of_assigner_key(assigner_key(domain)) == domain
    assert domain_of_current_key(version_key("current", domain)) == domain


@ROUND_TRIPS
@given(domains, i64, ids, st.sampled_from(["promote", "demote", "new", "recode"]))
def test_history_keys_give_back_their_time(domain: str, ts: int, item_id: str, why: str) -> None:
    key = history_key(domain, ts, item_id, why)
    assert key.startswith(history_prefix(domain))
    assert history_key_ts(domain, key) == ts


@ROUND_TRIPS
@given(kinds, domains, st.none() | i64)
def test_version_keys_name_their_domain(kind: str, domain: str, version: int | None) -> None:
    key = version_key(kind, domain, version)  # type: ignore[arg-type]
    assert version_key_domain(key) == domain
    if version is not None:
        assert key.startswith(version_prefix(kind, domain))  # type: ignore[arg-type]


@ROUND_TRIPS
@given(st.text(max_size=20), st.integers(0, 2**31 - 1))
def test_mirrored_offset_keys_split_back(topic: str, partition: int) -> None:
    okey = offset_key(topic, partition)
    assert split_mirrored_offset_key(mirrored_offset_key(okey)) == okey


@ROUND_TRIPS
@given(kinds, domains, st.none() | i64)
def test_version_keys_are_not_mirrored_offsets(kind: str, domain: str, version: int | None) -> None:
    assert split_mirrored_offset_key(version_key(kind, domain, version)) is None  # type: ignore[arg-type]


def test_a_versions_key_without_domain_is_a_layout_error() -> None:
    with pytest.raises(KeyLayoutError, match="names no domain") as caught:
        version_key_domain(b"garbage")
    assert isinstance(caught.value, WorkerError)


# --- one prefix range per domain ------------------------------------------------------------


def _keys_of(domain: str) -> list[tuple[bytes, bytes]]:
    """(prefix scanned, key) of every prefix-scanned key kind of ``domain``."""
    return [
        (domain_prefix(domain), item_key(domain, "x")),
        (domain_prefix(domain), user_key(domain, "x")),
        (domain_prefix(domain), interaction_key(domain, 7, 1, 2)),
        (history_prefix(domain), history_key(domain, 7, "x", "new")),
        (version_prefix("rec", domain), version_key("rec", domain, 3)),
        (version_prefix("switch", domain), version_key("switch", domain, 0)),
    ]


@ROUND_TRIPS
@given(domains, domains)
def test_a_domains_keys_stay_in_its_own_prefix_range(a: str, b: str) -> None:
    for prefix, key in _keys_of(a):
        assert key.startswith(prefix)
    if a != b:
        others = {prefix for prefix, _ in _keys_of(b)}
        for _, key in _keys_of(a):
            assert not any(key.startswith(p) for p in others)


@pytest.mark.parametrize(("short", "long"), [("a", "ab"), ("shop", "shop.eu"), ("d1", "d1-2")])
def test_a_domain_that_prefixes_another_does_not_share_its_keys(short: str, long: str) -> None:
    for (prefix, _), (_, key) in zip(_keys_of(short), _keys_of(long), strict=True):
        assert not key.startswith(prefix)


@ROUND_TRIPS
@given(domains, st.lists(st.tuples(i64, st.integers(0, 2**31 - 1), i64), min_size=2, max_size=8))
def test_interaction_keys_sort_by_time(domain: str, rows: list[tuple[int, int, int]]) -> None:
    keys = [interaction_key(domain, *row) for row in rows]
    assert [interaction_key_ts(k) for k in sorted(keys)] == sorted(ts for ts, _, _ in rows)


def _code_keys(domain: str, ns: bytes) -> list[tuple[bytes, bytes]]:
    """(prefix scanned or read, key) of each code key kind of ``domain`` in namespace ``ns``."""
    return [
        (assigner_key(domain, ns=ns), assigner_key(domain, ns=ns)),
        (code_row_prefix(domain, ns=ns), code_row_key(domain, "x", ns=ns)),
        (round_pending_prefix(domain, ns=ns), round_pending_key(domain, "x", ns=ns)),
    ]


@ROUND_TRIPS
@given(domains, domains, st.text(alphabet="0123456789abcdef", min_size=1, max_size=16))
def test_code_namespaces_keep_their_keys_apart(a: str, b: str, codebook_id: str) -> None:
    """A namespaced key lies in its namespace, under the domain's prefix there, and in no
    range of the unprefixed keys (of any domain) nor of another namespace; the unprefixed
    keys lie outside every namespace, and the registry key gives back its codebook."""
    ns = namespace_prefix(codebook_id)
    other = namespace_prefix(codebook_id + "0")
    assert codebook_of_namespace_key(code_namespace_key(codebook_id)) == codebook_id
    for prefix, key in _code_keys(a, ns):
        assert key.startswith(ns) and key.startswith(prefix)
        assert not any(key.startswith(p) for p in UNPREFIXED_CODE_PREFIXES)
        assert not any(key.startswith(p) for p, _ in _code_keys(b, b""))
        assert not key.startswith(other)
    for prefix, key in _code_keys(b, b""):
        assert key.startswith(prefix) and not key.startswith(ns)
        assert any(key.startswith(p) for p in UNPREFIXED_CODE_PREFIXES)
    if a != b:  # the scanned ranges are the domain's own; its header is its own key
        assert assigner_key(a, ns=ns) != assigner_key(b, ns=ns)
        for _, key in _code_keys(a, ns)[1:]:
            assert not any(key.startswith(p) for p, _ in _code_keys(b, ns)[1:])


def test_the_default_domain_pattern_keeps_the_separator_out_of_domains() -> None:
    pattern = re.compile(Settings().domain_pattern)
    assert pattern.fullmatch("shop.eu-1_x")
    assert not pattern.fullmatch("a\x00b") and not pattern.fullmatch("a\x00")


# --- the on-disk bytes ------------------------------------------------------------------------

V1 = (1).to_bytes(8, "big")

PINNED = [
    (item_key("shop", "i1"), b"shop\x00i1"),
    (user_key("shop", "u1"), b"shop\x00u1"),
    (domain_prefix("shop"), b"shop\x00"),
    (
        interaction_key("shop", 5, 2, 9),
        b"shop\x00" + (5).to_bytes(8, "big") + (2).to_bytes(4, "big") + (9).to_bytes(8, "big"),
    ),
    (domain_counters_key("shop"), b"domain/shop"),
    (DOMAIN_COUNTERS_PREFIX, b"domain/"),
    (CODEBOOK_CURRENT, b"codebook/current"),
    (CODEBOOK_DRIFT, b"drift/codebook"),
    (codebook_key(b"cb1234"), b"codebook/cb1234"),
    (restore_position_key("t.versions", 3), b"restore/t.versions/3"),
    (assigner_key("shop"), b"state\x00shop"),
    (code_row_key("shop", "i1"), b"row\x00shop\x00i1"),
    (round_pending_key("shop", "i1"), b"pend\x00shop\x00i1"),
    (namespace_prefix("cb12"), b"ns\x00cb12\x00"),
    (code_row_key("shop", "i1", ns=namespace_prefix("cb12")), b"ns\x00cb12\x00row\x00shop\x00i1"),
    (code_namespace_key("cb12"), b"codes/ns/cb12"),
    (version_kind_prefix("rec"), b"rec\x00"),
    (history_prefix("shop"), b"hist\x00shop\x00"),
    (
        history_key("shop", 5, "i1", "promote"),
        b"hist\x00shop\x00" + (5).to_bytes(8, "big") + b"i1\x00promote",
    ),
    (version_key("rec", "shop", 1), b"rec\x00shop\x00" + V1),
    (version_key("table", "shop", 1), b"table\x00shop\x00" + V1),
    (version_key("items", "shop", 1), b"items\x00shop\x00" + V1),
    (
        version_part_key("items", "shop", 1, 2),
        b"part\x00shop\x00" + V1 + b"\x00items\x00" + (2).to_bytes(4, "big"),
    ),
    (version_key("switch", "shop", 1), b"switch\x00shop\x00" + V1),
    (version_key("current", "shop"), b"current\x00shop"),
    (version_key("next", "shop"), b"next\x00shop"),
    (version_prefix("rec", "shop"), b"rec\x00shop\x00"),
    (CURRENT_PREFIX, b"current\x00"),
    (offset_key("t.control", 2), b"t.control\x00\x00\x00\x00\x02"),
    (
        mirrored_offset_key(offset_key("t.control", 2)),
        b"\x01offset\x00t.control\x00\x00\x00\x00\x02",
    ),
]


@pytest.mark.parametrize(("built", "stored"), PINNED, ids=[repr(s) for _, s in PINNED])
def test_keys_keep_the_stored_bytes(built: bytes, stored: bytes) -> None:
    assert built == stored


def test_the_layout_documents_every_column_family() -> None:
    table = layout.__doc__ or ""
    for cf in COLUMN_FAMILIES:
        assert re.search(rf"^{cf}\s", table, re.MULTILINE), cf
