"""Where everything lives: the contract paths of ``docs/design.md``.

Every file a run writes is under ``$DBPRUNE_HOME`` (default ``./data``); the
input pool is ``$DBPRUNE_POOL`` (default ``$DBPRUNE_HOME/pool``).  Nothing else in
the code base builds these paths by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: file name used for the single partition of an unpartitioned table
UNPARTITIONED = "all"


@dataclass(frozen=True)
class Layout:
    home: Path
    pool: Path

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None, pool: str | os.PathLike[str] | None = None) -> "Layout":
        home_p = Path(home or os.environ.get("DBPRUNE_HOME") or "data").expanduser().resolve()
        pool_env = pool or os.environ.get("DBPRUNE_POOL")
        pool_p = Path(pool_env).expanduser().resolve() if pool_env else home_p / "pool"
        return cls(home=home_p, pool=pool_p)

    # -- bookkeeping -------------------------------------------------------
    @property
    def tmp(self) -> Path:
        """This process's temp folder, ``.tmp/<host>-<pid>`` (see ``atomic.clean_stale_tmp``)."""
        from dbprune_assets.core.store.atomic import process_tmp_name

        return self.tmp_base / process_tmp_name()

    @property
    def tmp_base(self) -> Path:
        return self.home / ".tmp"

    def tmp_bases(self) -> list[Path]:
        """Every folder that may hold per-process temp folders: ``.tmp`` and the
        ``.tmp`` of a top-level folder on another volume (``atomic.same_volume_tmp``)."""
        extra = sorted(p for p in self.home.glob("*/.tmp") if p.is_dir()) if self.home.is_dir() else []
        return [self.tmp_base, *extra]

    @property
    def lock_file(self) -> Path:
        """The home's one-writer lock (``core/running/homelock.py``)."""
        return self.home / ".lock"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def catalog(self) -> Path:
        return self.home / "dbprune.duckdb"

    @property
    def config_file(self) -> Path:
        return self.home / "config.yaml"

    def state(self, asset: str, partition: str = UNPARTITIONED) -> Path:
        """Commit marker of one materialised partition (fingerprint + summary)."""
        return self.home / "state" / asset / f"{partition}.json"

    # -- tables ------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        return self.home / "tables" / table

    def table(self, table: str, partition: str = UNPARTITIONED) -> Path:
        return self.table_dir(table) / f"{partition}.parquet"

    # -- embeddings (clip-retrieval layout) --------------------------------
    def img_emb(self, shard: str) -> Path:
        return self.home / "embeddings" / "img_emb" / f"{shard}.npy"

    def text_emb(self, shard: str) -> Path:
        return self.home / "embeddings" / "text_emb" / f"{shard}.npy"

    def emb_metadata(self, shard: str) -> Path:
        return self.home / "embeddings" / "metadata" / f"{shard}.parquet"

    def staged_pairs(self, shard: str) -> Path:
        """A precomputed source's pairs of ``shard``, written by its ingest (which
        reads them anyway) for the ``embeddings`` step to move into place
        (``core/pool/sources/stored.py``)."""
        return self.home / "embeddings" / "staged" / shard

    # -- models, subsets, artefacts ---------------------------------------
    @property
    def encoder_dir(self) -> Path:
        return self.home / "models" / "encoder"

    def model_dir(self, strategy: str) -> Path:
        return self.home / "models" / strategy

    def subset_dir(self, strategy: str) -> Path:
        return self.home / "subsets" / strategy

    def artefact_dir(self, asset: str) -> Path:
        """Plots and other files shown in the UI, per asset."""
        return self.home / "artefacts" / asset

    # -- the pool ----------------------------------------------------------
    @property
    def eval_dir(self) -> Path:
        return self.pool / "eval"

    @property
    def reference_dir(self) -> Path:
        return self.pool / "reference"

    def shard_parquet(self, shard: str) -> Path:
        return self.pool / f"{shard}.parquet"

    def shard_tar(self, shard: str) -> Path:
        return self.pool / f"{shard}.tar"


#: parquet files at a pool's top level that are not shards: the generated pools' ground truth
NOT_SHARDS = frozenset({"ground_truth"})


def list_pool_shards(pool: Path) -> list[str]:
    """Shard names of a pool folder: every ``NAME.parquet`` at its top level
    but the generated pools' ``ground_truth.parquet`` (:data:`NOT_SHARDS`).

    The parquet is the shard's ledger (one row per attempted sample), so a
    shard whose data is missing is still a shard and no row vanishes: an
    img2dataset shard without its tar gets ``missing_in_tar`` rows, a DataComp
    metadata shard without its npz ``no_embedding`` rows.
    """
    if not pool.is_dir():
        return []
    return sorted(p.stem for p in pool.glob("*.parquet")
                  if p.is_file() and not p.name.startswith(".") and p.stem not in NOT_SHARDS)


def typical_shard_rows(pool: Path, shards: list[str], sample: int = 16) -> float | None:
    """The median row count of up to ``sample`` of the (sorted) ``shards``,
    evenly spread, read from their parquet footers (no data is read); None when
    none can be read.  What ``auto`` shard grouping sizes partitions by."""
    import pyarrow.parquet as pq

    from dbprune_assets.core.pool.shardgroups import spread_sample, typical_rows

    counts = []
    for shard in spread_sample(shards, sample):
        try:
            counts.append(pq.ParquetFile(pool / f"{shard}.parquet").metadata.num_rows)
        except Exception:  # a damaged shard is ingest's to report; it just does not count here
            continue
    return typical_rows(counts)
