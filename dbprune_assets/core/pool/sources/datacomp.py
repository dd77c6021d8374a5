"""``embeddings.source: datacomp``: DataComp's stored embeddings.

DataComp ships a pool as ``<stem>.parquet`` + ``<stem>.npz`` per shard (rows
aligned; docs/design.md, "Pools, embedding sources and scale").  Such a shard
is a pool shard of its own:

* **ingest** (:func:`ingest_datacomp_shard`) gives every parquet row a
  ``samples`` row (``key`` = ``uid``, ``caption`` = ``text``, ``width`` /
  ``height`` = ``original_width`` / ``original_height``) with its status:
  ``ok``, ``empty_caption``, ``bad_embedding`` (a NaN, inf or zero-norm image
  or text row in the npz) or ``duplicate_uid`` (a uid an earlier row of the
  shard has; across shards the pool manifest applies the same rule), each
  non-ok row with its ``problems`` row;
* **embeddings** (:func:`write_datacomp_embeddings`) copies the ``ok`` rows'
  stored pairs into the clip-retrieval layout every later stage reads
  (``stored.py``).  No model is trained or loaded.

A shard with images (``<stem>.tar`` beside the parquet) is ingested as
img2dataset output and its ``ok`` rows are then linked to the npz of the same
stem in ``embeddings.path`` by uid (:func:`link_image_shard`): a sample the
npz has no row for is ``no_embedding``, a damaged row ``bad_embedding``.  A
missing npz, a missing key, rows that do not align and a width that changes
between shards are errors naming the file (``readers.py``).  Memory: one shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dbprune_assets.core.pool.poolkind import is_datacomp_shard, looks_like_datacomp
from dbprune_assets.core.pool.shards import (PROBLEMS_SCHEMA, SAMPLES_SCHEMA, ShardError, ShardIngest,
                                             check_column_types)
from dbprune_assets.core.pool.sources.base import (EmbeddingSource, Memo, StoredShard, ingest_image_shard,
                                                   pool_files)
from dbprune_assets.core.pool.sources.readers import (DATACOMP_MODELS, DataCompModel, SourceError, SourceRows, link,
                                                      read_datacomp)
from dbprune_assets.core.pool.sources.stored import (DAMAGED, EmbeddingFiles, mark_embeddings, ok_positions, ok_rows,
                                                     stage_pairs, take_staged, write_stored_pairs)
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.store.state import file_signature, stable_hash

if TYPE_CHECKING:
    from dbprune_assets.core.settings import PipelineSettings

_STAGE = "ingest"
#: DataComp parquet columns ingest reads: name -> (arrow kind, how a message names it)
DATACOMP_COLUMNS: dict[str, tuple[str, str]] = {
    "uid": ("string", "string (32 hex digits)"), "text": ("string", "string (the caption)"),
    "original_width": ("integer", "integer"), "original_height": ("integer", "integer")}


def source_parquet(pool: Path, shard: str, folder: Path) -> Path:
    """The DataComp parquet (its npz beside it) holding ``shard``'s stored
    embeddings: the shard's own for a metadata shard, else ``folder``'s of the
    same stem (``embeddings.path``)."""
    return pool / f"{shard}.parquet" if is_datacomp_shard(pool, shard) else folder / f"{shard}.parquet"


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _read_datacomp_parquet(parquet: Path, shard: str) -> pl.DataFrame:
    """uid, text, original_width, original_height of a DataComp shard, checked."""
    if not parquet.is_file():
        raise ShardError(f"{parquet}: shard {shard} has no parquet; restore it or remove the shard's npz too")
    try:
        schema = pq.read_schema(parquet)
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"{parquet}: cannot read shard {shard}'s parquet ({type(err).__name__}: {err}); "
                         "re-download it with DataComp's download_upstream.py or remove the shard") from err
    if "uid" not in schema.names or "text" not in schema.names:
        raise ShardError(f"{parquet}: shard {shard}'s parquet lacks {[c for c in ('uid', 'text') if c not in schema.names]} "
                         f"(columns: {sorted(schema.names)}); it is not DataComp metadata: with embeddings.source: "
                         "datacomp every shard is DataComp's <stem>.parquet + <stem>.npz")
    check_column_types(parquet, shard, schema, DATACOMP_COLUMNS, _kind,
                       lambda col, expected: "rewrite it as DataComp writes it or remove the shard")
    cols = [c for c in DATACOMP_COLUMNS if c in schema.names]
    df = pl.from_arrow(pq.read_table(parquet, columns=cols))
    assert isinstance(df, pl.DataFrame)
    for col in ("original_width", "original_height"):
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, pl.Int32).alias(col))
    return df.select(pl.col("uid").cast(pl.String), pl.col("text").cast(pl.String),
                     pl.col("original_width").cast(pl.Int32), pl.col("original_height").cast(pl.Int32))


def _source(parquet: Path, model: DataCompModel, shard: str) -> SourceRows:
    try:
        return read_datacomp(parquet, model)
    except SourceError as err:
        raise ShardError(f"shard {shard}: {err}") from None


def _statuses(uids: list, texts: list, bad: np.ndarray, parquet: Path, shard: str,
              origin: str) -> tuple[list[str], list[tuple]]:
    """Each metadata row's status and the problems rows of the non-ok ones.

    The rules, first that applies: a row without a uid is an error; a uid
    that is not 32 hex digits is ``bad_uid``; a uid an earlier 32-hex row has
    (case-insensitively) is ``duplicate_uid``; a damaged pair is
    ``bad_embedding``; a blank text (``str.strip`` empty) is
    ``empty_caption``; else ``ok``.  Vectorised: Python looks only at the
    rows the masks single out."""
    frame = pl.DataFrame({"uid": uids, "text": texts}, schema={"uid": pl.String, "text": pl.String})
    n = frame.height
    masks = frame.select(
        hex=pl.col("uid").str.contains(r"\A[0-9a-fA-F]{32}\z").fill_null(False),
        # a superset of Python's whitespace-only strings (Unicode White_Space and \x1c-\x1f); checked below
        maybe_blank=pl.col("text").is_null() | pl.col("text").str.contains(r"\A[\s\x1c-\x1f]*\z"),
    )
    hex_ok = masks["hex"].to_numpy()
    for i in np.flatnonzero(~hex_ok).tolist():
        if uids[i] is None or not uids[i].strip():
            raise ShardError(f"{parquet}: row {i} of shard {shard} has no uid; every DataComp row has one "
                             "(re-download the shard)")
    first = np.arange(n)
    if hex_ok.any():  # each 32-hex uid's first row (uids compare case-insensitively)
        valid = frame.with_row_index("i").filter(pl.Series(hex_ok))
        valid = valid.with_columns(first=pl.col("i").first().over(pl.col("uid").str.to_lowercase()))
        first[valid["i"].to_numpy()] = valid["first"].to_numpy()
    dup = hex_ok & (first != np.arange(n))
    blank = masks["maybe_blank"].to_numpy().copy()
    for i in np.flatnonzero(blank).tolist():
        blank[i] = texts[i] is None or not texts[i].strip()
    status = np.full(n, "ok", dtype=object)
    status[blank] = "empty_caption"
    status[bad] = "bad_embedding"
    status[dup] = "duplicate_uid"
    status[~hex_ok] = "bad_uid"
    problems: list[tuple] = []
    for i in np.flatnonzero(status != "ok").tolist():
        uid, st = uids[i], status[i]
        if st == "bad_uid":
            cause = (f"bad_uid: row {i} of {parquet} has uid {uid[:64]!r}, not 32 hex digits (DataComp's uid); "
                     "fix the row or drop it")
        elif st == "duplicate_uid":
            cause = f"duplicate_uid: uid {uid} of row {i} is row {first[i]}'s (shard {shard}); the first occurrence keeps it"
        elif st == "bad_embedding":
            cause = f"bad_embedding: row {i} of {origin} {DAMAGED}"
        else:
            cause = "empty_caption: the text column is empty"
        problems.append((shard, uid, _STAGE, cause))
    return status.tolist(), problems


def ingest_datacomp_shard(pool: Path, shard: str, model: DataCompModel) -> ShardIngest:
    """Samples and problems of one DataComp metadata shard (module docstring).
    Raises ``ShardError`` naming the file for what cannot be read as it is."""
    return _ingest_metadata_shard(pool, shard, model)[0]


def _ingest_metadata_shard(pool: Path, shard: str, model: DataCompModel) -> tuple[ShardIngest, SourceRows]:
    """:func:`ingest_datacomp_shard`, and the rows it read (parquet-aligned)."""
    parquet = pool / f"{shard}.parquet"
    meta = _read_datacomp_parquet(parquet, shard)
    rows = _source(parquet, model, shard)
    if len(rows.ids) != meta.height:  # pragma: no cover - both read the same parquet
        raise ShardError(f"{parquet}: {meta.height} rows but {len(rows.ids)} embedding rows")
    uids, texts = meta["uid"].to_list(), meta["text"].to_list()
    status, problems = _statuses(uids, texts, rows.checks[0], parquet, shard, rows.origin)
    samples = pl.DataFrame(
        {
            "uid": uids, "shard": [shard] * meta.height, "key": uids,
            "row": pl.int_range(0, meta.height, dtype=pl.Int32, eager=True),
            "caption": texts, "width": meta["original_width"], "height": meta["original_height"],
            "status": status,
        },
        schema=SAMPLES_SCHEMA,
    )
    return ShardIngest(shard, samples, pl.DataFrame(problems, schema=PROBLEMS_SCHEMA, orient="row")), rows


def ingest_without_npz(pool: Path, shard: str) -> ShardIngest:
    """A DataComp metadata shard whose npz is missing: every row is
    ``no_embedding``, each with a problems row naming the npz, so the shard's
    rows are all accounted for (and the rest of the pool goes on)."""
    parquet = pool / f"{shard}.parquet"
    meta = _read_datacomp_parquet(parquet, shard)
    uids = meta["uid"].to_list()
    cause = (f"no_embedding: {parquet.with_suffix('.npz')} is missing; put the shard's npz beside its parquet "
             "(DataComp ships them together) or remove the parquet")
    samples = pl.DataFrame(
        {"uid": uids, "shard": [shard] * meta.height, "key": uids,
         "row": pl.int_range(0, meta.height, dtype=pl.Int32, eager=True), "caption": meta["text"].to_list(),
         "width": meta["original_width"], "height": meta["original_height"], "status": ["no_embedding"] * meta.height},
        schema=SAMPLES_SCHEMA,
    )
    problems = pl.DataFrame([(shard, uid, _STAGE, cause) for uid in uids], schema=PROBLEMS_SCHEMA, orient="row")
    return ShardIngest(shard, samples, problems)


def link_image_shard(ingest: ShardIngest, npz_parquet: Path, model: DataCompModel) -> ShardIngest:
    """An img2dataset shard's ingest with its ``ok`` rows linked by uid to the
    DataComp npz of the same stem: no row there → ``no_embedding``, a damaged
    row → ``bad_embedding`` (each with a problems row)."""
    return _link_image_shard(ingest, npz_parquet, model)[0]


def _link_image_shard(ingest: ShardIngest, npz_parquet: Path,
                      model: DataCompModel) -> tuple[ShardIngest, SourceRows, np.ndarray]:
    """:func:`link_image_shard`, the rows it read and each sample's row there (-1: none)."""
    shard = ingest.shard
    rows = _source(npz_parquet, model, shard)
    uids = ingest.samples["uid"].to_numpy()
    try:
        where = link(uids, rows.ids, rows.origin)
    except SourceError as err:
        raise ShardError(f"shard {shard}: {err}") from None
    ok = ok_positions(ingest)
    found = where[ok] >= 0
    bad = np.zeros(len(ok), dtype=bool)
    bad[found] = rows.checks[0][where[ok][found]]
    linked = mark_embeddings(ingest, ok, found, bad, lambda j: f"{rows.origin} has no row for uid {uids[ok[j]]}",
                             lambda j: f"row {where[ok[j]]} of {rows.origin}")
    return linked, rows, where


