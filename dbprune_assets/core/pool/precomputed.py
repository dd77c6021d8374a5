"""Pools whose embeddings come precomputed: DataComp metadata shards.

DataComp ships a pool as ``<stem>.parquet`` + ``<stem>.npz`` per shard (rows
aligned; docs/design.md, "Pools, embedding sources and scale").  With
``embeddings.source: datacomp`` such a shard is a pool shard of its own:

* **ingest** (:func:`ingest_datacomp_shard`) gives every parquet row a
  ``samples`` row (``key`` = ``uid``, ``caption`` = ``text``, ``width`` /
  ``height`` = ``original_width`` / ``original_height``) with its status:
  ``ok``, ``empty_caption``, ``bad_embedding`` (a NaN, inf or zero-norm image
  or text row in the npz) or ``duplicate_uid`` (a uid an earlier row of the
  shard has; across shards the pool manifest applies the same rule), each
  non-ok row with its ``problems`` row;
* **embeddings** (:func:`write_datacomp_embeddings`) copies the ``ok`` rows'
  stored pairs into the clip-retrieval layout every later stage reads
  (float16, as the computed path writes), with ``clip_score`` = cos(image,
  text) of the stored pair.  No model is trained or loaded.

A shard with images (``<stem>.tar`` beside the parquet) is ingested as
img2dataset output and its ``ok`` rows are then linked to the npz by uid
(:func:`link_image_shard`): a sample the npz has no row for is
``no_embedding``, a damaged row ``bad_embedding``.  A missing npz, a missing
key, rows that do not align and a width that changes between shards are
errors naming the file (``core/pool/sources.py``).  Memory: one shard.

With ``embeddings.source: clip_retrieval`` the pool is img2dataset output and
its embeddings are clip-retrieval's (``img_emb/``, ``text_emb/``,
``metadata/`` in ``embeddings.path``, default the pool), whose parts do not
follow the pool's shards: :func:`link_clip_retrieval_shard` looks a shard's
``ok`` rows up in the on-disk index of :mod:`.source_index` (by uid when the
metadata has a uid column, else by key) and marks them ``no_embedding`` /
``bad_embedding`` the same way, and :func:`write_clip_retrieval_embeddings`
gathers their stored pairs part by part (memory-mapped) into the same layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dbprune_assets.core.store.atomic import atomic_path
from dbprune_assets.core.pool.shards import PROBLEMS_SCHEMA, SAMPLES_SCHEMA, ShardError, ShardIngest
from dbprune_assets.core.pool.source_index import ensure_index, gather, index_dir, lookup
from dbprune_assets.core.pool.sources import (DataCompModel, SourceError, SourceRows, bad_rows, check_dim, clip_scores, link,
                      read_datacomp)

_STAGE = "ingest"
#: DataComp parquet columns ingest reads: name -> (arrow kind, how a message names it)
DATACOMP_COLUMNS: dict[str, tuple[str, str]] = {
    "uid": ("string", "string (32 hex digits)"),
    "text": ("string", "string (the caption)"),
    "original_width": ("integer", "integer"),
    "original_height": ("integer", "integer"),
}


def is_datacomp_shard(pool: Path, shard: str) -> bool:
    """A metadata shard (parquet + npz, no images)."""
    return (pool / f"{shard}.npz").is_file() and not (pool / f"{shard}.tar").exists()


def source_parquet(pool: Path, shard: str, folder: Path) -> Path:
    """The DataComp parquet (its npz beside it) holding ``shard``'s stored
    embeddings: the shard's own for a metadata shard, else ``folder``'s of the
    same stem (``embeddings.path``)."""
    return pool / f"{shard}.parquet" if is_datacomp_shard(pool, shard) else folder / f"{shard}.parquet"


def is_metadata_only(pool: Path, shards: list[str]) -> bool:
    """Whether the pool has no images at all (every shard a metadata shard)."""
    return bool(shards) and all(is_datacomp_shard(pool, s) for s in shards)


#: what the training stages say on a pool without images
NEEDS_IMAGES = (
    "the pool is DataComp metadata without images, so there is nothing to train on: the subsets are "
    "subsets/<strategy>/uids.npy. Download the images with img2dataset (DataComp's download_upstream.py does it "
    "for the whole pool), then make each subset's shards with DataComp's resharder.py --subset-file "
    "subsets/<strategy>/uids.npy, and train on those")


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
    for col, (kind, expected) in DATACOMP_COLUMNS.items():
        if col in schema.names and _kind(schema.field(col).type) not in (kind, "null"):
            raise ShardError(f"{parquet}: column {col!r} of shard {shard} has type {schema.field(col).type}, "
                             f"expected {expected}; rewrite it as DataComp writes it or remove the shard. The shard "
                             "is not ingested, the other shards are")
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


def ingest_datacomp_shard(pool: Path, shard: str, model: DataCompModel) -> ShardIngest:
    """Samples and problems of one DataComp metadata shard (module docstring).
    Raises ``ShardError`` naming the file for what cannot be read as it is."""
    parquet = pool / f"{shard}.parquet"
    meta = _read_datacomp_parquet(parquet, shard)
    rows = _source(parquet, model, shard)
    if len(rows.ids) != meta.height:  # pragma: no cover - both read the same parquet
        raise ShardError(f"{parquet}: {meta.height} rows but {len(rows.ids)} embedding rows")
    bad = bad_rows(rows.img, rows.txt)
    uids = meta["uid"].to_list()
    texts = meta["text"].to_list()
    status: list[str] = []
    problems: list[tuple] = []
    first: dict[str, int] = {}
    for i, (uid, text) in enumerate(zip(uids, texts)):
        if uid is None or not uid.strip():
            raise ShardError(f"{parquet}: row {i} of shard {shard} has no uid; every DataComp row has one "
                             "(re-download the shard)")
        if uid in first:
            status.append("duplicate_uid")
            problems.append((shard, uid, _STAGE, f"duplicate_uid: uid {uid} of row {i} is row {first[uid]}'s "
                                                 f"(shard {shard}); the first occurrence keeps it"))
            continue
        first[uid] = i
        if bad[i]:
            status.append("bad_embedding")
            problems.append((shard, uid, _STAGE, f"bad_embedding: row {i} of {rows.origin} has a NaN, inf or "
                                                 "zero-norm image or text embedding"))
        elif text is None or not text.strip():
            status.append("empty_caption")
            problems.append((shard, uid, _STAGE, "empty_caption: the text column is empty"))
        else:
            status.append("ok")
    samples = pl.DataFrame(
        {
            "uid": uids, "shard": [shard] * meta.height, "key": uids,
            "row": pl.int_range(0, meta.height, dtype=pl.Int32, eager=True),
            "caption": texts, "width": meta["original_width"], "height": meta["original_height"],
            "status": status,
        },
        schema=SAMPLES_SCHEMA,
    )
    return ShardIngest(shard, samples, pl.DataFrame(problems, schema=PROBLEMS_SCHEMA, orient="row"))


def link_image_shard(ingest: ShardIngest, npz_parquet: Path, model: DataCompModel) -> ShardIngest:
    """An img2dataset shard's ingest with its ``ok`` rows linked by uid to the
    DataComp npz of the same stem: no row there → ``no_embedding``, a damaged
    row → ``bad_embedding`` (each with a problems row)."""
    shard = ingest.shard
    rows = _source(npz_parquet, model, shard)
    samples = ingest.samples
    ok = samples["status"] == "ok"
    try:
        where = link(samples["uid"].to_numpy(), rows.ids, rows.origin)
    except SourceError as err:
        raise ShardError(f"shard {shard}: {err}") from None
    bad = bad_rows(rows.img, rows.txt)
    status = samples["status"].to_list()
    problems = []
    for i in np.flatnonzero(ok.to_numpy()):
        j = int(where[i])
        key = samples["key"][int(i)]
        if j < 0:
            status[i] = "no_embedding"
            problems.append((shard, key, _STAGE, f"no_embedding: {rows.origin} has no row for uid {samples['uid'][int(i)]}"))
        elif bad[j]:
            status[i] = "bad_embedding"
            problems.append((shard, key, _STAGE, f"bad_embedding: row {j} of {rows.origin} has a NaN, inf or "
                                                 "zero-norm image or text embedding"))
    new = pl.DataFrame(problems, schema=PROBLEMS_SCHEMA, orient="row")
    return ShardIngest(shard, samples.with_columns(pl.Series("status", status, pl.String)),
                       pl.concat([ingest.problems, new]))


def write_datacomp_embeddings(parquet: Path, ok: pl.DataFrame, model: DataCompModel, out_img: Path,
                              out_text: Path, out_meta: Path, tmp_root: Path, shard: str,
                              expected_dim: int | None = None) -> int:
    """Write the stored pairs of the ``ok`` rows (``uid, key, row``) of one
    shard in the clip-retrieval layout (float16, rows aligned with ``ok``) and
    their metadata (uid, shard, key, row, clip_score); returns the width."""
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
    _write_stored_pairs(rows.img[where], rows.txt[where], ok, shard, out_img, out_text, out_meta, tmp_root)
    return rows.dim


def _write_stored_pairs(img: np.ndarray, txt: np.ndarray, ok: pl.DataFrame, shard: str, out_img: Path,
                        out_text: Path, out_meta: Path, tmp_root: Path) -> None:
    """The embeddings layout of one shard from its ``ok`` rows' stored pairs
    (rows aligned with ``ok``): float16 arrays, then the metadata (uid, shard,
    key, row, clip_score = cos of the stored pair)."""
    meta = pl.DataFrame({
        "uid": ok["uid"].cast(pl.Utf8), "shard": [shard] * ok.height, "key": ok["key"].cast(pl.Utf8),
        "row": ok["row"].cast(pl.Int64), "clip_score": clip_scores(img, txt),
    }, schema={"uid": pl.Utf8, "shard": pl.Utf8, "key": pl.Utf8, "row": pl.Int64, "clip_score": pl.Float32})
    for path, array in ((out_img, img), (out_text, txt)):
        with atomic_path(path, tmp_root) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(array, dtype=np.float16), allow_pickle=False)
    with atomic_path(out_meta, tmp_root) as tmp:  # last: metadata appears only with its arrays
        meta.write_parquet(tmp, compression="zstd")


def _has_repeats(ids: np.ndarray) -> bool:
    s = np.asarray(ids, dtype=object).astype(str)
    return len(np.unique(s)) != len(s)


# ---------------------------------------------------------------------------
# clip-retrieval output beside an img2dataset pool
# ---------------------------------------------------------------------------
def link_clip_retrieval_shard(ingest: ShardIngest, folder: Path, home: Path, tmp_root: Path) -> ShardIngest:
    """An img2dataset shard's ingest with its ``ok`` rows linked to the
    clip-retrieval output in ``folder`` (by uid or key, through the index under
    ``home``): no row there → ``no_embedding``, a NaN, inf or zero-norm row →
    ``bad_embedding`` (each with a problems row).  A source that cannot be read
    as it is raises :class:`SourceError` naming the file: it is every shard's
    source, so the step stops rather than failing each shard alone."""
    shard = ingest.shard
    index = ensure_index(folder, index_dir(home), tmp_root)
    samples = ingest.samples
    ok = np.flatnonzero((samples["status"] == "ok").to_numpy())
    column = "uid" if index.by == "uid" else "key"
    ids = samples[column].to_numpy()[ok]
    part, row = lookup(index, ids, tmp_root)
    found = part >= 0
    bad = np.zeros(len(ok), dtype=bool)
    if found.any():
        img, txt = gather(index, part[found], row[found])
        bad[found] = bad_rows(img, txt)
    status = samples["status"].to_list()
    keys = samples["key"].to_list()
    problems = []
    for j, i in enumerate(ok.tolist()):
        if not found[j]:
            status[i] = "no_embedding"
            problems.append((shard, keys[i], _STAGE, f"no_embedding: the clip-retrieval output {index.folder} has no "
                                                     f"row for {column} {ids[j]}"))
        elif bad[j]:
            status[i] = "bad_embedding"
            problems.append((shard, keys[i], _STAGE, f"bad_embedding: {index.where(int(part[j]), int(row[j]))} has "
                                                     "a NaN, inf or zero-norm image or text embedding"))
    new = pl.DataFrame(problems, schema=PROBLEMS_SCHEMA, orient="row")
    return ShardIngest(shard, samples.with_columns(pl.Series("status", status, pl.String)),
                       pl.concat([ingest.problems, new]))


def write_clip_retrieval_embeddings(folder: Path, ok: pl.DataFrame, home: Path, out_img: Path, out_text: Path,
                                    out_meta: Path, tmp_root: Path, shard: str,
                                    expected_dim: int | None = None) -> int:
    """Write the clip-retrieval pairs of one shard's ``ok`` rows (``uid, key,
    row``) in the embeddings layout, as :func:`write_datacomp_embeddings` does;
    returns the width."""
    index = ensure_index(folder, index_dir(home), tmp_root)
    check_dim(index.dim, expected_dim, str(index.folder))
    column = "uid" if index.by == "uid" else "key"
    ids = ok[column].to_numpy()
    part, row = lookup(index, ids, tmp_root)
    if (part < 0).any():
        i = int(np.flatnonzero(part < 0)[0])
        raise SourceError(f"{index.folder}: no row for {column} {ids[i]} of shard {shard}, which ingest found; the "
                          "files changed after ingest: re-run dbprune run")
    img, txt = gather(index, part, row)
    _write_stored_pairs(img, txt, ok, shard, out_img, out_text, out_meta, tmp_root)
    return index.dim
