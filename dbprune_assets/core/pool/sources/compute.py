"""``embeddings.source: compute`` (the default): the encoder embeds the pool's images.

The pool is img2dataset output (``core/pool/shards.py``); ingest reads each
shard's parquet and tar and nothing else, and the ``embeddings`` asset runs
the cluster and score encoders over the ok samples (``core/models/embed.py``),
so this source stores nothing and has no pairs to write.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from dbprune_assets.core.pool.shards import ShardIngest
from dbprune_assets.core.pool.sources.base import EmbeddingSource, Memo, StoredShard, ingest_image_shard, pool_files
from dbprune_assets.core.store.layout import Layout

if TYPE_CHECKING:
    from dbprune_assets.core.settings import PipelineSettings


class ComputeSource(EmbeddingSource):
    """Embeddings computed from the pool's images by the encoder."""

    name = "compute"
    precomputed = False

    def ingest(self, pool: Path, shard: str, settings: PipelineSettings, home: Path | None = None) -> ShardIngest:
        """The img2dataset shard as it is (no embedding statuses: the encoder embeds every ok sample)."""
        return ingest_image_shard(self, pool, shard, settings)

    def signature(self, layout: Layout, settings: PipelineSettings, shard: str, memo: Memo) -> list:
        """The shard's parquet and tar."""
        return pool_files(layout, shard)

    def write_embeddings(self, layout: Layout, settings: PipelineSettings, shards: Iterable[str],
                         dim: int | None = None) -> Iterator[StoredShard]:
        """None to write: the ``embeddings`` asset embeds with the encoder."""
        raise TypeError("embeddings.source: compute has no stored embeddings; the embeddings asset computes them "
                        "with the encoder (core/models/embed.py)")
