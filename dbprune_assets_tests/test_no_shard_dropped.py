"""No shard dropped in silence: every parquet of a pool is a shard; a DataComp
shard whose npz is missing keeps its rows as no_embedding, one whose npz is
damaged fails alone, naming the file, and the healthy shards go on."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from dbprune_assets.core.settings import build_settings
from dbprune_assets.core.store.layout import list_pool_shards
from dbprune_assets.samplepool import write_datacomp_pool

from .conftest import run_cli


def _pool(path: Path, shards: int = 4) -> list[str]:
    small = build_settings({"pool": {"shards": shards, "samples_per_shard": 150, "concepts": 4}}, profile="sample").pool
    write_datacomp_pool(path, small)
    return list_pool_shards(path)


def test_every_parquet_is_a_shard_but_the_ground_truth(tmp_path: Path) -> None:
    shards = _pool(tmp_path / "pool", shards=2)
    (tmp_path / "pool" / f"{shards[0]}.npz").unlink()
    (tmp_path / "pool" / "0123abcd.parquet").write_bytes((tmp_path / "pool" / f"{shards[1]}.parquet").read_bytes())
    assert list_pool_shards(tmp_path / "pool") == sorted([*shards, "0123abcd"])
    assert (tmp_path / "pool" / "ground_truth.parquet").exists()


def test_a_missing_npz_keeps_its_rows_and_a_damaged_one_fails_its_shard_alone(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    missing, damaged, *healthy = _pool(pool)
    (pool / f"{missing}.npz").unlink()
    (pool / f"{damaged}.npz").write_bytes((pool / f"{damaged}.npz").read_bytes()[:3000])  # truncated
    home = tmp_path / "home"
    proc = run_cli("run", env={"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{pool / damaged}.npz cannot be read (BadZipFile" in proc.stdout
    assert "1 shard(s) are not in the results (each has one problems row" in proc.stdout
    samples = pl.read_parquet(home / "tables" / "samples" / "*.parquet")
    by_shard = {s: sorted(set(g["status"])) for (s,), g in samples.group_by("shard")}
    assert by_shard[missing] == ["no_embedding"] and damaged not in by_shard
    assert all("ok" in by_shard[s] for s in healthy)
    problems = pl.read_parquet(home / "tables" / "problems" / "*.parquet")
    lost = problems.filter(pl.col("shard") == missing)
    assert lost.height == 150 and lost["cause"].str.contains(f"{missing}.npz is missing").all()
    assert problems.filter(pl.col("shard") == damaged)["cause"].str.contains("cannot be read").all()
    decisions = pl.read_parquet(home / "tables" / "decisions" / "dbp.parquet")
    assert decisions.filter(pl.col("shard") == missing)["reason"].unique().to_list() == ["corrupt"]


def test_a_pool_path_that_is_a_file_or_an_empty_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "pool.txt").write_text("not a pool")
    (tmp_path / "empty").mkdir()
    for pool, words in ((tmp_path / "pool.txt", "is a file, not a folder"), (tmp_path / "empty", "holds no shard")):
        proc = run_cli("run", env={"DBPRUNE_HOME": str(tmp_path / "home"), "DBPRUNE_POOL": str(pool)}, timeout=300)
        assert proc.returncode == 2 and words in proc.stderr and "cluster" not in proc.stderr, proc.stderr


def test_a_pool_of_parquet_files_only_says_what_is_missing(tmp_path: Path) -> None:
    generated = tmp_path / "generated"
    stems = _pool(generated, shards=2)
    plain = tmp_path / "plain"  # the parquet files alone: neither tars nor npz
    plain.mkdir()
    for stem in stems:
        (plain / f"{stem}.parquet").write_bytes((generated / f"{stem}.parquet").read_bytes())
        (generated / f"{stem}.npz").unlink()  # the generated DataComp pool without its npz
    # DataComp parquet files read as img2dataset shards fail (their columns), each alone
    for pool, status, hint in ((plain, "failed", f"no shard could be read, e.g. {stems[0]}: "),
                               (generated, "no_embedding", "each <stem>.npz beside its parquet")):
        env = {"DBPRUNE_HOME": str(tmp_path / f"home-{pool.name}"), "DBPRUNE_POOL": str(pool)}
        proc = run_cli("run", env=env, timeout=600)
        assert proc.returncode == 1, proc.stdout[-2000:]
        counts = 2 if status == "failed" else 300
        assert f"has no usable sample: 2 shard(s), rows by status {{'{status}': {counts}}}" in proc.stdout, \
            proc.stdout[-3000:]
        assert hint in proc.stdout and "uniform sample" not in proc.stdout + proc.stderr
        assert "  models " not in proc.stdout  # no images, no models


def test_a_made_up_partition_fails_naming_the_shard(tmp_path: Path) -> None:
    import dagster as dg

    from dbprune_assets.definitions import ASSETS
    from dbprune_assets.defs.common import DbpruneResource

    pool = tmp_path / "pool"
    _pool(pool, shards=1)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["99999"])
    result = dg.materialize(ASSETS, selection=["raw_metadata"], partition_key="99999", instance=instance,
                            resources={"dbprune": DbpruneResource(home=str(tmp_path / "home"), pool=str(pool))},
                            raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"no such shard in the pool {pool}: 99999" in str(failure.event_specific_data.error)
    assert not (tmp_path / "home" / "tables" / "samples" / "99999.parquet").exists()


def test_malformed_uids_are_bad_uid_and_uids_compare_case_insensitively(tmp_path: Path) -> None:
    """31 hex digits or a non-hex uid: bad_uid at ingest, naming file, row and value; a uid
    that differs only in case, in the same shard or a later one, is duplicate_uid, so
    uids.npy holds every uid once."""
    import numpy as np

    pool = tmp_path / "pool"
    first, second = _pool(pool, shards=2)
    a = pl.read_parquet(pool / f"{first}.parquet")
    b = pl.read_parquet(pool / f"{second}.parquet")
    ua, ub = a["uid"].to_list(), b["uid"].to_list()
    short, nonhex = ua[1][:31], "zz" + ua[2][2:]
    ua[1], ua[2], ua[3] = short, nonhex, ua[0].upper()  # two malformed, one case twin in the shard
    ub[0] = ua[4].upper()  # a case twin of the first shard's row 4
    a.with_columns(pl.Series("uid", ua)).write_parquet(pool / f"{first}.parquet")
    b.with_columns(pl.Series("uid", ub)).write_parquet(pool / f"{second}.parquet")
    home = tmp_path / "home"
    proc = run_cli("run", "--select", "*pruned_subset", env={"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool)},
                   timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {(r["shard"], r["row"]): r["status"] for r in run_cli(
        "sql", "SELECT shard, row, status FROM samples ORDER BY ALL", "--format", "csv",
        env={"DBPRUNE_HOME": str(home)}).stdout.splitlines()[1:] for r in [dict(zip(("shard", "row", "status"),
                                                                                     r.split(",")))]}
    assert [status[(first, str(i))] for i in range(5)] == ["ok", "bad_uid", "bad_uid", "duplicate_uid", "ok"]
    assert status[(second, "0")] == "duplicate_uid"
    problems = pl.read_parquet(home / "tables" / "problems" / "*.parquet")
    assert problems.filter(pl.col("cause").str.contains(f"row 1 of {pool / first}.parquet has uid '{short}', "
                                                        "not 32 hex digits")).height == 1
    full = np.load(home / "subsets" / "full" / "uids.npy")
    assert len(np.unique(full)) == len(full) == sum(v == "ok" for v in status.values())
