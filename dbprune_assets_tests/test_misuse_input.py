"""Misused inputs (issue 10, part B): every uid once, typed parquet columns,
non-UTF-8 captions.

* a uid repeated inside a shard or across shards: the first occurrence in shard
  order keeps it, the others are ``duplicate_uid`` with a problem naming both
  locations, decided ``corrupt``; ``uids.npy`` lists each uid once, and the
  rule follows the pool when the earlier shard leaves;
* a parquet column of the wrong type fails its shard alone, with a message
  naming the file, the column, the expected and the found type; the other
  shards of the same run commit;
* a ``KEY.txt`` that is not UTF-8 is repaired, recorded, and exported as the
  catalog's caption.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbprune_assets.core.store.atomic import write_parquet
from dbprune_assets.core.store.duck import connect
from dbprune_assets.core.store.export import export_subset, verify_export
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.settings import build_settings
from dbprune_assets.core.pool.shards import CAPTION_NOT_UTF8, ShardError, ingest_shard
from dbprune_assets.core.store.state import read_state
from dbprune_assets.core.strategies import decide
from dbprune_assets.core.pool.uids import mark_cross_shard, samples_view
from dbprune_assets.core.pool.wds import write_tar
from dbprune_assets.defs.common import SHARDS, DbpruneResource
from dbprune_assets.definitions import ASSETS
from dbprune_assets.runner import RANGE_END_TAG, RANGE_START_TAG

from .conftest import TINY
from .test_shards import KEYS, _sample, _write_parquet


def _uid(i: int) -> str:
    return f"{i:032x}"


def _shard(pool: Path, shard: str, rows: list[dict[str, object]], samples: list | None = None, **kw: bool) -> None:
    """A shard whose tar holds a sample for every row's key (or ``samples``)."""
    write_tar(pool / f"{shard}.tar", samples if samples is not None else [_sample(str(r["key"])) for r in rows])
    _write_parquet(pool / f"{shard}.parquet", rows, **kw)


def _problems(result) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(result.problems.select("key", "cause").iter_rows())


# ---------------------------------------------------------------------------
# every uid once, inside a shard
# ---------------------------------------------------------------------------
def test_duplicate_uid_within_a_shard(tmp_path: Path) -> None:
    _shard(tmp_path, "00000", [
        {"key": KEYS[0], "uid": _uid(7)},
        {"key": KEYS[1], "uid": _uid(8)},
        {"key": KEYS[2], "uid": _uid(7)},  # later occurrence of uid 7: duplicate_uid
        {"key": KEYS[3], "uid": _uid(8), "status": "failed_to_download"},  # its own status wins
        {"key": KEYS[4], "uid": _uid(7), "caption": " "},  # an empty caption wins too
        {"key": KEYS[5], "uid": _uid(9)},
    ])
    r = ingest_shard(tmp_path, "00000")
    assert r.samples["status"].to_list() == ["ok", "ok", "duplicate_uid", "failed_download", "empty_caption", "ok"]
    assert r.samples.height == 6 and r.samples["row"].to_list() == list(range(6))  # every parquet row is one row
    counts = r.status_counts()
    assert (counts["ok"], counts["duplicate_uid"], counts["failed_download"], counts["empty_caption"]) == (3, 1, 1, 1)
    cause = _problems(r)[KEYS[2]]
    assert KEYS[0] in cause and "row 0" in cause and "first occurrence keeps the uid" in cause
    assert r.problems.height == 3  # duplicate, failed download, empty caption


# ---------------------------------------------------------------------------
# every uid once, across shards: pool_manifest's pass, decisions and export
# ---------------------------------------------------------------------------
def _ingest_all(pool: Path, layout: Layout, shards: list[str]) -> None:
    for shard in reversed(shards):  # ingest order does not matter
        r = ingest_shard(pool, shard)
        write_parquet(layout.table("samples", shard), r.samples, layout.tmp)
        write_parquet(layout.table("problems", shard), r.problems, layout.tmp)


