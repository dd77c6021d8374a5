"""The kept samples of a strategy's decisions, as a DuckDB table.

The subset export (:mod:`dbprune_assets.core.store.export`) and its check
(:mod:`dbprune_assets.core.store.export_check`) both read the decisions
through the table ``kept`` (shard, uid, key, caption): the decisions' kept rows
joined with the samples table, which gives each kept sample its tar key.  It
is stored once per connection (in its scratch database, so it spills past the
memory limit) and read several times: the checks, the id file, the shuffle.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dbprune_assets.core.store.duck import connect, create_view, distinct_count, parquet_files

#: the samples columns the export reads (caption last: only a pool with images needs it)
SAMPLE_COLUMNS = ("uid", "shard", "key", "row", "caption")
_HEX32 = "[0-9a-fA-F]{32}"


def default_samples_dir(decisions_path: Path, samples_dir: Path | None) -> Path:
    """``samples_dir``, by default ``tables/samples`` beside the decisions'
    ``tables/decisions``."""
    return Path(samples_dir) if samples_dir is not None else decisions_path.parent.parent / "samples"


def kept_view(con: Any, decisions_path: Path, samples_dir: Path, images: bool = True) -> None:
    """The table ``kept`` (shard, uid, key, caption) of the kept decisions.  A
    decision names its sample by (shard, uid): of the rows of a shard that
    share a uid, the first (the others are ``duplicate_uid`` or worse, never kept).
    Reads only the samples columns it needs; without ``images`` (nothing is
    written to a tar) not the caption, which is NULL then."""
    create_view(con, "dec", [Path(decisions_path)], "decisions")
    create_view(con, "samples", parquet_files(samples_dir), columns=SAMPLE_COLUMNS if images else SAMPLE_COLUMNS[:-1])
    caption = "s.caption" if images else "CAST(NULL AS VARCHAR)"
    # joined first, then each kept decision row's first samples row: the window runs over the kept
    # rows, not the whole pool (twice as fast); a decision row is its place in the file
    con.execute(
        f"""
        CREATE OR REPLACE TABLE kept AS
        SELECT d.shard, d.uid, s.key, {caption} AS caption
        FROM (SELECT shard, uid, file_row_number AS _d FROM read_parquet(?, file_row_number = true) WHERE keep) d
        JOIN samples s ON s.shard = d.shard AND s.uid = d.uid
        QUALIFY row_number() OVER (PARTITION BY d._d ORDER BY s.row) = 1
        """, [str(decisions_path)]
    )


@contextlib.contextmanager
def kept_connection(decisions_path: Path, samples_dir: Path, tmp_root: Path | None, memory_limit: str, *,
                    images: bool = True, threads: int | None = None, given: Any = None) -> Iterator[Any]:
    """A bounded DuckDB connection in a temp folder with the ``kept`` table of
    the decisions; ``given``: such a connection already open (the export and
    its check of one strategy share one), used as it is and left open."""
    if given is not None:
        yield given
        return
    if tmp_root is not None:
        Path(tmp_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kept-", dir=tmp_root) as work:
        con = connect(Path(work), memory_limit, threads)
        try:
            kept_view(con, decisions_path, samples_dir, images)
            yield con
        finally:
            con.close()


def check_kept(con: Any, decisions_path: Path, samples_dir: Path) -> int:
    """The number of kept samples; ValueError when a kept decision has no
    samples row, or two kept samples share a tar key or a uid."""
    n_dec = con.execute("SELECT count(*) FROM dec WHERE keep").fetchall()[0][0]
    n_kept = count_kept(con)
    n_keys, n_uids = distinct_count(con, "key", "kept WHERE key IS NOT NULL"), distinct_count(con, "uid", "kept WHERE uid IS NOT NULL")
    if n_kept != n_dec:
        rows = con.execute(
            "SELECT d.shard, d.uid FROM dec d ANTI JOIN samples s ON s.shard = d.shard AND s.uid = d.uid WHERE d.keep LIMIT 1"
        ).fetchall()
        ex = rows[0] if rows else None
        where = f", e.g. shard {ex[0]} uid {ex[1]} has no samples row" if ex else " ((shard, uid) repeats in samples)"
        raise ValueError(
            f"{decisions_path}: {n_dec} kept decisions map to {n_kept} samples rows of {samples_dir}{where}; "
            "the decisions are out of date"
        )
    if n_keys != n_kept:
        key, n = con.execute("SELECT key, count(*) FROM kept GROUP BY key HAVING count(*) > 1 ORDER BY key LIMIT 1").fetchall()[0]
        raise ValueError(f"{decisions_path}: tar key {key!r} is shared by {n} kept samples; keys must be unique to export")
    if n_uids != n_kept:
        uid, where = con.execute(
            "SELECT uid, string_agg(shard, ', ' ORDER BY shard) FROM kept GROUP BY uid HAVING count(*) > 1 ORDER BY uid LIMIT 1"
        ).fetchall()[0]
        raise ValueError(f"{decisions_path}: uid {uid} is kept in shards {where}; the first occurrence keeps a uid "
                         "(status duplicate_uid for the others): re-materialise pool_manifest and the decisions")
    return int(n_kept)


def count_kept(con: Any) -> int:
    """The number of rows of the ``kept`` table."""
    return con.execute("SELECT count(*) FROM kept").fetchall()[0][0]


def all_hex(con: Any) -> bool:
    """Whether every kept sample's uid is 32-hex (DataComp's): then the
    subset's id file is ``uids.npy`` (a ``bad_uid`` row is never kept)."""
    bad = con.execute("SELECT count(*) FROM dec WHERE keep AND (uid IS NULL OR NOT regexp_full_match(uid, ?))",
                      [_HEX32]).fetchall()[0][0]
    return bad == 0
