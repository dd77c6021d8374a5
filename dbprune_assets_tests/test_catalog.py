"""Catalog: typed empty views, glob views that see new partitions, lock retry."""

import threading
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

from dbprune_assets.core.store.atomic import write_parquet
from dbprune_assets.core.store.catalog import CATALOG_TABLES, CatalogBusy, query, refresh_catalog, with_retry
from dbprune_assets.core.store.duck import TABLES
from dbprune_assets.core.store.layout import Layout


@pytest.fixture()
def layout(tmp_path: Path) -> Layout:
    return Layout.from_env(tmp_path / "home", tmp_path / "pool")


def _samples(shard: str, n: int) -> pl.DataFrame:
    return pl.DataFrame({
        "uid": [f"{shard}-{i}" for i in range(n)], "shard": [shard] * n, "key": [f"{shard}{i:04d}" for i in range(n)],
        "row": list(range(n)), "caption": ["c"] * n, "width": [8] * n, "height": [8] * n, "status": ["ok"] * n,
    })


def test_empty_views_are_typed(layout: Layout):
    refresh_catalog(layout)
    for table in CATALOG_TABLES:
        t = query(layout, f'SELECT * FROM "{table}"')
        assert t.num_rows == 0
        assert t.column_names == list(TABLES[table])
    con = duckdb.connect(str(layout.catalog), read_only=True)
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name='centroids'").fetchall())
    con.close()
    assert types == {"cluster": "INTEGER", "vector": "FLOAT[]"}


def test_views_follow_partitions(layout: Layout):
    write_parquet(layout.table("samples", "00000"), _samples("00000", 3), layout.tmp)
    refresh_catalog(layout)
    assert query(layout, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 3}]
    # a new partition appears without touching the catalog (glob view)
    write_parquet(layout.table("samples", "00001"), _samples("00001", 4), layout.tmp)
    assert query(layout, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 7}]
    # re-materialising a partition replaces its rows, never duplicates them
    write_parquet(layout.table("samples", "00001"), _samples("00001", 2), layout.tmp)
    assert query(layout, "SELECT shard, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1").to_pylist() == [
        {"shard": "00000", "n": 3}, {"shard": "00001", "n": 2}]


def test_refresh_retries_while_locked(layout: Layout):
    refresh_catalog(layout)
    holder = duckdb.connect(str(layout.catalog))  # another process-like writer holding the file

    def release():
        time.sleep(0.5)
        holder.close()

    # within one process DuckDB shares the instance, so emulate the lock with with_retry directly
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise duckdb.IOException('Could not set lock on file "x": Conflicting lock is held')
        return "ok"

    t = threading.Thread(target=release)
    t.start()
    assert with_retry(flaky, timeout_s=5) == "ok" and calls["n"] == 3
    t.join()


def test_retry_gives_up_with_clear_error():
    def locked():
        raise duckdb.IOException("Could not set lock on file: Conflicting lock is held")

    with pytest.raises(CatalogBusy, match="locked by another process"):
        with_retry(locked, timeout_s=0.2, what="cat.duckdb")


def test_other_errors_are_not_retried():
    def broken():
        raise ValueError("syntax")

    with pytest.raises(ValueError, match="syntax"):
        with_retry(broken, timeout_s=5)


def test_cluster_kept_comes_from_dbp_decisions(layout: Layout):
    clusters = pl.DataFrame({"cluster": [0, 1], "size": [5, 3], "d_intra": [0.1, 0.2], "d_inter": [0.5, 0.4],
                             "complexity": [0.05, 0.08], "probability": [0.4, 0.6], "quota": [2, 2],
                             "lower_bound": [1, 1]})
    write_parquet(layout.table("clusters"), clusters, layout.tmp)
    refresh_catalog(layout)
    assert query(layout, "SELECT cluster, kept FROM clusters ORDER BY 1").to_pylist() == [
        {"cluster": 0, "kept": None}, {"cluster": 1, "kept": None}]
    quotas = pl.DataFrame({"strategy": ["dbp", "dbp", "ssp", "ssp"], "cluster": [0, 1, 0, 1],
                           "quota": [2, 2, 2, 2], "kept": [2, 1, 9, 9]})
    write_parquet(layout.table("quotas", "dbp"), quotas, layout.tmp)
    refresh_catalog(layout, ["quotas"])  # the clusters view reads the new quotas view
    assert query(layout, "SELECT cluster, quota, kept FROM clusters ORDER BY 1").to_pylist() == [
        {"cluster": 0, "quota": 2, "kept": 2}, {"cluster": 1, "quota": 2, "kept": 1}]


def test_refresh_recreates_only_the_named_views(layout: Layout):
    refresh_catalog(layout)
    write_parquet(layout.table("samples", "00000"), _samples("00000", 3), layout.tmp)
    write_parquet(layout.table("problems", "00000"),
                  pl.DataFrame({"shard": ["00000"], "key": ["k"], "stage": ["ingest"], "cause": ["c"]}), layout.tmp)
    refresh_catalog(layout, ["samples"])
    assert query(layout, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 3}]
    assert query(layout, "SELECT count(*) AS n FROM problems").to_pylist() == [{"n": 0}]  # still the empty view
    refresh_catalog(layout, ["problems"])
    assert query(layout, "SELECT count(*) AS n FROM problems").to_pylist() == [{"n": 1}]
    with pytest.raises(ValueError, match="no table 'nope'"):
        refresh_catalog(layout, ["nope"])


def test_a_new_catalog_gets_every_view(layout: Layout):
    refresh_catalog(layout, ["samples"])
    for table in CATALOG_TABLES:
        assert query(layout, f'SELECT count(*) AS n FROM "{table}"').to_pylist() == [{"n": 0}]


def test_distinct_count_is_count_distinct_by_hand() -> None:
    import duckdb

    from dbprune_assets.core.store.duck import distinct_count

    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('s0', 1, 'a'), ('s0', 1, 'a'), ('s0', 2, 'a'), "
                "('s1', 1, NULL), ('s1', 1, NULL), (NULL, NULL, 'b')) v(shard, row, key)")
    # (s0,1) (s0,2) (s1,1) (NULL,NULL): a pair of NULLs is a value of its own, as count(DISTINCT (shard, row)) has it
    assert distinct_count(con, "shard, row", "t") == 4 == con.execute(
        "SELECT count(DISTINCT (shard, row)) FROM t").fetchall()[0][0]
    # one column: NULL is not a value for count(DISTINCT key), so the caller leaves it out
    assert distinct_count(con, "key", "t WHERE key IS NOT NULL") == 2 == con.execute(
        "SELECT count(DISTINCT key) FROM t").fetchall()[0][0]
    assert distinct_count(con, "key", "t WHERE false") == 0
