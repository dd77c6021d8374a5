"""Helpers shared by the fault, crash and pool-change tests: a small encoder
trained once per test session, pools generated and damaged in temp folders,
and digests of the decisions table.

Nothing here is a test; ``test_faults.py`` and ``test_pool_changes.py`` use it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from dbprune_assets.core.settings import build_settings

from .conftest import TINY, deep_merge

#: the encoder every fault test embeds with (trained once per session, then a local-dir: model)
_ENCODER_DIRNAME = "dbprune-shared-encoder"


def pool_settings(**over: Any):
    """The TINY pool settings with overrides (shards, samples_per_shard, ...)."""
    return build_settings(deep_merge(TINY, {"pool": over})).pool


def write_pool(path: Path, **over: Any) -> Path:
    """A sample pool in ``path`` (TINY settings with ``over``)."""
    from dbprune_assets.samplepool import write_sample_pool

    write_sample_pool(path, pool_settings(**over), tmp_root=path.parent / ".pool-tmp")
    return path


def shared_encoder(tmp_path_factory) -> Path:
    """An open_clip ``local-dir:`` folder with the bootstrap encoder trained on a
    tiny pool's reference split, trained once per pytest session (the same
    training the ``encoder`` asset does, so each test spends no time on it)."""
    out = tmp_path_factory.getbasetemp() / _ENCODER_DIRNAME
    if (out / "open_clip_config.json").is_file():
        return out
    from dbprune_assets.core.models.bootstrap import train_bootstrap

    work = tmp_path_factory.mktemp("encoder-training")
    pool = write_pool(work / "pool")
    settings = build_settings(TINY)
    sizes = json.loads((pool / "reference" / "sizes.json").read_text())
    shards = [pool / "reference" / name for name in sorted(sizes)]
    train_bootstrap(shards, int(sum(sizes.values())), out, settings.encoder.bootstrap, "cpu",
                    logs_dir=work / "logs", tmp_root=work / ".tmp", threads=1)
    return out


def config_with_encoder(path: Path, encoder_dir: Path, *, default_processes: bool = False, **overrides: Any) -> Path:
    """A TINY settings file whose cluster encoder is the local folder
    ``encoder_dir``; with ``default_processes``, the decode workers and
    threads are left at what a user gets (TINY runs everything in one process)."""
    import yaml

    over = deep_merge({"encoder": {"cluster_encoder": {"model": f"local-dir:{encoder_dir}"}}}, overrides)
    settings = deep_merge(TINY, over)
    if default_processes:
        settings = without_process_counts(settings)
    path.write_text(yaml.safe_dump(settings))
    return path


def without_process_counts(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without any ``workers`` or ``threads`` key, at any depth:
    the process and thread counts a user who sets none of them gets."""
    return {k: without_process_counts(v) if isinstance(v, dict) else v
            for k, v in settings.items() if k not in ("workers", "threads")}


# ---------------------------------------------------------------------------
# damaging a pool
# ---------------------------------------------------------------------------
def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = data
    return out


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    from dbprune_assets.core.pool.wds import write_tar as _write

    _write(path, samples)


