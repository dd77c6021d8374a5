"""The synthetic sample pool: a seeded, deterministic stand-in for a web crawl.

Demo and test data, not part of the method (hence outside ``core``).

``write_sample_pool`` writes a pool in img2dataset's webdataset layout (the
format LAION and DataComp pools use) whose defects are *planted* and recorded in
``ground_truth.parquet``, so every stage of the method can be checked against
known answers:

* concepts are (shape, color) pairs rendered with PIL; each concept has a
  planted ``variability`` (how diverse its renderings are) spread evenly over
  [0, 1], and a long-tailed (Zipf) frequency assigned independently of it, so
  DBP's "keep more of complex concepts" can be measured without confounding;
* ~10% of rows are exact (same JPEG bytes) or near (re-encoded, re-noised or
  re-scaled) duplicates of another row, in groups of 2-4 (SemDeDup);
* ~8% of captions belong to another concept (the CLIP-score filter);
* ~2% rows failed to download, ~0.5% have an undecodable image behind a
  "success" status and ~0.5% an empty caption (ingest).

Besides the pool shards the folder holds ``eval/`` (labelled zero-shot and
retrieval split) and ``reference/`` (clean split to train the bootstrap
encoder); neither is part of the pool.  The pool is a pure function of its
``PoolSettings``: the same settings give byte-identical files.

Modules, by job: :mod:`.concepts` (the concept table, random streams),
:mod:`.render` (drawing and JPEG bytes), :mod:`.captions` (alt texts,
prompt templates), :mod:`.plan` (rows, duplicates, planted defects),
:mod:`.webmeta` (urls, original sizes, face boxes) and :mod:`.writer`
(layout, tar + parquet shards, ground truth, splits).

``write_datacomp_pool`` (:mod:`.datacomp`) tells the same story as DataComp
metadata shards (``<stem>.parquet`` + ``<stem>.npz`` with b32/l14 CLIP
embeddings synthesised by :mod:`.geometry`, no images), with the same
``ground_truth.parquet``.
"""

from dbprune_assets.samplepool.captions import CAPTION_TEMPLATES, EVAL_TEMPLATES, make_caption
from dbprune_assets.samplepool.concepts import COLORS, SHAPES, ZIPF_EXPONENT, Concept, concept_counts, make_concepts
from dbprune_assets.samplepool.datacomp import DATACOMP_GENERATOR, DataCompPoolSummary, is_datacomp_pool, write_datacomp_pool
from dbprune_assets.samplepool.render import RenderParams, encode_jpeg, render, sample_params
from dbprune_assets.samplepool.writer import GENERATOR, GENERATOR_VERSION, PLANTED_STATUSES, PoolSummary, is_sample_pool, load_ground_truth, write_sample_pool

__all__ = [
    "CAPTION_TEMPLATES", "COLORS", "DATACOMP_GENERATOR", "EVAL_TEMPLATES", "GENERATOR", "GENERATOR_VERSION",
    "PLANTED_STATUSES", "SHAPES", "ZIPF_EXPONENT", "Concept", "DataCompPoolSummary", "PoolSummary", "RenderParams",
    "concept_counts", "encode_jpeg", "is_datacomp_pool", "is_sample_pool", "load_ground_truth", "make_caption",
    "make_concepts", "render", "sample_params", "write_datacomp_pool", "write_sample_pool",
]