def _effective(layout: Layout) -> dict[tuple[str, str], str]:
    with connect(layout.tmp / "q") as con:
        samples_view(con, "s", sorted(layout.table_dir("samples").glob("*.parquet")), layout.home / "tables")
        return {(sh, k): st for sh, k, st in con.execute("SELECT shard, key, status FROM s").fetchall()}


@pytest.fixture()
def three(tmp_path: Path) -> tuple[Path, Layout]:
    """00000: uids 1, 2; 00001: uid 1 again (cross-shard), uid 3 twice (within);
    00002: uid 2 again as a failed download, uid 4 with a latin-1 KEY.txt."""
    pool = tmp_path / "pool"
    pool.mkdir()
    _shard(pool, "00000", [{"key": "000000000", "uid": _uid(1)}, {"key": "000000001", "uid": _uid(2)}])
    _shard(pool, "00001", [{"key": "000010000", "uid": _uid(1)}, {"key": "000010001", "uid": _uid(3)},
                           {"key": "000010002", "uid": _uid(3)}])
    k4 = "000020001"
    _shard(pool, "00002", [{"key": "000020000", "uid": _uid(2), "status": "failed_to_download"}, {"key": k4, "uid": _uid(4)}],
           samples=[(k4, {**_sample(k4)[1], "txt": "caf\xe9 au lait".encode("latin-1")})], caption=False)
    return pool, Layout.from_env(tmp_path / "home", pool)


def test_duplicate_uids_across_shards_exact_accounting(three: tuple[Path, Layout]) -> None:
    pool, layout = three
    shards = ["00000", "00001", "00002"]
    _ingest_all(pool, layout, shards)
    cross = mark_cross_shard(layout, shards)
    assert cross.select("shard", "key", "row", "uid", "first_shard", "first_key").rows() == [
        ("00001", "000010000", 0, _uid(1), "00000", "000000000")]  # 00002's uid 2 row failed anyway
    pool_problems = pl.read_parquet(layout.table("problems"))
    assert pool_problems.select("shard", "key", "stage").rows() == [("00001", "000010000", "pool_manifest")]
    assert "000000000" in pool_problems["cause"][0] and "shard 00000" in pool_problems["cause"][0]

    status = _effective(layout)
    assert status == {
        ("00000", "000000000"): "ok", ("00000", "000000001"): "ok",
        ("00001", "000010000"): "duplicate_uid", ("00001", "000010001"): "ok", ("00001", "000010002"): "duplicate_uid",
        ("00002", "000020000"): "failed_download", ("00002", "000020001"): "ok",
    }
    tables = layout.home / "tables"
    summary = decide("full", tables, None, None, 0, layout.table("decisions", "full"), layout.tmp)
    assert summary.rows == 7 and summary.reasons == {"corrupt": 3, "duplicate": 0, "low_clip_score": 0, "pruned": 0,
                                                     "kept": 4}
    dec = pl.read_parquet(layout.table("decisions", "full"))
    assert dec.filter(pl.col("keep"))["uid"].sort().to_list() == [_uid(i) for i in (1, 2, 3, 4)]
    out = layout.subset_dir("full")
    exp = export_subset(layout.table("decisions", "full"), pool, out, 10, 0, layout.tmp)
    uids = np.load(out / "uids.npy")
    assert exp.n_samples == 4 and len(uids) == len(np.unique(uids)) == 4
    assert verify_export(out, layout.table("decisions", "full"), tmp_root=layout.tmp) == []

    # the earlier shard leaves the pool: the later occurrence is a sample of its own again
    (layout.table("samples", "00000")).unlink()
    assert mark_cross_shard(layout, ["00001", "00002"]).height == 0
    assert not layout.table("duplicate_uids").exists() and not layout.table("problems").exists()
    assert _effective(layout)[("00001", "000010000")] == "ok"


