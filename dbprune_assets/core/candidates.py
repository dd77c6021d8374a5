"""Candidates = samples that survive SemDeDup *and* the CLIP-score filter.

Out of core with DuckDB: the dedup survivors' scores are an anti-join of the
per-shard score files with the duplicates table; the threshold comes from
:func:`clip_filter.clip_threshold`; the survivors above it are written back
per shard (``tables/candidates/<shard>.parquet``: uid, shard, row (the
sample's parquet row), emb_row (its row in the embedding arrays), clip_score,
in row order) with one partitioned COPY, so memory is DuckDB's buffer pool,
not the pool.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path, scratch_dir
from .clip_filter import clip_threshold


@dataclass(frozen=True)
class CandidateSummary:
    ok: int
    duplicates: int
    survivors: int
    threshold: float
    candidates: int
    per_shard: dict[str, int]


def _q(p: str | os.PathLike[str]) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def select_candidates(metadata_files: dict[str, Path], duplicates_files: list[Path], out_dir: Path, tmp_root: Path,
                      threshold: float | None, fraction: float | None, memory_limit: str = "1GB",
                      threads: int = 0) -> CandidateSummary:
    """Write ``out_dir/<shard>.parquet`` for every shard of ``metadata_files``.

    ``metadata_files``: shard -> embeddings metadata parquet (uid, shard, row,
    clip_score); ``duplicates_files``: parquet files with a ``uid`` column.
    Every shard gets a file, empty when nothing of it survives; each file is
    renamed into place atomically.
    """
    import duckdb

    with scratch_dir(tmp_root, "candidates-") as work:
        con = duckdb.connect()
        try:
            con.execute(f"SET memory_limit = {_q(memory_limit)}")
            con.execute(f"SET temp_directory = {_q(Path(work) / 'spill')}")
            con.execute("SET preserve_insertion_order = false")
            if threads:
                con.execute(f"SET threads = {int(threads)}")
            metas = ", ".join(_q(p) for p in metadata_files.values())
            # row: the sample's parquet row; emb_row: its row in the shard's .npy files
            # (clip-retrieval layout: metadata rows are aligned with the arrays)
            con.execute(f"CREATE VIEW meta AS SELECT uid, shard, CAST(row AS INTEGER) AS row, "
                        f"CAST(file_row_number AS INTEGER) AS emb_row, CAST(clip_score AS FLOAT) AS clip_score "
                        f"FROM read_parquet([{metas}], file_row_number = true)")
            if duplicates_files:
                dups = ", ".join(_q(p) for p in duplicates_files)
                con.execute(f"CREATE VIEW dups AS SELECT DISTINCT uid FROM read_parquet([{dups}])")
            else:
                con.execute("CREATE VIEW dups AS SELECT CAST(NULL AS VARCHAR) AS uid WHERE false")
            con.execute("CREATE VIEW survivors AS SELECT m.* FROM meta m ANTI JOIN dups d USING (uid)")
            ok = int(con.execute("SELECT count(*) FROM meta").fetchone()[0])
            n_dups = int(con.execute("SELECT count(*) FROM meta SEMI JOIN dups USING (uid)").fetchone()[0])
            if threshold is None:
                scores = con.execute("SELECT clip_score FROM survivors").fetchnumpy()["clip_score"]
                thr = clip_threshold([np.asarray(scores, dtype=np.float32)], None, fraction)
            else:
                thr = clip_threshold([], threshold, None)
            part_dir = Path(work) / "parts"
            con.execute(
                f"COPY (SELECT uid, shard, row, emb_row, clip_score FROM survivors WHERE CAST(clip_score AS DOUBLE) >= ? "
                f"ORDER BY shard, row) TO {_q(part_dir)} (FORMAT parquet, PARTITION_BY (shard), "
                f"WRITE_PARTITION_COLUMNS true, FILENAME_PATTERN 'part{{i}}')",
                [thr if np.isfinite(thr) else 1e30],
            )
            per_shard = dict(con.execute(
                "SELECT shard, count(*) FROM survivors WHERE CAST(clip_score AS DOUBLE) >= ? GROUP BY 1",
                [thr if np.isfinite(thr) else 1e30]).fetchall())
            survivors = ok - n_dups
            empty_sql = ("SELECT CAST(NULL AS VARCHAR) AS uid, CAST(NULL AS VARCHAR) AS shard, "
                         "CAST(NULL AS INTEGER) AS row, CAST(NULL AS INTEGER) AS emb_row, "
                         "CAST(NULL AS FLOAT) AS clip_score WHERE false")
            out_dir.mkdir(parents=True, exist_ok=True)
            for shard in metadata_files:
                target = out_dir / f"{shard}.parquet"
                parts = sorted((part_dir / f"shard={shard}").glob("*.parquet"))
                with atomic_path(target, tmp_root) as tmp:
                    if len(parts) == 1:  # the usual case: DuckDB wrote one ordered file
                        shutil.move(str(parts[0]), tmp)
                    elif parts:  # several writer threads: merge, in row order
                        files = ", ".join(_q(p) for p in parts)
                        con.execute(f"COPY (SELECT * FROM read_parquet([{files}]) ORDER BY row) TO {_q(tmp)} "
                                    "(FORMAT parquet)")
                    else:
                        con.execute(f"COPY ({empty_sql}) TO {_q(tmp)} (FORMAT parquet)")
        finally:
            con.close()
    return CandidateSummary(ok, n_dups, survivors, float(thr), int(sum(per_shard.values())),
                            {k: int(per_shard.get(k, 0)) for k in metadata_files})
