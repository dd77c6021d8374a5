"""What an embedding source is: the one interface ``embeddings.source`` picks.

A source decides where a pool's image and text embeddings come from.  The
pipeline asks it four things and never branches on its name
(``core/pool/sources/registry.py`` maps the name to the object):

* **ingest** a shard: every parquet row of the pool shard a ``samples`` row
  with its status, the source's own included (``no_embedding`` for an ok
  sample it has no row for, ``bad_embedding`` for a NaN, inf or zero-norm
  row), as :class:`~dbprune_assets.core.pool.shards.ShardIngest`;
* the **signature** of a shard: the files whose change makes the shard's
  ingest stale (``raw_metadata``'s fingerprint hashes the list);
* for a **precomputed** source, **write_embeddings**: the ok rows' stored
  pairs of a range of shards in the clip-retrieval layout every later stage
  reads (``embeddings/{img_emb,text_emb,metadata}/<shard>``), one
  :class:`StoredShard` per shard as it is written; a source that is not
  precomputed leaves that to the encoder (``core/models/embed.py``);
* its **encoder_record**: what the ``encoder`` asset records instead of a
  model (``None``: the encoder is trained or loaded).

``detect`` tells whether a pool folder is of the source's own kind, and
``needs_images`` whether every pool shard must be img2dataset output.  A new
source subclasses :class:`EmbeddingSource` in a module of its own and is
registered in ``registry.py`` (docs/design.md, "Adding an embedding source");
``stored.py`` holds what the precomputed ones share (marking linked rows,
writing stored pairs).  Nothing here imports torch or Dagster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

from dbprune_assets.core.pool.poolkind import is_datacomp_shard
from dbprune_assets.core.pool.shards import ShardError, ShardIngest, ingest_shard
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.store.state import file_signature, stable_hash

if TYPE_CHECKING:
    from dbprune_assets.core.settings import PipelineSettings

#: ``memo(key, compute)``: ``compute()`` once per fingerprinting pass (a
#: signature every shard shares, e.g. of one folder's files, is stat'ed once)
Memo = Callable[[str, Callable[[], Any]], Any]


@dataclass(frozen=True)
class StoredShard:
    """One shard's stored pairs, written by :meth:`EmbeddingSource.write_embeddings`."""

    shard: str
    rows: int  # the ok rows embedded
    dim: int  # the embeddings' width
    source: Path  # the file or folder the pairs came from
    data_version: str  # the shard's embeddings data version (of the source's files)


@dataclass(frozen=True)
class EncoderRecord:
    """What the ``encoder`` asset records for a precomputed source: ``used`` (a
    line saying so) and its data version."""

    used: str
    version: str


class EmbeddingSource(ABC):
    """Where a pool's embeddings come from (module docstring)."""

    #: the value of ``embeddings.source`` that picks it
    name: ClassVar[str]
    #: whether its embeddings are stored in files (no encoder is trained or loaded)
    precomputed: ClassVar[bool] = True
    #: whether every pool shard must be img2dataset output (a tar of images
    #: beside its parquet): a DataComp metadata shard is then an error
    needs_images: ClassVar[bool] = True

    def detect(self, pool: Path) -> bool:
        """Whether ``pool`` is a pool of this source's own kind, recognisable by
        its files alone (the automatic profile choice then sets the source).
        Default: no, the source is chosen in the settings."""
        return False

    @abstractmethod
    def ingest(self, pool: Path, shard: str, settings: PipelineSettings, home: Path | None = None) -> ShardIngest:
        """``shard``'s samples and problems, each row's status final (the
        source's ``no_embedding`` / ``bad_embedding`` included).  ``home`` is
        ``$DBPRUNE_HOME`` when None (where a source keeps what it builds).
        Raises ``ShardError`` for a shard that cannot be read as it is (it is
        recorded as failed, the others go on), ``SourceError`` for a source that
        cannot (every shard's: the step stops)."""

    @abstractmethod
    def signature(self, layout: Layout, settings: PipelineSettings, shard: str, memo: Memo) -> list:
        """The signatures of the files whose change makes ``shard``'s ingest
        stale, in a fixed order (``raw_metadata``'s fingerprint hashes the list,
        so a change of order or content re-ingests every home's shards)."""

    @abstractmethod
    def write_embeddings(self, layout: Layout, settings: PipelineSettings, shards: Iterable[str],
                         dim: int | None = None) -> Iterator[StoredShard]:
        """Write the stored pairs of each shard's ok rows (its ``samples``
        table) in the clip-retrieval layout, yielding each shard once its
        files are in place; ``dim``, the width of shards written before, which
        every shard must share (``SourceError`` naming the file otherwise)."""

    def pairs_version(self, layout: Layout, settings: PipelineSettings, shard: str) -> str:
        """A precomputed source's data version of ``shard``'s stored pairs (of
        the source files they come from): the embeddings' data version, and
        the stamp of the pairs its ingest stages (``stored.py``)."""
        raise TypeError(f"embeddings.source: {self.name} stores no pairs (not precomputed)")

    def label(self, settings: PipelineSettings) -> str:
        """The source as the metadata names it (``datacomp b32``)."""
        return self.name

    def encoder_record(self, settings: PipelineSettings) -> EncoderRecord | None:
        """What the ``encoder`` asset records instead of a model; ``None`` when
        the source is not precomputed (the encoder is trained or loaded)."""
        if not self.precomputed:
            return None
        return EncoderRecord(f"{self.label(settings)} (stored embeddings; no encoder)",
                             stable_hash({"source": self.name, "model": settings.embeddings.model}))


def pool_files(layout: Layout, shard: str) -> list[str]:
    """The signatures of the pool shard's own files (parquet, tar): the start
    of every source's :meth:`~EmbeddingSource.signature`."""
    return [file_signature(layout.shard_parquet(shard)), file_signature(layout.shard_tar(shard))]


def ingest_image_shard(source: EmbeddingSource, pool: Path, shard: str, settings: PipelineSettings) -> ShardIngest:
    """An img2dataset shard's ingest (``core/pool/shards.py``); a DataComp
    metadata shard is an error naming the setting that reads it."""
    if source.needs_images and is_datacomp_shard(pool, shard):
        raise ShardError(f"{pool / shard}.parquet: shard {shard} is DataComp metadata (an npz beside it, no "
                         "tar): set embeddings.source: datacomp to use its stored embeddings")
    return ingest_shard(pool, shard, settings.ingest.verify_images)
