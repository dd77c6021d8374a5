"""DuckDB in one place: the table schemas, a bounded connection, typed views.

Every parquet table of the pipeline has its columns and types in one table,
:data:`TABLES` (DuckDB type names); the polars and pyarrow schemas that the
writers use are derived from it, so a table's integer widths cannot drift
between the writer, the SQL views and the catalog.  The contracts are in
``docs/design.md`` (Tables, SQL catalog).

API (all a caller needs):

* :data:`TABLES` ``{table: {column: DuckDB type}}``; :func:`polars_schema`,
  :func:`arrow_schema`, :func:`empty_frame` derive the other forms;
* :func:`connect` ``(work_dir, memory_limit, threads)``: a connection on a
  scratch database file that spills to ``work_dir/spill`` past its memory
  limit, with the SQL function ``uid_hash`` (:func:`register_uid_hash`);
* :func:`parquet_files` ``(folder)``: a table folder's committed partitions;
* :func:`create_view` ``(con, name, files, table, columns)``: a temp view over
  parquet files with the table's types, all its columns or the ones a query
  reads (an empty typed view when there is no file);
  :func:`view_sql` / :func:`parquet_source` build the statement (the catalog
  uses them for its persistent views).

Values go into SQL as query parameters (``con.execute(sql, [values])``; a list
of paths works for ``read_parquet(?)``, a path for ``COPY ... TO ?``).  The one
place DuckDB cannot take a parameter is a view's body (``CREATE VIEW`` cannot
be prepared), and a view over files must name them: :func:`sql_literal` is the
one quoting function, used only there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dbprune_assets.core.method.uidhash import uid_hash

#: the one schema table: table -> column -> DuckDB type.  The catalog tables of
#: docs/design.md (with the extra columns their writers keep, e.g. a duplicate's
#: dedup cluster), plus the pipeline's internal ``candidates`` and ``duplicate_uids`` tables.
TABLES: dict[str, dict[str, str]] = {
    "samples": {
        "uid": "VARCHAR", "shard": "VARCHAR", "key": "VARCHAR", "row": "INTEGER",
        "caption": "VARCHAR", "width": "INTEGER", "height": "INTEGER", "status": "VARCHAR",
    },
    "problems": {"shard": "VARCHAR", "key": "VARCHAR", "stage": "VARCHAR", "cause": "VARCHAR"},
    "scores": {"uid": "VARCHAR", "shard": "VARCHAR", "clip_score": "FLOAT"},
    "duplicates": {
        "uid": "VARCHAR", "shard": "VARCHAR", "cluster": "INTEGER", "duplicate_of": "VARCHAR",
        "duplicate_of_shard": "VARCHAR", "similarity": "FLOAT",
    },
    "assignments": {"uid": "VARCHAR", "shard": "VARCHAR", "row": "INTEGER", "cluster": "INTEGER", "distance": "FLOAT"},
    "centroids": {"cluster": "INTEGER", "vector": "FLOAT[]"},
    "clusters": {
        "cluster": "INTEGER", "size": "BIGINT", "d_intra": "DOUBLE", "d_inter": "DOUBLE", "complexity": "DOUBLE",
        "probability": "DOUBLE", "quota": "BIGINT", "lower_bound": "BIGINT", "kept": "BIGINT",
    },
    "quotas": {"strategy": "VARCHAR", "cluster": "INTEGER", "quota": "BIGINT", "kept": "BIGINT"},
    "decisions": {"strategy": "VARCHAR", "uid": "VARCHAR", "shard": "VARCHAR", "keep": "BOOLEAN", "reason": "VARCHAR",
                  "run_id": "VARCHAR", "fit_id": "VARCHAR"},
    # history (core/store/history.py): a row per run and strategy, and the clusters whose quota moved
    "decision_runs": {
        "run_id": "VARCHAR", "at": "VARCHAR", "strategy": "VARCHAR", "fit_id": "VARCHAR", "samples": "BIGINT",
        "kept": "BIGINT", "added": "BIGINT", "removed": "BIGINT", "redecided": "BIGINT", "newly_kept": "BIGINT",
        "newly_pruned": "BIGINT",
    },
    "quota_moves": {
        "run_id": "VARCHAR", "at": "VARCHAR", "strategy": "VARCHAR", "cluster": "INTEGER", "quota_before": "BIGINT",
        "quota": "BIGINT", "kept_before": "BIGINT", "kept": "BIGINT", "move": "BIGINT",
    },
    "eval": {"strategy": "VARCHAR", "seed": "INTEGER", "task": "VARCHAR", "metric": "VARCHAR", "value": "DOUBLE"},
    "candidates": {"uid": "VARCHAR", "shard": "VARCHAR", "row": "INTEGER", "emb_row": "INTEGER", "clip_score": "FLOAT"},
    # SemDeDup's assignment of every ok sample (the per-shard dedup_assignments files)
    "dedup_assignments": {"uid": "VARCHAR", "shard": "VARCHAR", "row": "INTEGER", "cluster": "INTEGER",
                          "distance": "FLOAT"},
    # what each strategy keeps, against a pool's ground truth (core/strategies/truth.py)
    "truth_quality": {"strategy": "VARCHAR", "metric": "VARCHAR", "value": "DOUBLE"},
    # the strategies' own inputs (core/strategies/*.py, a strategy's prepare step)
    "negclip_scores": {"uid": "VARCHAR", "shard": "VARCHAR", "row": "INTEGER", "negclip": "DOUBLE"},
    "target_clusters": {"cluster": "INTEGER", "targets": "BIGINT"},
    "leaf_quotas": {"cluster": "INTEGER", "quota": "BIGINT", "pick": "VARCHAR"},
    # cross-shard duplicate uids (core/pool/uids.py): the later row and the first occurrence
    "duplicate_uids": {
        "shard": "VARCHAR", "key": "VARCHAR", "row": "INTEGER", "uid": "VARCHAR", "first_shard": "VARCHAR",
        "first_key": "VARCHAR",
    },
}


def _columns(table: str) -> dict[str, str]:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(TABLES)}") from None


def polars_schema(table: str) -> dict[str, Any]:
    """``{column: polars dtype}`` of ``table`` (for ``pl.DataFrame(schema=...)``)."""
    import polars as pl

    scalar = {"VARCHAR": pl.String(), "INTEGER": pl.Int32(), "BIGINT": pl.Int64(), "FLOAT": pl.Float32(),
              "DOUBLE": pl.Float64(), "BOOLEAN": pl.Boolean()}
    return {c: pl.List(scalar[t[:-2]]) if t.endswith("[]") else scalar[t] for c, t in _columns(table).items()}


def arrow_schema(table: str) -> Any:
    """The ``pyarrow.Schema`` of ``table``."""
    import pyarrow as pa

    scalar = {"VARCHAR": pa.string(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "FLOAT": pa.float32(),
              "DOUBLE": pa.float64(), "BOOLEAN": pa.bool_()}
    return pa.schema([(c, pa.list_(scalar[t[:-2]]) if t.endswith("[]") else scalar[t])
                      for c, t in _columns(table).items()])


def empty_frame(table: str) -> Any:
    """An empty polars frame with ``table``'s columns and dtypes."""
    import polars as pl

    return pl.DataFrame(schema=polars_schema(table))