def truncate_tar(path: Path, at_sample: int) -> list[str]:
    """Cut ``path`` 10 bytes into the image of its ``at_sample``-th sample (tar order);
    returns the keys that are cut off (that sample and every later one)."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    keys: list[str] = []
    for m in members:
        k = m.name.partition(".")[0]
        if not keys or keys[-1] != k:
            keys.append(k)
    victim = keys[at_sample]
    first = next(m for m in members if m.name.partition(".")[0] == victim)
    with open(path, "r+b") as f:
        f.truncate(first.offset_data + 10)
    return keys[at_sample:]


@dataclass
class Damage:
    """What was done to the pool: the oracle of the accounting tests."""

    rows: dict[str, pl.DataFrame] = field(default_factory=dict)  # shard -> parquet rows (key, status, uid)
    expected_status: dict[tuple[str, str], str] = field(default_factory=dict)  # (shard, key) -> status
    problem_keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (shard, key) -> a word of the cause
    shard_problems: dict[str, str] = field(default_factory=dict)  # shard -> a word of the shard-level cause

    def status_counts(self, shard: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for (sh, _), st in self.expected_status.items():
            if shard is None or sh == shard:
                out[st] = out.get(st, 0) + 1
        return out


def damage_pool(pool: Path) -> Damage:
    """Damage a 5-shard sample pool in place, one kind of damage per shard.

    - 00000: tar truncated in the middle of its 20th sample;
    - 00001: tar missing;
    - 00002: zero samples (empty parquet, empty tar);
    - 00003: per-sample damage: an empty caption, a missing (null) caption, two
      undecodable images, a row whose key has no member in the tar, a row whose
      key has only txt/json (no image), and a tar member with no parquet row;
    - 00004: intact.

    Statuses of untouched rows are the pool's planted ones (``ground_truth``).
    """
    truth = pl.read_parquet(pool / "ground_truth.parquet")
    planted = {(r["shard"], r["key"]): r["planted_status"] for r in truth.iter_rows(named=True)}
    dmg = Damage()

    def ok_keys(shard: str) -> list[str]:
        return [k for (sh, k), st in sorted(planted.items()) if sh == shard and st == "ok"]

    # 00000: truncated tar
    cut = set(truncate_tar(pool / "00000.tar", 20))
    # 00001: missing tar
    (pool / "00001.tar").unlink()
    # 00002: zero samples
    table = pq.read_table(pool / "00002.parquet")
    pq.write_table(table.slice(0, 0), pool / "00002.parquet")
    write_tar(pool / "00002.tar", [])
    # 00003: per-sample damage
    ok3 = ok_keys("00003")
    empty_cap, null_cap, garbage, cut_jpeg, no_member, no_image = ok3[1], ok3[3], ok3[5], ok3[7], ok3[9], ok3[11]
    df = pl.read_parquet(pool / "00003.parquet")
    df = df.with_columns(
        pl.when(pl.col("key") == empty_cap).then(pl.lit("  ")).when(pl.col("key") == null_cap).then(None)
        .otherwise(pl.col("caption")).alias("caption")
    )
    df.write_parquet(pool / "00003.parquet")
    samples = read_tar(pool / "00003.tar")
    out = []
    for key, members in samples:
        if key == no_member:
            continue
        members = dict(members)
        if key == empty_cap:
            members["txt"] = b"  "
        if key == null_cap:
            members.pop("txt")
        if key == garbage:
            members["jpg"] = b"this is not a jpeg"
        if key == cut_jpeg:
            members["jpg"] = members["jpg"][: len(members["jpg"]) // 3]
        if key == no_image:
            members.pop("jpg")
        out.append((key, members))
    out.append(("000039999", {"jpg": samples[0][1]["jpg"], "txt": b"an orphan", "json": b"{}"}))
    write_tar(pool / "00003.tar", out)

    for shard in ("00000", "00001", "00002", "00003", "00004"):
        rows = pl.read_parquet(pool / f"{shard}.parquet", columns=["uid", "key", "status"])
        dmg.rows[shard] = rows
        for key in rows["key"].to_list():
            st = planted[(shard, key)]
            if st != "failed_download":
                if shard == "00000" and key in cut:
                    st = "truncated_tar"
                elif shard == "00001":
                    st = "missing_in_tar"
                elif shard == "00003" and key in (empty_cap, null_cap):
                    st = "empty_caption"
                elif shard == "00003" and key in (garbage, cut_jpeg):
                    st = "undecodable"
                elif shard == "00003" and key in (no_member, no_image):
                    st = "missing_in_tar"
            dmg.expected_status[(shard, key)] = st
            if st in ("failed_download", "undecodable", "empty_caption") or (st == "missing_in_tar" and shard != "00001"):
                dmg.problem_keys[(shard, key)] = {"failed_download": "download", "undecodable": "decode",
                                                 "empty_caption": "caption", "missing_in_tar": "no image"}[st]
    dmg.problem_keys[("00003", empty_cap)] = "caption of"
    dmg.problem_keys[("00003", null_cap)] = "is missing"
    dmg.problem_keys[("00003", "000039999")] = "has no parquet row"
    dmg.shard_problems = {"00000": "truncated", "00001": "is missing"}
    return dmg


# ---------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------
def decisions_digest(home: Path) -> tuple[str, int]:
    """sha256 over sorted (strategy, shard, uid, keep, reason) of every decisions file, and the row count."""
    files = sorted((home / "tables" / "decisions").glob("*.parquet"))
    frame = pl.concat([pl.read_parquet(f, columns=["strategy", "shard", "uid", "keep", "reason"]) for f in files])
    frame = frame.sort(["strategy", "shard", "uid"])
    h = hashlib.sha256()
    for row in frame.iter_rows():
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest(), frame.height


def tmp_leftovers(home: Path) -> list[str]:
    """Entries under $DBPRUNE_HOME/.tmp (relative paths of files)."""
    root = home / ".tmp"
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def copy_pool(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def env_for(home: Path, pool: Path, **extra: str) -> dict[str, str]:
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool)}
    env.update(extra)
    env.pop("DAGSTER_HOME", None)
    return env



# ---------------------------------------------------------------------------
# where the tests write
# ---------------------------------------------------------------------------
def fast_tmp(tmp_path_factory, name: str) -> Path:
    """A scratch folder for a test module's homes and pools: on tmpfs (/dev/shm)
    when it has room, else pytest's tmp_path.  Dagster's SQLite instance
    syncs every event to disk; on a plain disk that, not the method, is most of
    the run time of a 100-shard pool.  A SIGKILL does not care: what the killed
    process wrote is in the page cache either way."""
    import os
    import tempfile

    shm = Path("/dev/shm")
    try:
        roomy = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > (2 << 30)
    except OSError:
        roomy = False
    if roomy:
        return Path(tempfile.mkdtemp(prefix=f"dbprune-{name}-", dir=shm))
    return tmp_path_factory.mktemp(name)


def drop_fast_tmp(path: Path) -> None:
    if str(path).startswith("/dev/shm/"):
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# Dagster's view
# ---------------------------------------------------------------------------
def stale_status(instance, defs, asset: str, partition: str | None = None) -> str:
    """Dagster's own staleness of an asset (partition), as the UI shows it: FRESH, STALE or MISSING."""
    import dagster as dg
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(dg.AssetKey(asset), partition).value