def test_latin1_caption_is_repaired_and_exported_as_in_the_catalog(three: tuple[Path, Layout]) -> None:
    pool, layout = three
    _ingest_all(pool, layout, ["00002"])
    r = ingest_shard(pool, "00002")
    caption = r.samples.filter(pl.col("key") == "000020001")["caption"][0]
    assert caption == "caf\ufffd au lait" and r.samples["status"].to_list() == ["failed_download", "ok"]
    cause = _problems(r)["000020001"]
    assert cause.startswith(f"{CAPTION_NOT_UTF8}:") and "0xe9" in cause
    decide("full", layout.home / "tables", None, None, 0, layout.table("decisions", "full"), layout.tmp)
    out = layout.subset_dir("full")
    export_subset(layout.table("decisions", "full"), pool, out, 10, 0, layout.tmp)
    with tarfile.open(out / "00000.tar") as tf:
        text = tf.extractfile("000020001.txt").read()  # type: ignore[union-attr]
        jpg = tf.extractfile("000020001.jpg").read()  # type: ignore[union-attr]
    assert text.decode("utf-8") == caption  # the catalog and the export agree
    assert jpg == _sample("000020001")[1]["jpg"]  # other members keep their bytes


def test_caption_column_wins_and_export_writes_it(tmp_path: Path) -> None:
    k = KEYS[0]
    _shard(tmp_path, "00000", [{"key": k, "caption": "café au lait"}],
           samples=[(k, {**_sample(k)[1], "txt": "caf\xe9 au lait".encode("latin-1")})])
    r = ingest_shard(tmp_path, "00000")
    assert r.samples["caption"].to_list() == ["café au lait"] and r.samples["status"].to_list() == ["ok"]
    assert _problems(r)[k].startswith(CAPTION_NOT_UTF8)


# ---------------------------------------------------------------------------
# typed columns
# ---------------------------------------------------------------------------
def _retyped(path: Path, column: str, values: pa.Array) -> None:
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, values), path)


@pytest.mark.parametrize(("column", "values", "found", "expected"), [
    ("key", pa.array(range(6), pa.int64()), "int64", "string"),
    ("width", pa.array(["20"] * 6), "string", "integer"),
    ("caption", pa.array([1.5] * 6), "double", "string"),
    ("uid", pa.array(range(6), pa.int32()), "int32", "string (32 hex"),
])
def test_wrong_column_type_names_file_column_and_types(tmp_path: Path, column: str, values: pa.Array, found: str,
                                                       expected: str) -> None:
    _shard(tmp_path, "00000", [{"key": k} for k in KEYS])
    _retyped(tmp_path / "00000.parquet", column, values)
    with pytest.raises(ShardError) as err:
        ingest_shard(tmp_path, "00000")
    msg = str(err.value)
    assert str(tmp_path / "00000.parquet") in msg and f"column {column!r}" in msg
    assert f"has type {found}" in msg and f"expected {expected}" in msg and "remove the shard" in msg


def test_keys_without_zero_padding_or_bad_uids_fail_the_shard(tmp_path: Path) -> None:
    _shard(tmp_path, "00000", [{"key": k} for k in KEYS])
    _retyped(tmp_path / "00000.parquet", "key", pa.array([str(int(k)) for k in KEYS]))
    with pytest.raises(ShardError, match=r"key '0' of shard 00000 is '000000000' in its tar.*not zero-padded"):
        ingest_shard(tmp_path, "00000")
    _retyped(tmp_path / "00000.parquet", "key", pa.array(["12"] + KEYS[1:]))
    with pytest.raises(ShardError, match=r"keys of different widths \('12', '000000001'\)"):
        ingest_shard(tmp_path, "00000")
    _retyped(tmp_path / "00000.parquet", "key", pa.array(KEYS))
    _retyped(tmp_path / "00000.parquet", "uid", pa.array(["not-a-uid"] + [_uid(i) for i in range(1, 6)]))
    with pytest.raises(ShardError, match=r"uid 'not-a-uid' is not 32 hex digits"):
        ingest_shard(tmp_path, "00000")