# ---------------------------------------------------------------------------
# connection
# ---------------------------------------------------------------------------
def register_uid_hash(con: Any) -> None:
    """Make ``uid_hash(uid VARCHAR, seed BIGINT) -> UBIGINT`` callable in SQL.

    It is :func:`dbprune_assets.core.method.kmeans.uid_hash` (MurmurHash3-finaliser
    mixing of the uid's UTF-8 words, seeded; its docstring fixes the
    definition), the project's one stable hash: the same on every run and
    machine, and the one the k-means sample ranks by.  DuckDB calls it on
    vectors of rows (an Arrow UDF), so memory stays bounded.
    """
    import pyarrow as pa

    def _udf(uids: Any, seeds: Any) -> Any:
        if uids.null_count or seeds.null_count:
            raise ValueError("uid_hash: NULL uid or seed")
        u = np.asarray(uids.to_numpy(zero_copy_only=False), dtype=object)
        s = np.asarray(seeds.to_numpy(zero_copy_only=False), dtype=np.int64)
        out = np.empty(len(u), dtype=np.uint64)
        for seed in np.unique(s):  # one constant seed in practice
            m = s == seed
            out[m] = uid_hash(u[m], int(seed))
        return pa.array(out, pa.uint64())

    con.create_function("uid_hash", _udf, ["VARCHAR", "BIGINT"], "UBIGINT", type="arrow", side_effects=False)


def connect(work_dir: Path, memory_limit: str = "1GB", threads: int | None = None, *, ordered: bool = True) -> Any:
    """A DuckDB connection on ``work_dir/work.duckdb`` that spills to ``work_dir/spill``.

    A file database (rather than ``:memory:``) keeps temp tables on disk, so
    only DuckDB's buffer pool (``memory_limit``) lives in RAM.  ``threads``
    (None or 0: DuckDB's default) bounds its worker threads; ``ordered=False``
    lets it drop insertion order where no query relies on it (faster writes).
    ``uid_hash`` is registered (:func:`register_uid_hash`).  ``work_dir`` is
    the caller's private scratch folder.
    """
    import duckdb

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "memory_limit": str(memory_limit),
        "temp_directory": str(work_dir / "spill"),
        "preserve_insertion_order": bool(ordered),
    }
    if threads:
        config["threads"] = int(threads)
    con = duckdb.connect(str(work_dir / "work.duckdb"), config=config)
    register_uid_hash(con)
    return con