def _has_repeats(ids: np.ndarray) -> bool:
    s = np.asarray(ids, dtype=object).astype(str)
    return len(np.unique(s)) != len(s)


def write_datacomp_embeddings(parquet: Path, ok: pl.DataFrame, model: DataCompModel, out: EmbeddingFiles,
                              shard: str, expected_dim: int | None = None) -> int:
    """Write the stored pairs of the ``ok`` rows (``uid, key, row``) of one
    shard to ``out`` (float16, rows aligned with ``ok``) with their metadata
    (uid, shard, key, row, clip_score); returns the width.  A shard without
    ok rows (its npz missing or damaged: no_embedding, or not ingested) writes
    empty files of the model's width without reading its npz."""
    if ok.height == 0:
        dim = expected_dim or DATACOMP_MODELS[model]
        empty = np.zeros((0, dim), dtype=np.float16)
        write_stored_pairs(empty, empty, ok, shard, out)
        return dim
    rows = _source(parquet, model, shard)
    if expected_dim is not None and rows.dim != expected_dim:
        raise SourceError(f"{rows.origin}: embeddings are {rows.dim}-d but earlier shards were {expected_dim}-d; "
                          "all shards must come from one model (check embeddings.model)")
    where = link(ok["uid"].to_numpy(), rows.ids, rows.origin) if _has_repeats(rows.ids) is False else None
    if where is None:  # a metadata shard keeps repeated uids as duplicate_uid rows: its own rows are the link
        where = ok["row"].cast(pl.Int64).to_numpy()
    if (where < 0).any():
        i = int(np.flatnonzero(where < 0)[0])
        raise SourceError(f"{rows.origin}: no row for uid {ok['uid'][i]} of shard {shard}, which ingest found; "
                          "the file changed after ingest: re-run dbprune run")
    write_stored_pairs(rows.img[where], rows.txt[where], ok, shard, out)
    return rows.dim