def test_a_bad_shard_fails_alone_and_the_others_commit(tmp_path: Path) -> None:
    """raw_metadata over three shards, the middle one with an integer key column:
    the others commit their rows; the bad one has no samples rows and one
    problems row naming the column, and pool_manifest lists it as failed."""
    layout = Layout.from_env(tmp_path / "home", tmp_path / "pool")
    layout.pool.mkdir(parents=True)
    layout.home.mkdir(parents=True)
    layout.config_file.write_text(build_settings(TINY).to_yaml())
    shards = ["00000", "00001", "00002"]
    for i, shard in enumerate(shards):
        _shard(layout.pool, shard, [{"key": f"0000{i}000{j}", "uid": _uid(10 * i + j)} for j in range(3)])
    _retyped(layout.pool / "00001.parquet", "key", pa.array([10000, 10001, 10002], pa.int64()))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARDS, shards)
    resources = {"dbprune": DbpruneResource(home=str(layout.home), pool=str(layout.pool))}
    result = dg.materialize(ASSETS, selection=["raw_metadata"], instance=instance, resources=resources,
                            tags={RANGE_START_TAG: shards[0], RANGE_END_TAG: shards[-1]})
    assert result.success
    own = {e.partition: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert own["00000"]["ok"].value == 3 and own["00002"]["by_status"].value == {"ok": 3}
    assert own["00001"]["ok"].value == 0 and "column 'key'" in own["00001"]["failed"].value  # each its own numbers
    for shard in ("00000", "00002"):
        assert pl.read_parquet(layout.table("samples", shard))["status"].to_list() == ["ok"] * 3
        assert read_state(layout, "raw_metadata", shard).summary["rows"] == 3  # type: ignore[union-attr]
    assert pl.read_parquet(layout.table("samples", "00001")).height == 0
    [(key, stage, cause)] = pl.read_parquet(layout.table("problems", "00001")).select("key", "stage", "cause").rows()
    assert key is None and stage == "ingest"
    assert "00001.parquet" in cause and "column 'key'" in cause and "int64" in cause and "expected string" in cause
    assert "missing_in_tar" not in json.dumps(read_state(layout, "raw_metadata", "00001").summary)  # type: ignore[union-attr]
    result = dg.materialize(ASSETS, selection=["pool_manifest"], instance=instance, resources=resources)
    assert result.success
    manifest = read_state(layout, "pool_manifest", "all")
    assert manifest is not None and manifest.summary["failed_shards"] == ["00001"]
    assert manifest.summary["status"] == {"ok": 6}


# ---------------------------------------------------------------------------
# the whole graph: dbprune run on a misused sample pool
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_dbprune_run_on_a_misused_pool(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A uid repeated across shards (00000 → 00001) and inside 00002, a latin-1
    KEY.txt in 00002 and an integer key column in 00003: ``dbprune run`` ends
    with every uid decided once, the bad shard failed alone, and the exported
    caption equal to the catalog's."""
    from dbprune_assets.core.store.catalog import query
    from dbprune_assets.core.settings import STRATEGIES

    from . import faultkit as fk
    from .conftest import run_cli

    work = fk.fast_tmp(tmp_path_factory, "misuse")
    try:
        pool = fk.write_pool(work / "pool", shards=4, samples_per_shard=40)
        truth = pl.read_parquet(pool / "ground_truth.parquet").filter(pl.col("planted_status") == "ok")
        ok = {sh: truth.filter(pl.col("shard") == sh)["key"].sort().to_list() for sh in ("00000", "00001", "00002")}
        first_uid = truth.filter(pl.col("key") == ok["00000"][0])["uid"][0]
        within_uid = truth.filter(pl.col("key") == ok["00002"][0])["uid"][0]
        for shard, key, uid in (("00001", ok["00001"][0], first_uid), ("00002", ok["00002"][1], within_uid)):
            df = pl.read_parquet(pool / f"{shard}.parquet")
            df.with_columns(pl.when(pl.col("key") == key).then(pl.lit(uid)).otherwise(pl.col("uid")).alias("uid")
                            ).write_parquet(pool / f"{shard}.parquet")
        latin = ok["00002"][2]
        samples = [(k, {**m, "txt": "caf\xe9".encode("latin-1")} if k == latin else m)
                   for k, m in fk.read_tar(pool / "00002.tar")]
        fk.write_tar(pool / "00002.tar", samples)
        _retyped(pool / "00003.parquet", "key", pa.array(
            [int(k) for k in pq.read_table(pool / "00003.parquet")["key"].to_pylist()], pa.int64()))
        home = work / "home"
        config = fk.config_with_encoder(work / "tiny.yaml", fk.shared_encoder(tmp_path_factory))
        r = run_cli("run", "--config", str(config), "--select", "*pruned_subset", env=fk.env_for(home, pool))
        assert r.returncode == 0, r.stdout + r.stderr
        summary = r.stdout[r.stdout.index("\ndone in"):]
        assert "1 shard(s) are not in the results" in summary and "  00003: " in summary
        assert "column 'key'" in summary.split("  00003: ")[1].splitlines()[0]
        layout = Layout.from_env(home, pool)

        def rows(sql: str) -> list[tuple]:
            return [tuple(d.values()) for d in query(layout, sql).to_pylist()]

        assert rows("SELECT shard, key, status FROM samples WHERE status = 'duplicate_uid' ORDER BY 1") == [
            ("00001", ok["00001"][0], "duplicate_uid"), ("00002", ok["00002"][1], "duplicate_uid")]
        assert rows("SELECT count(*) FROM samples WHERE shard = '00003'") == [(0,)]
        assert rows("SELECT stage, count(*) FROM problems WHERE shard = '00003' GROUP BY 1") == [("ingest", 1)]
        assert rows("SELECT count(*) FROM problems WHERE cause LIKE 'caption_not_utf8%'") == [(1,)]
        n = rows("SELECT count(*) FROM samples")[0][0]
        for strategy in STRATEGIES:
            of = f"FROM decisions WHERE strategy = '{strategy}'"
            assert rows(f"SELECT count(*) {of}") == [(n,)]
            assert rows(f"SELECT reason {of} AND shard = '00001' AND uid = '{first_uid}'") == [("corrupt",)]
            assert rows(f"SELECT count(*) FILTER (WHERE reason = 'corrupt'), count(*) {of} AND uid = '{within_uid}'"
                        ) == [(1, 2)]  # the first row decided as any sample, the later one corrupt
            assert rows(f"SELECT count(*) FILTER (WHERE keep) <= 1 {of} AND uid = '{first_uid}'") == [(True,)]
            uids = np.load(layout.subset_dir(strategy) / "uids.npy")
            assert len(uids) == len(np.unique(uids))
        caption = rows(f"SELECT caption FROM samples WHERE key = '{latin}'")[0][0]
        exported = {k: m for tar in sorted(layout.subset_dir("full").glob("*.tar")) for k, m in fk.read_tar(tar)}
        assert exported[latin]["txt"].decode("utf-8") == caption
    finally:
        fk.drop_fast_tmp(work)


@pytest.mark.slow
def test_selecting_embeddings_before_any_ingest_names_the_step_to_run_first(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``dbprune run --select embeddings`` on a home that never ingested: one
    line naming the shards and what to run, not a FileNotFoundError."""
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.runner import run_pipeline
    from dbprune_assets.samplepool import write_datacomp_pool

    pool, home = tmp_path / "pool", tmp_path / "home"
    write_datacomp_pool(pool, PoolSettings(shards=2, samples_per_shard=40, concepts=4, seed=0), models=("b32",))
    layout = Layout(home, pool)
    for name, value in (("DBPRUNE_HOME", home), ("DBPRUNE_POOL", pool), ("DAGSTER_HOME", home / "dagster")):
        monkeypatch.setenv(name, str(value))
    settings = build_settings({"embeddings": {"source": "datacomp", "model": "b32"}}, profile="sample")
    home.mkdir()
    layout.config_file.write_text(settings.to_yaml())
    report = run_pipeline(layout, settings, select="embeddings", echo=lambda m: None, log_level="ERROR")
    assert not report.ok
    assert "2 shard(s) not ingested yet" in report.failure and "--select '*embeddings'" in report.failure, \
        report.failure
    assert "FileNotFoundError" not in report.failure
