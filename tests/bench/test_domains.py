"""bench/domains.py's pure parts: the domains, the round-robin, the log parsing, the figures.

Fast unit tests: no broker, no worker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.domains import (
    FinetuneLine,
    Run,
    bound_s,
    domain_specs,
    exactly_once,
    figures,
    finetune_line,
    head_longer_share,
    pool_size,
    published_over_time,
    round_robin,
    tail_log,
)
from bench.scale import LogLine, Sample, SyntheticDomain
from worker.core.settings import Settings
from worker.tuning.finetune import OUTCOME_LINE


def test_domain_specs_are_distinct_small_domains() -> None:
    specs = domain_specs(3, items=300, interactions=3000, seed=1)
    assert [s.domain for s in specs] == ["d0000", "d0001", "d0002"]
    assert len({s.seed for s in specs}) == 3
    assert all(s.items == 300 and s.interactions == 3000 and s.users == 150 for s in specs)
    a, b = (next(SyntheticDomain(s).item_chunks())[1] for s in specs[:2])
    assert a.shape == b.shape == (300, 384)
    assert abs(a - b).max() > 0.1  # their own embeddings


def test_round_robin_keeps_each_stream_in_order_and_loses_nothing() -> None:
    streams = [[("a", i) for i in range(5)], [("b", i) for i in range(2)], []]
    out = list(round_robin(streams, block=2))
    assert out == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("a", 3), ("a", 4)]


def test_finetune_line_reads_the_workers_outcome_lines() -> None:
    # the line as the worker writes it (its format, phases included: a format change that
    # the bench cannot read fails here, not in a 30-minute run that waits for nothing)
    line = OUTCOME_LINE % (
        "d0003",
        1,
        "published",
        "recall@10 0.6000 vs current none",
        0.94,
        "reading 0.1 s to 1,726 MiB peak, training 0.7 s to 1,726 MiB peak",
    )
    assert finetune_line(LogLine(5.0, line)) == FinetuneLine(5.0, "d0003", 1, "published", 0.9)
    rejected = OUTCOME_LINE % ("d0003", 2, "rejected", "recall@10 0.1 vs current 0.6", 2.0, "")
    assert finetune_line(LogLine(5.5, rejected)) == FinetuneLine(5.5, "d0003", 2, "rejected", 2.0)
    skipped = finetune_line(LogLine(6.0, "fine-tune of d0004 skipped: no codes yet"))
    assert skipped == FinetuneLine(6.0, "d0004", None, "skipped", None)
    assert finetune_line(LogLine(7.0, "fine-tune d0003 epoch 2: loss 1.0 (0.1 s)")) is None
    assert finetune_line(LogLine(7.0, "fine-tune of d0003 starts (requested)")) is None


def test_pool_size_from_the_settings_line() -> None:
    settings = Settings().redacted() | {"finetune_workers": 3}
    lines = [LogLine(1.0, "hello"), LogLine(2.0, f"starting worker with settings {settings}")]
    assert pool_size(lines) == 3
    assert pool_size([LogLine(1.0, "hello")]) is None


def test_published_over_time_counts_each_domain_once() -> None:
    outcomes = [
        FinetuneLine(12.0, "b", 1, "published", 1.0),
        FinetuneLine(11.0, "a", 1, "published", 1.0),
        FinetuneLine(13.0, "a", 2, "published", 1.0),
        FinetuneLine(14.0, "c", 1, "rejected", 1.0),
    ]
    assert published_over_time(outcomes, 10.0) == [(1.0, 1), (2.0, 2)]


def test_bound_and_shares() -> None:
    assert bound_s(1000, 0.9, 3) == pytest.approx(330.0)
    assert bound_s(10, 1.0, 1, slack=0.0) == 10.0
    assert head_longer_share([(3.0, 1.0, 5), (1.0, 1.0, 5), (2.0, 1.0, 0)]) == pytest.approx(1 / 3)
    assert head_longer_share([]) is None


def test_exactly_once_names_lost_and_doubled_domains() -> None:
    got = exactly_once({"a": 1, "b": 0, "c": 2}, ["a", "b", "c", "d"])
    assert (got["exactly_one"], got["none"], got["more"]) == (1, 2, 1)
    assert got["none_examples"] == ["b", "d"] and got["more_examples"] == ["c"]
    assert not got["held"]
    assert exactly_once({"a": 1}, ["a"])["held"]


def test_tail_log_reads_only_complete_lines(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_bytes(b'{"ts": "2026-01-01T00:00:00Z", "msg": "one"}\npartial')
    lines, offset = tail_log(log, 0)
    assert [ln.msg for ln in lines] == ["one"] and lines[0].ts is not None
    with log.open("ab") as fh:
        fh.write(b" line\n")
    lines, offset2 = tail_log(log, offset)
    assert [ln.msg for ln in lines] == ["partial line"] and offset2 == log.stat().st_size
    assert tail_log(tmp_path / "missing", 0) == ([], 0)


def _sample(t: float, items: float, inter: float, rss: float, scrape_s: float = 0.01) -> Sample:
    return Sample(t, scrape_s, items, inter, 0.0, rss, rss, 0.0, None)


def test_figures_from_samples_marks_and_outcomes() -> None:
    args = argparse.Namespace(items=10, interactions=100)
    run = Run(2)
    run.samples = [
        _sample(0.0, 0, 0, 100.0),
        _sample(1.0, 10, 0, 110.0),
        _sample(2.0, 20, 0, 120.0),
        _sample(4.0, 20, 0, 120.0),
        _sample(5.0, 20, 100, 130.0),
        _sample(6.0, 20, 200, 140.0, scrape_s=0.05),
        _sample(8.0, 20, 200, 150.0, scrape_s=0.2),
    ]
    run.marks = {"items_done": 3.0, "ingest_done": 6.5, "requests_start": 7.0}
    run.outcomes = [
        FinetuneLine(9.0, "d0000", 1, "published", 1.0),
        FinetuneLine(10.0, "d0001", 1, "published", 3.0),
    ]
    f = figures(run, args)
    assert f["items_s"] == pytest.approx(2.0)
    assert f["interactions_s"] == pytest.approx(2.0)  # from the poll at 4 s to 6 s
    assert f["rss_after_ingest_mib"] == 140.0
    assert f["rss_growth_per_domain_mib"] == pytest.approx(20.0)
    assert f["scrape_finetune_ms"]["max"] == pytest.approx(200.0)
    assert f["scrape_ingest_ms"]["max"] == pytest.approx(50.0)
    assert f["finetune_s"]["median"] == pytest.approx(2.0)
    assert f["all_published_s"] == pytest.approx(3.0)
    assert f["restart_gap_s"] is None
    run.marks |= {"sigterm": 8.0, "restarted": 9.5}
    assert figures(run, args)["all_published_less_gap_s"] == pytest.approx(1.5)