class DataCompSource(EmbeddingSource):
    """DataComp's parquet + npz per shard: metadata shards of their own, or
    image shards linked by uid to the npz of their stem in ``embeddings.path``."""

    name = "datacomp"
    needs_images = False  # a metadata shard (parquet + npz, no tar) is a shard

    def detect(self, pool: Path) -> bool:
        """A pool of DataComp metadata shards: an npz beside a parquet and no tar."""
        return looks_like_datacomp(pool)

    def ingest(self, pool: Path, shard: str, settings: PipelineSettings, home: Path | None = None) -> ShardIngest:
        """The shard's samples; the ok rows' pairs, read here anyway, are staged
        for the embeddings stage (``stored.py``)."""
        emb = settings.embeddings
        if is_datacomp_shard(pool, shard):
            result, rows = _ingest_metadata_shard(pool, shard, emb.model)
            where = np.arange(len(rows.ids))
        elif not (pool / f"{shard}.tar").exists() and emb.folder(pool) == pool:
            return ingest_without_npz(pool, shard)
        else:
            result, rows, where = _link_image_shard(ingest_image_shard(self, pool, shard, settings),
                                                    source_parquet(pool, shard, emb.folder(pool)), emb.model)
        layout = Layout.from_env(home, pool)
        at: np.ndarray | slice = where[ok_positions(result)]
        if len(at) == len(rows.ids) and bool((at == np.arange(len(at))).all()):
            at = slice(None)  # every row ok, in order: no copies
        stage_pairs(layout, result, rows.img[at], rows.txt[at], self.pairs_version(layout, settings, shard),
                    scores=rows.checks[1][at])
        return result

    def pairs_version(self, layout: Layout, settings: PipelineSettings, shard: str) -> str:
        """The signatures of the parquet and npz of the shard's stem, and the model."""
        src = source_parquet(layout.pool, shard, settings.embeddings.folder(layout.pool))
        return stable_hash([file_signature(src), file_signature(src.with_suffix(".npz")), settings.embeddings.model])

    def signature(self, layout: Layout, settings: PipelineSettings, shard: str, memo: Memo) -> list:
        """The pool shard's files, then the parquet and npz of its stem in ``embeddings.path``."""
        folder = settings.embeddings.folder(layout.pool)
        return [*pool_files(layout, shard),
                file_signature(folder / f"{shard}.parquet"), file_signature(folder / f"{shard}.npz")]

    def write_embeddings(self, layout: Layout, settings: PipelineSettings, shards: Iterable[str],
                         dim: int | None = None) -> Iterator[StoredShard]:
        """Each shard's pairs from its npz; its data version, the parquet's and npz's signatures and the model."""
        emb = settings.embeddings
        for shard in shards:
            ok = ok_rows(layout, shard)
            src = source_parquet(layout.pool, shard, emb.folder(layout.pool))
            version = self.pairs_version(layout, settings, shard)
            dim = take_staged(layout, shard, ok, version, dim) or write_datacomp_embeddings(
                src, ok, emb.model, EmbeddingFiles.of(layout, shard), shard, expected_dim=dim)
            yield StoredShard(shard, ok.height, dim, src, version)

    def label(self, settings: PipelineSettings) -> str:
        return f"{self.name} {settings.embeddings.model}"
