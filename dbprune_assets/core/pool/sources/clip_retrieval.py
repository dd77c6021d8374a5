"""``embeddings.source: clip_retrieval``: clip-retrieval's output beside an img2dataset pool.

The pool is img2dataset output and its embeddings are clip-retrieval's
(``img_emb/``, ``text_emb/``, ``metadata/`` in ``embeddings.path``, default
the pool), whose parts do not follow the pool's shards:
:func:`link_clip_retrieval_shard` looks a shard's ``ok`` rows up in the
on-disk index of :mod:`.clip_retrieval_index` (by uid when the metadata has a
uid column, else by key) and marks them ``no_embedding`` / ``bad_embedding``
(``stored.py``), and :func:`write_clip_retrieval_embeddings` gathers their
stored pairs part by part (memory-mapped) into the embeddings layout.  The
folder is every shard's source, so one that cannot be read as it is raises
:class:`~.readers.SourceError` and the step stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import polars as pl

from dbprune_assets.core.pool.shards import ShardIngest
from dbprune_assets.core.pool.sources.base import (EmbeddingSource, Memo, StoredShard, ingest_image_shard,
                                                   pool_files)
from dbprune_assets.core.pool.sources.clip_retrieval_index import (ensure_index, gather, index_dir, lookup,
                                                                   source_signature)
from dbprune_assets.core.pool.sources.readers import SourceError, bad_rows, check_dim
from dbprune_assets.core.pool.sources.stored import (EmbeddingFiles, mark_embeddings, ok_positions, ok_rows,
                                                     stage_pairs, take_staged, write_stored_pairs)
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.store.state import stable_hash

if TYPE_CHECKING:
    from dbprune_assets.core.settings import PipelineSettings


def link_clip_retrieval_shard(ingest: ShardIngest, folder: Path, home: Path, tmp_root: Path) -> ShardIngest:
    """An img2dataset shard's ingest with its ``ok`` rows linked to the
    clip-retrieval output in ``folder`` (by uid or key, through the index under
    ``home``): no row there → ``no_embedding``, a NaN, inf or zero-norm row →
    ``bad_embedding`` (each with a problems row).  A source that cannot be read
    as it is raises :class:`SourceError` naming the file: it is every shard's
    source, so the step stops rather than failing each shard alone."""
    return _link(ingest, folder, home, tmp_root)[0]


def _link(ingest: ShardIngest, folder: Path, home: Path,
          tmp_root: Path) -> tuple[ShardIngest, np.ndarray, np.ndarray]:
    """:func:`link_clip_retrieval_shard`, and the pairs of the linked shard's ok rows (aligned with them)."""
    index = ensure_index(folder, index_dir(home), tmp_root)
    ok = ok_positions(ingest)
    column = "uid" if index.by == "uid" else "key"
    ids = ingest.samples[column].to_numpy()[ok]
    part, row = lookup(index, ids, tmp_root)
    found = part >= 0
    bad = np.zeros(len(ok), dtype=bool)
    img = txt = np.zeros((0, index.dim), dtype=np.float16)
    if found.any():
        img, txt = gather(index, part[found], row[found])
        bad[found] = bad_rows(img, txt)
    linked = mark_embeddings(ingest, ok, found, bad,
                             lambda j: f"the clip-retrieval output {index.folder} has no row for {column} {ids[j]}",
                             lambda j: index.where(int(part[j]), int(row[j])))
    good = ~bad[found]  # the found rows that stay ok
    return linked, img[good], txt[good]


def write_clip_retrieval_embeddings(folder: Path, ok: pl.DataFrame, home: Path, out: EmbeddingFiles, shard: str,
                                    expected_dim: int | None = None) -> int:
    """Write the clip-retrieval pairs of one shard's ``ok`` rows (``uid, key,
    row``) to ``out``, as :func:`.datacomp.write_datacomp_embeddings` does;
    returns the width."""
    index = ensure_index(folder, index_dir(home), out.tmp_root)
    check_dim(index.dim, expected_dim, str(index.folder))
    column = "uid" if index.by == "uid" else "key"
    ids = ok[column].to_numpy()
    part, row = lookup(index, ids, out.tmp_root)
    if (part < 0).any():
        i = int(np.flatnonzero(part < 0)[0])
        raise SourceError(f"{index.folder}: no row for {column} {ids[i]} of shard {shard}, which ingest found; the "
                          "files changed after ingest: re-run dbprune run")
    img, txt = gather(index, part, row)
    write_stored_pairs(img, txt, ok, shard, out)
    return index.dim


class ClipRetrievalSource(EmbeddingSource):
    """clip-retrieval's ``img_emb`` / ``text_emb`` / ``metadata`` parts in
    ``embeddings.path`` (default the pool), linked to img2dataset shards."""

    name = "clip_retrieval"

    def ingest(self, pool: Path, shard: str, settings: PipelineSettings, home: Path | None = None) -> ShardIngest:
        """The img2dataset shard linked through the index under ``home`` (default ``$DBPRUNE_HOME``)."""
        ingest = ingest_image_shard(self, pool, shard, settings)
        layout = Layout.from_env(home, pool)
        linked, img, txt = _link(ingest, settings.embeddings.folder(pool), layout.home, layout.tmp)
        stage_pairs(layout, linked, img, txt, self.pairs_version(layout, settings, shard))  # stored.py
        return linked

    def pairs_version(self, layout: Layout, settings: PipelineSettings, shard: str) -> str:
        """One signature of every part's files: any part may hold the shard's rows."""
        return stable_hash(["clip_retrieval", source_signature(settings.embeddings.folder(layout.pool))])

    def signature(self, layout: Layout, settings: PipelineSettings, shard: str, memo: Memo) -> list:
        """The pool shard's files, then one signature of every part's files
        (any part may hold the shard's rows: the parts are stat'ed once)."""
        folder = settings.embeddings.folder(layout.pool)
        return [*pool_files(layout, shard), memo(f"clip_retrieval_files:{folder}", lambda: source_signature(folder))]

    def write_embeddings(self, layout: Layout, settings: PipelineSettings, shards: Iterable[str],
                         dim: int | None = None) -> Iterator[StoredShard]:
        """Each shard's pairs gathered from the parts; every shard's data version
        is the folder's files' signature."""
        folder = settings.embeddings.folder(layout.pool)
        version = self.pairs_version(layout, settings, "")
        for shard in shards:
            ok = ok_rows(layout, shard)
            dim = take_staged(layout, shard, ok, version, dim) or write_clip_retrieval_embeddings(
                folder, ok, layout.home, EmbeddingFiles.of(layout, shard), shard, expected_dim=dim)
            yield StoredShard(shard, ok.height, dim, folder, version)
