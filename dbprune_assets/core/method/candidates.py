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

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dbprune_assets.core.store.atomic import atomic_path, scratch_dir
from dbprune_assets.core.method.clip_filter import clip_threshold
from dbprune_assets.core.store.duck import connect, create_view, empty_frame, parquet_source, view_sql
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.pool.uids import usable_view


@dataclass(frozen=True)
class CandidateSummary:
    ok: int
    duplicates: int
    survivors: int
    threshold: float
    candidates: int
    per_shard: dict[str, int]


def select_candidates(metadata_files: dict[str, Path], duplicates_files: list[Path], out_dir: Path, tmp_root: Path,
                      threshold: float | None, fraction: float | None, memory_limit: str = "1GB",
                      threads: int = 0) -> CandidateSummary:
    """Write ``out_dir/<shard>.parquet`` for every shard of ``metadata_files``.

    ``metadata_files``: shard -> embeddings metadata parquet (uid, shard, row,
    clip_score); ``duplicates_files``: parquet files with a ``uid`` column.
    Every shard gets a file, empty when nothing of it survives; each file is
    renamed into place atomically.
    """
    with scratch_dir(tmp_root, "candidates-") as work:
        con = connect(Path(work), memory_limit, threads, ordered=False)
        try:
            # the metadata rows as candidates rows: row is the sample's parquet row, emb_row
            # its row in the shard's .npy files (clip-retrieval layout: rows aligned with the arrays)
            con.execute(view_sql("embedded", "candidates", parquet_source(list(metadata_files.values()), file_row_number=True),
                                 derived={"emb_row": "t.file_row_number"}))
            usable_view(con, "meta", "embedded", out_dir.parent)  # a uid an earlier shard has is not a sample
            create_view(con, "dup_rows", duplicates_files, "duplicates", columns=("uid",))
            con.execute("CREATE VIEW dups AS SELECT DISTINCT uid FROM dup_rows")
            con.execute("CREATE VIEW survivors AS SELECT m.* FROM meta m ANTI JOIN dups d USING (uid)")
            ok = int(con.execute("SELECT count(*) FROM meta").fetchone()[0])
            n_dups = int(con.execute("SELECT count(*) FROM meta SEMI JOIN dups USING (uid)").fetchone()[0])
            if threshold is None:
                scores = con.execute("SELECT clip_score FROM survivors").fetchnumpy()["clip_score"]
                thr = clip_threshold([np.asarray(scores, dtype=np.float32)], None, fraction)
            else:
                thr = clip_threshold([], threshold, None)
            passes = thr if np.isfinite(thr) else 1e30
            part_dir = Path(work) / "parts"
            con.execute(
                "COPY (SELECT * FROM survivors WHERE CAST(clip_score AS DOUBLE) >= ? ORDER BY shard, row) TO ? "
                "(FORMAT parquet, PARTITION_BY (shard), WRITE_PARTITION_COLUMNS true, FILENAME_PATTERN 'part{i}')",
                [passes, str(part_dir)],
            )
            per_shard = dict(con.execute(
                "SELECT shard, count(*) FROM survivors WHERE CAST(clip_score AS DOUBLE) >= ? GROUP BY 1",
                [passes]).fetchall())
            out_dir.mkdir(parents=True, exist_ok=True)
            for shard in progress(metadata_files, desc="candidates", unit="shard"):
                parts = sorted((part_dir / f"shard={shard}").glob("*.parquet"))
                with atomic_path(out_dir / f"{shard}.parquet", tmp_root) as tmp:
                    if len(parts) == 1:  # the usual case: DuckDB wrote one ordered file
                        shutil.move(str(parts[0]), tmp)
                    elif parts:  # several writer threads: merge, in row order
                        con.execute("COPY (SELECT * FROM read_parquet(?) ORDER BY row) TO ? (FORMAT parquet)",
                                    [[str(p) for p in parts], str(tmp)])
                    else:
                        empty_frame("candidates").write_parquet(tmp)
        finally:
            con.close()
    return CandidateSummary(ok, n_dups, ok - n_dups, float(thr), int(sum(per_shard.values())),
                            {k: int(per_shard.get(k, 0)) for k in metadata_files})