def distinct_count(con: Any, columns: str, source: str) -> int:
    """``count(DISTINCT (columns))`` over ``source`` (a table, view or
    ``name WHERE ...``), as a grouped aggregate: DuckDB spills those past its
    memory limit, but not its DISTINCT aggregates (out of memory at a 256 MB
    limit over 2.5M rows, where this form passed), whose memory grows with the
    pool."""
    return int(con.execute(f"SELECT count(*) FROM (SELECT {columns} FROM {source} GROUP BY ALL)").fetchall()[0][0])


# ---------------------------------------------------------------------------
# typed views over parquet files
# ---------------------------------------------------------------------------
def parquet_files(folder: Path) -> list[Path]:
    """The committed parquet partitions of a table folder (temp/dot files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if p.is_file() and not p.name.startswith("."))


def sql_literal(value: str | os.PathLike[str]) -> str:
    """A SQL string literal, for a view's body only (see the module docstring):
    everywhere else values go in as query parameters."""
    return "'" + str(value).replace("'", "''") + "'"


def parquet_source(files: Sequence[Path] | str, *, union_by_name: bool = False, file_row_number: bool = False) -> str:
    """``read_parquet(...)`` over a list of files or one glob, for :func:`view_sql`
    (``file_row_number``: a column of each row's index in its file)."""
    paths = sql_literal(files) if isinstance(files, str) else "[" + ", ".join(sql_literal(f) for f in files) + "]"
    options = "".join(f", {name} = true" for name, on in (("union_by_name", union_by_name),
                                                          ("file_row_number", file_row_number)) if on)
    return f"read_parquet({paths}{options})"


#: columns a table's files may lack (written before the column existed): a view reads them as NULL then
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"decisions": ("run_id", "fit_id")}


def absent_columns(table: str, source: str | None, con: Any = None) -> list[str]:
    """The :data:`OPTIONAL_COLUMNS` of ``table`` that ``source`` (a
    :func:`parquet_source`) does not hold; reads the files' schemas only."""
    optional = OPTIONAL_COLUMNS.get(table, ())
    if not optional or source is None:
        return []
    import duckdb

    own = con is None
    con = con or duckdb.connect()
    try:
        held = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    finally:
        if own:
            con.close()
    return [c for c in optional if c not in held]


def view_sql(name: str, table: str, source: str | None, *, columns: Sequence[str] | None = None,
             temp: bool = True, derived: Mapping[str, str] | None = None, absent: Sequence[str] = ()) -> str:
    """``CREATE OR REPLACE [TEMP] VIEW name`` selecting ``table``'s columns (or
    only ``columns``), each cast to its type, from ``source`` (aliased ``t``;
    :func:`parquet_source`), or no row at all when ``source`` is None.
    ``derived`` maps a column to the SQL expression that computes it instead of
    reading it; ``absent`` columns the files do not hold (:func:`absent_columns`) are NULL."""
    types = _columns(table)
    unknown = [c for c in columns or () if c not in types]
    if unknown:
        raise ValueError(f"table {table!r} has no column {unknown[0]!r}")
    types = {c: types[c] for c in columns} if columns else types
    kind = "TEMP VIEW" if temp else "VIEW"
    if source is None:
        cols = ", ".join(f'CAST(NULL AS {ty}) AS "{c}"' for c, ty in types.items())
        return f'CREATE OR REPLACE {kind} "{name}" AS SELECT {cols} WHERE false'
    exprs = {c: (derived or {}).get(c) or ("NULL" if c in absent else f't."{c}"') for c in types}
    cols = ", ".join(f'CAST({exprs[c]} AS {ty}) AS "{c}"' for c, ty in types.items())
    return f'CREATE OR REPLACE {kind} "{name}" AS SELECT {cols} FROM {source} t'


def create_view(con: Any, name: str, files: Sequence[Path], table: str | None = None,
                columns: Sequence[str] | None = None) -> None:
    """A temp view ``name`` over parquet ``files`` typed as ``table`` (default:
    ``name``), with all its columns or only ``columns``; an empty typed view
    when ``files`` is empty."""
    source = parquet_source(files) if files else None
    con.execute(view_sql(name, table or name, source, columns=columns,
                         absent=absent_columns(table or name, source, con)))
