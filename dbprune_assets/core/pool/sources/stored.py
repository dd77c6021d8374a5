"""What the precomputed embedding sources share: marking a shard's ok rows
by what the source holds for them, and writing stored pairs in the
clip-retrieval layout every later stage reads.

A stored source links each ok sample of a shard to a row of its files (by
uid, key or position) and :func:`mark_embeddings` gives the samples it has no
row for ``no_embedding`` and those whose row is damaged ``bad_embedding``
(:func:`~.readers.bad_rows`), each with its ``problems`` row.  The
embeddings stage then copies the ok rows' pairs with :func:`write_stored_pairs`
(float16, as the computed path writes, ``clip_score`` = cos of the stored
pair), so nothing downstream knows where they came from.

**One read per input file.**  A stored source's ingest reads the pairs
anyway (to find the damaged rows), so it also writes the ok rows' pairs,
exactly as the embeddings stage would, into ``embeddings/staged/<shard>/``
(:func:`stage_pairs`) with a stamp naming the source files' version.  The
embeddings stage then moves them into place by rename
(:func:`take_staged`) when the stamp's version is the source files' version
now and its rows are the shard's ok rows now; otherwise (the files changed,
the shard was re-ingested by an older dbprune, the stage ran before) it reads
the source again.  The files are the same bytes either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import polars as pl

from dbprune_assets.core.pool.shards import PROBLEMS_SCHEMA, ShardIngest
from dbprune_assets.core.pool.sources.readers import clip_scores
from dbprune_assets.core.store.atomic import atomic_path, remove
from dbprune_assets.core.store.layout import Layout

_STAGE = "ingest"
#: the end of every ``bad_embedding`` cause
DAMAGED = "has a NaN, inf or zero-norm image or text embedding"


class EmbeddingFiles(NamedTuple):
    """Where one shard's embeddings go: the clip-retrieval layout's three files
    and the scratch folder their atomic writes use."""

    img: Path
    text: Path
    meta: Path
    tmp_root: Path

    @classmethod
    def of(cls, layout: Layout, shard: str) -> "EmbeddingFiles":
        """``embeddings/{img_emb,text_emb,metadata}/<shard>`` of ``layout``."""
        return cls(layout.img_emb(shard), layout.text_emb(shard), layout.emb_metadata(shard), layout.tmp)

    @classmethod
    def staged(cls, layout: Layout, shard: str) -> "EmbeddingFiles":
        """The same three files staged by ingest, ``embeddings/staged/<shard>/``."""
        folder = layout.staged_pairs(shard)
        return cls(folder / "img_emb.npy", folder / "text_emb.npy", folder / "metadata.parquet", layout.tmp)

    def files(self) -> tuple[Path, Path, Path]:
        """The three files, metadata last (the order they are written and moved in)."""
        return self.img, self.text, self.meta


def ok_rows(layout: Layout, shard: str) -> pl.DataFrame:
    """``uid, key, row`` of the shard's ``ok`` samples (its ingested ``samples`` table), in row order."""
    samples = pl.read_parquet(layout.table("samples", shard))
    return samples.filter(pl.col("status") == "ok").select("uid", "key", "row")


def mark_embeddings(ingest: ShardIngest, ok: np.ndarray, found: np.ndarray, bad: np.ndarray,
                    no_row: Callable[[int], str], damaged_row: Callable[[int], str]) -> ShardIngest:
    """``ingest`` with its rows at positions ``ok`` (its ``ok`` samples)
    marked: ``no_embedding`` where not ``found``, else ``bad_embedding`` where
    ``bad`` (both indexed like ``ok``); each gets a problems row whose cause is
    ``no_embedding: <no_row(j)>`` or ``bad_embedding: <damaged_row(j)> has a
    NaN, …``, ``j`` the sample's index in ``ok``."""
    shard, samples = ingest.shard, ingest.samples
    status = samples["status"].to_list()
    keys = samples["key"].to_list()
    problems = []
    for j, i in enumerate(np.asarray(ok).tolist()):
        if not found[j]:
            status[i] = "no_embedding"
            problems.append((shard, keys[i], _STAGE, f"no_embedding: {no_row(j)}"))
        elif bad[j]:
            status[i] = "bad_embedding"
            problems.append((shard, keys[i], _STAGE, f"bad_embedding: {damaged_row(j)} {DAMAGED}"))
    new = pl.DataFrame(problems, schema=PROBLEMS_SCHEMA, orient="row")
    return ShardIngest(shard, samples.with_columns(pl.Series("status", status, pl.String)),
                       pl.concat([ingest.problems, new]))


