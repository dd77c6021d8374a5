"""Shared fixtures: tiny settings that exercise every stage in seconds, and
helpers to run the real graph in a temp ``$DBPRUNE_HOME``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

#: settings overrides that keep a whole `dbprune run` on a 2-core CPU short
TINY: dict[str, Any] = {
    "profile": "sample",
    "pool": {"shards": 2, "samples_per_shard": 80, "concepts": 6, "image_size": 32, "reference_samples": 256,
             "eval_per_class": 4, "seed": 0},
    "encoder": {"bootstrap": {"epochs": 2, "batch_size": 64, "warmup": 2, "workers": 1}},
    "compute": {"batch_size": 64, "workers": 0, "threads": 1, "tile": 64},
    "semdedup": {"dedup_k": 4, "niter": 10, "sample_size": 10000},
    "dbp": {"k": 4, "l": 2, "niter": 10, "sample_size": 10000},
    "export": {"shard_size": 32},
    "train": {"samples_seen": 192, "batch_size": 32, "warmup": 1, "workers": 1, "train_seeds": [0]},
    "eval": {"batch_size": 64, "bootstrap_samples": 200},
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump(deep_merge(TINY, overrides)))
    return path


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $DBPRUNE_HOME (pool inside it, generated on first run)."""
    h = tmp_path / "home"
    monkeypatch.setenv("DBPRUNE_HOME", str(h))
    for name in ("DBPRUNE_POOL", "DAGSTER_HOME"):
        # set, then removed: restored to what it was however the test's code sets it (cmd_ui does)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return h


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> "subprocess.CompletedProcess[str]":
    """Run the installed `dbprune` console script as a user would."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("dbprune") or str(Path(sys.executable).parent / "dbprune")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture()
def small_catalog(tmp_path: Path) -> Any:
    """A home whose catalog has two samples (the other views empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dbprune_assets.core.store import catalog
    from dbprune_assets.core.store.duck import arrow_schema
    from dbprune_assets.core.store.layout import Layout

    layout = Layout.from_env(tmp_path / "home", tmp_path / "pool")
    layout.table_dir("samples").mkdir(parents=True)
    rows = {"uid": ["a", "b"], "shard": ["00000"] * 2, "key": ["000000000", "000000001"], "row": [0, 1],
            "caption": ["x", "y"], "width": [8, 8], "height": [8, 8], "status": ["ok", "ok"]}
    pq.write_table(pa.table(rows).cast(arrow_schema("samples")), layout.table("samples", "00000"))
    catalog.refresh_catalog(layout)
    return layout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``daemon`` wait minutes on a real Dagster daemon (its backfill
    loop wakes every 30 s): skipped, with the reason, unless ``-m`` names them."""
    if "daemon" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="waits ~3 min on a real Dagster daemon: pytest -m daemon runs it")
    for item in items:
        if "daemon" in item.keywords:
            item.add_marker(skip)
