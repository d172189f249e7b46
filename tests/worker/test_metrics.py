"""The per-domain metric families (:class:`worker.core.metrics.TextFamily`): the same
exposition prometheus_client writes, and a scrape formats only what changed since the last."""

from __future__ import annotations

import gc
import math
import platform

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.core.memory import release_free_memory
from worker.core.metrics import Metrics, TextFamily

TRICKY = ["plain", 'q"uote', "back\\\\slash", "new\nline", "ünï", ""]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, labels) -> value`` of an exposition, ``_created`` series left out."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_text_is_what_prometheus_client_writes_for_the_same_series() -> None:
    """Counters and gauges with escaped label values, odd floats and docs: parsed back, the
    same samples (and the same HELP/TYPE lines) as prometheus_client's own families."""
    registry = CollectorRegistry()
    ref_c = Counter(
        "adacode_t", 'doc "with" \\\\ and\nnewline', ["kind", "domain"], registry=registry
    )
    ref_g = Gauge("adacode_g", "a gauge", ["domain"], registry=registry)
    ours_c = TextFamily("adacode_t", 'doc "with" \\\\ and\nnewline', ["kind", "domain"], "counter")
    ours_g = TextFamily("adacode_g", "a gauge", ["domain"], "gauge")
    values = [0.0, 1e-7, 3.5, 1e21, math.inf, -math.inf, -2.0]
    for i, domain in enumerate(TRICKY):
        ref_c.labels("item", domain).inc(i + 0.5)
        ours_c.labels("item", domain).inc(i + 0.5)
        ref_g.labels(domain).set(values[i])
        ours_g.labels(domain).set(values[i])
    ours = ours_c.text() + ours_g.text()
    theirs = generate_latest(registry).decode()
    assert _samples(ours) == _samples(theirs)
    ours_lines = [line for line in ours.splitlines() if not line.startswith("#")]
    theirs_lines = [line for line in theirs.splitlines() if "_created" not in line]
    assert set(ours_lines) <= set(theirs_lines)  # the very lines, label order included
    ours_heads = [line for line in ours.splitlines() if line.startswith("#")]
    theirs_heads = [line for line in theirs.splitlines() if line.startswith("#")]
    assert ours_heads == [h for h in theirs_heads if "_created" not in h]
    nan = TextFamily("adacode_n", "nan", ["domain"], "gauge")
    nan.labels("d").set(math.nan)
    assert math.isnan(_samples(nan.text())[("adacode_n", (("domain", "d"),))])


def test_a_scrape_formats_only_the_series_changed_since_the_last() -> None:
    """1,000 domains: the first scrape formats each series once, a scrape with nothing
    changed formats none and returns the same text, a change of three domains formats three."""
    family = TextFamily("adacode_v", "v", ["domain"], "gauge")
    for i in range(1000):
        family.labels(f"d{i:04d}").set(i)
    first = family.text()
    assert family.formatted == 1000 and first.count("\n") == 1002
    assert family.text() == first and family.formatted == 1000
    for i in (3, 500, 999):
        family.labels(f"d{i:04d}").set(-1)
    family.labels("d0500").set(7)  # twice before a scrape: formatted once, the last value
    text = family.text()
    assert family.formatted == 1003
    parsed = _samples(text)
    assert parsed[("adacode_v", (("domain", "d0500"),))] == 7.0
    assert parsed[("adacode_v", (("domain", "d0003"),))] == -1.0
    assert parsed[("adacode_v", (("domain", "d0004"),))] == 4.0
    assert len(parsed) == 1000


def test_counters_only_go_up_and_labels_are_checked() -> None:
    counter = TextFamily("adacode_c", "c", ["domain"], "counter")
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("d").inc(-1)
    with pytest.raises(ValueError, match="not set"):
        counter.labels("d").set(3)
    with pytest.raises(ValueError, match="labels"):
        counter.labels("d", "extra")
    assert counter.text() == ""  # no series yet: nothing written, not even the HELP line


def test_the_worker_exposition_holds_the_registry_and_the_families() -> None:
    """Metrics.render: the registry's series and every family's, in one valid exposition."""
    m = Metrics()
    m.observe_batch(
        applied={("interaction", "shop"): 5},
        dead_topics=[],
        texts_encoded=0,
        code_changes=[("shop", "new"), ("shop", "new")],
        seconds=0.01,
    )
    m.version_created.labels("shop").set(1.7e9)
    samples = _samples(m.render().decode())
    assert (
        samples[("adacode_applied_events_total", (("domain", "shop"), ("kind", "interaction")))]
        == 5
    )
    assert samples[("adacode_code_changes_total", (("domain", "shop"), ("reason", "new")))] == 2
    assert samples[("adacode_version_created_timestamp_seconds", (("domain", "shop"),))] == 1.7e9
    assert ("adacode_batch_seconds_count", ()) in samples