def ok_positions(ingest: ShardIngest) -> np.ndarray:
    """The row positions of ``ingest``'s ``ok`` samples."""
    return np.flatnonzero((ingest.samples["status"] == "ok").to_numpy())


def write_stored_pairs(img: np.ndarray, txt: np.ndarray, ok: pl.DataFrame, shard: str, out: EmbeddingFiles,
                       scores: np.ndarray | None = None) -> None:
    """The embeddings layout of one shard from its ``ok`` rows' (``uid, key,
    row``) stored pairs, rows aligned with ``ok``: float16 arrays, then the
    metadata (uid, shard, key, row, clip_score = cos of the stored pair;
    ``scores``: those cosines when the caller has them, ``clip_scores(img, txt)``)."""
    meta = pl.DataFrame({
        "uid": ok["uid"].cast(pl.Utf8), "shard": [shard] * ok.height, "key": ok["key"].cast(pl.Utf8),
        "row": ok["row"].cast(pl.Int64), "clip_score": clip_scores(img, txt) if scores is None else scores,
    }, schema={"uid": pl.Utf8, "shard": pl.Utf8, "key": pl.Utf8, "row": pl.Int64, "clip_score": pl.Float32})
    for path, array in ((out.img, img), (out.text, txt)):
        with atomic_path(path, out.tmp_root) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(array, dtype=np.float16), allow_pickle=False)
    with atomic_path(out.meta, out.tmp_root) as tmp:  # last: metadata appears only with its arrays
        meta.write_parquet(tmp, compression="zstd")


def _stamp(layout: Layout, shard: str) -> Path:
    return layout.staged_pairs(shard) / "stamp.json"


def stage_pairs(layout: Layout, ingest: ShardIngest, img: np.ndarray, txt: np.ndarray, version: str,
                scores: np.ndarray | None = None) -> None:
    """Stage the pairs of ``ingest``'s ``ok`` rows (``img`` / ``txt`` aligned
    with them) for the embeddings stage, stamped with the source files'
    ``version`` (module docstring).  The stamp is written last and removed
    first, so a stamp always names complete files."""
    ok = ingest.samples.filter(pl.col("status") == "ok").select("uid", "key", "row")
    if len(img) != ok.height or len(txt) != ok.height:  # pragma: no cover - a source's own mistake
        raise AssertionError(f"shard {ingest.shard}: {ok.height} ok rows but {len(img)} staged pairs")
    stamp = _stamp(layout, ingest.shard)
    remove(stamp)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_stored_pairs(img, txt, ok, ingest.shard, EmbeddingFiles.staged(layout, ingest.shard), scores)
    with atomic_path(stamp, layout.tmp) as tmp:
        tmp.write_text(json.dumps({"version": version, "rows": ok.height, "dim": int(img.shape[1])}))


def take_staged(layout: Layout, shard: str, ok: pl.DataFrame, version: str, dim: int | None) -> int | None:
    """Move the staged pairs of ``shard`` into the embeddings layout when they
    are of the source files' ``version`` and of the ``ok`` rows (``uid, key,
    row``) and, with ``dim`` given, of that width; returns their width, or
    None when they cannot be used (the caller reads the source)."""
    stamp, staged = _stamp(layout, shard), EmbeddingFiles.staged(layout, shard)
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    usable = (info.get("version") == version and info.get("rows") == ok.height
              and (dim is None or info.get("dim") == dim) and all(p.is_file() for p in staged.files()))
    if usable:
        rows = pl.read_parquet(staged.meta, columns=["uid", "key", "row"])
        usable = rows.equals(ok.select(pl.col("uid").cast(pl.Utf8), pl.col("key").cast(pl.Utf8),
                                       pl.col("row").cast(pl.Int64)))
    remove(stamp)  # first: a move cut short leaves files without a stamp, never a stamp without files
    if not usable:
        remove(layout.staged_pairs(shard))
        return None
    for src, dst in zip(staged.files(), EmbeddingFiles.of(layout, shard).files()):
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    remove(layout.staged_pairs(shard))
    return int(info["dim"])
