"""Embedding sources: where a pool's image and text embeddings come from.

``embeddings.source`` names one, and the pipeline asks it (never its name)
how to ingest a shard, which files a shard's ingest depends on, and how to
write its stored pairs (docs/design.md, "Pools, embedding sources and scale"):

* ``base.py``: the :class:`~.base.EmbeddingSource` interface;
* ``registry.py``: name -> source (``get``, ``register``, ``names``);
* ``compute.py``, ``datacomp.py``, ``clip_retrieval.py``: one source each;
* ``stored.py``: what the precomputed sources share (marking linked rows
  ``no_embedding`` / ``bad_embedding``, writing stored pairs);
* ``readers.py``: reading and checking DataComp's and clip-retrieval's files;
* ``clip_retrieval_index.py``, ``clip_retrieval_lookup.py``: the on-disk link
  index of a clip-retrieval folder and its point lookups.

The reading helpers are re-exported here (``from
dbprune_assets.core.pool.sources import clip_scores``); the sources
themselves are reached through ``registry``.
"""

from dbprune_assets.core.pool.sources.readers import (  # noqa: F401  (re-exported)
    CLIP_RETRIEVAL_FILES,
    DATACOMP_MODELS,
    DataCompModel,
    SourceError,
    SourceRows,
    bad_rows,
    check_dim,
    clip_retrieval_files,
    clip_retrieval_id,
    clip_retrieval_id_sql,
    clip_retrieval_link_column,
    clip_retrieval_parts,
    clip_scores,
    link,
    normalised,
    read_clip_retrieval,
    read_datacomp,
)