def test_the_codebook_drift_is_exposed_and_nan_until_it_can_be_scored() -> None:
    from quantize.drift import CodebookDrift

    drift = CodebookDrift.new("c", k=4, half_life=1000)
    drift.add(np.ones(200), np.arange(200) % 4, adoption=True)
    m = Metrics()
    m.observe_drift(drift.report())
    samples = _samples(m.render().decode())
    assert math.isnan(samples[("adacode_codebook_drift_score", ())])
    assert samples[("adacode_codebook_drifted", ())] == 0
    assert samples[("adacode_codebook_coded_items", (("window", "baseline"),))] == 200
    drift.add(np.full(400, 3.0), np.zeros(400, dtype=int))  # far, and all in one cell
    report = drift.report()
    m.observe_drift(report)
    samples = _samples(m.render().decode())
    assert samples[("adacode_codebook_drift_score", ())] == pytest.approx(report.score)
    assert samples[("adacode_codebook_error_ratio", ())] == pytest.approx(3.0)
    assert samples[("adacode_codebook_balance", ())] == pytest.approx(0.25)
    assert samples[("adacode_codebook_drifted", ())] == 1
    assert samples[("adacode_codebook_catalogue_share", ())] == pytest.approx(200 / 600)
    assert samples[("adacode_codebook_coded_items", (("window", "recent"),))] == 400


@pytest.mark.parametrize(
    ("chain", "current", "mine"),
    [(["a"], "a", 1), (["a", "b", "c"], "b", 2), (["a", "b"], "b", 2), (["a", "b"], "x", 0)],
    ids=["first", "behind", "level", "other-lineage"],
)
def test_the_worker_and_group_codebook_generations(
    chain: list[str], current: str, mine: int
) -> None:
    m = Metrics()
    m.observe_codebook_chain(chain, current)
    samples = _samples(m.render().decode())
    assert samples[("adacode_codebook_generation", ())] == mine
    assert samples[("adacode_group_codebook_generation", ())] == len(chain)


def _histogram_count(metrics: Metrics, name: str, label: str, value: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == f"{name}_count" and sample.labels.get(label) == value:
                return sample.value
    raise AssertionError(f"no {name} series with {label}={value}")


def _gc_count(metrics: Metrics, generation: str) -> float:
    return _histogram_count(metrics, "adacode_gc_pause_seconds", "generation", generation)


def test_collector_passes_are_timed_while_watched_and_not_after() -> None:
    metrics = Metrics()
    assert _gc_count(metrics, "2") == 0.0  # every generation's series from the start
    unwatch = metrics.watch_gc()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        unwatch()
    watched = _gc_count(metrics, "2")
    assert watched >= 1.0 and _gc_count(metrics, "0") >= 1.0
    gc.collect()
    assert _gc_count(metrics, "2") == watched  # no longer watched


def _trim_count(metrics: Metrics, where: str) -> float:
    return _histogram_count(metrics, "adacode_memory_trim_seconds", "where", where)


def test_heap_trims_are_timed_by_caller_while_watched_and_not_after() -> None:
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    metrics = Metrics()
    assert _trim_count(metrics, "consumer") == 0.0  # every caller's series from the start
    unwatch = metrics.watch_trims()
    try:
        trimmed = release_free_memory("index")
    finally:
        unwatch()
    assert trimmed is glibc
    assert _trim_count(metrics, "index") == (1.0 if glibc else 0.0)
    assert _trim_count(metrics, "finetune") == 0.0
    release_free_memory("index")
    assert _trim_count(metrics, "index") == (1.0 if glibc else 0.0)  # no longer watched


def test_long_collector_passes_and_trims_are_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass or a trim at least ``LONG_PAUSE_S`` long is logged with what it did (here
    every one is long enough)."""
    import worker.core.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "LONG_PAUSE_S", 0.0)
    metrics = Metrics()
    unwatch_gc, unwatch_trims = metrics.watch_gc(), metrics.watch_trims()
    try:
        with caplog.at_level("INFO", logger="worker.core.metrics"):
            gc.collect()
            trimmed = release_free_memory("finetune")
    finally:
        unwatch_gc()
        unwatch_trims()
    text = caplog.text
    assert "collector pass of generation 2 took" in text and "objects collected" in text
    assert ("heap trim (finetune) took" in text) is trimmed