def runs_in_db(home: Path) -> int:
    """Dagster runs recorded in a home's SQLite instance (0 when there is none)."""
    import sqlite3

    db = home / "dagster" / "history" / "runs.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])
    finally:
        con.close()


def narrow_encoder(src: Path, dst: Path, dim: int) -> None:
    """Write at ``dst`` (replacing it) the encoder of ``src`` with its embeddings
    cut to the first ``dim`` dimensions: a working encoder of another embed dim."""
    from safetensors.torch import load_file, save_file

    tmp = dst.with_name(dst.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    weights = tmp / "open_clip_model.safetensors"
    sd = load_file(weights)
    for key in ("text_projection", "visual.proj"):
        sd[key] = sd[key][:, :dim].contiguous()
    save_file(sd, weights)
    cfg = json.loads((tmp / "open_clip_config.json").read_text())
    cfg["model_cfg"]["embed_dim"] = dim
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def tick_pool_sensor(instance) -> list:
    """One tick of ``pool_shards_sensor``, applied as the daemon does: the
    partition requests first, then each requested run, in process; the requests."""
    import dagster as dg

    from dbprune_assets.definitions import defs
    from dbprune_assets.defs.common import DbpruneResource
    from dbprune_assets.defs.ingest import pool_shards_sensor

    ctx = dg.build_sensor_context(instance=instance, resources={"dbprune": DbpruneResource()}, definitions=defs)
    result = pool_shards_sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        if isinstance(req, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        else:
            for key in req.partition_keys:
                instance.delete_dynamic_partition(req.partitions_def_name, key)
    job = defs.resolve_implicit_global_asset_job_def()
    for req in result.run_requests or []:
        out = job.execute_in_process(instance=instance, asset_selection=list(req.asset_selection or []),
                                     partition_key=req.partition_key, tags=req.tags, raise_on_error=False)
        assert out.success, req
    return list(result.run_requests or [])
