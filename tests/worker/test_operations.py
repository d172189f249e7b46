"""Operator actions on a stopped worker's state: export of a version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from quantize.table_model import ModelConfig
from store.rocksdb import RocksDBPartition
from tests.worker.test_versions import ROWS, TEXT_DIM, _random_snapshot
from worker.commands.operations import export_version
from worker.core.settings import Settings
from worker.state.exceptions import VersionError
from worker.state.versions import (
    VersionRecord,
    VersionTable,
    add_version,
    item_vectors,
)


def test_an_export_writes_the_versions_arrays_and_a_manifest(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path / "state"))
    config = ModelConfig(hidden=8, max_len=4, layers=1, heads=1, text_dim=TEXT_DIM)
    emb = np.random.default_rng(1).normal(size=(len(ROWS), TEXT_DIM)).astype(np.float32)
    table = VersionTable.build(_random_snapshot(config), ["a", "b", "c", "d"], ROWS, emb)
    with RocksDBPartition.open(settings.state_path) as store:
        batch = store.batch()
        add_version(store, batch, "shop", VersionRecord(0, None, 1.0, "cb", {}, {}), table, keep=5)
        store.write(batch)
    out = tmp_path / "out" / "shop-v1.npz"
    manifest = export_version(settings, "shop", None, out)
    with np.load(out, allow_pickle=False) as npz:
        assert list(npz["item_ids"]) == ["a", "b", "c", "d"]
        np.testing.assert_allclose(npz["item_vectors"], item_vectors(table), rtol=1e-6)
        assert npz["text_proj"].shape == (8, config.text_hidden)
        assert npz["text_in"].shape == (config.text_hidden, TEXT_DIM)
        assert npz["text_in_bias"].shape == (config.text_hidden,)
        assert orjson.loads(npz["manifest"].tobytes())["version"] == 1
    side = orjson.loads(out.with_suffix(".npz.manifest.json").read_bytes())
    assert side["version"] == manifest["version"] == 1
    assert set(side["arrays"]) >= {"item_ids", "item_vectors", "rows", "text_proj", "text_in"}


def test_exporting_a_domain_without_versions_says_what_to_run(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path / "state"))
    RocksDBPartition.open(settings.state_path).close()
    with pytest.raises(VersionError, match="adacode finetune --domain shop"):
        export_version(settings, "shop", None, tmp_path / "x.npz")
