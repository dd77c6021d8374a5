"""Whether a shard read again is the same shard: what keeps a touched pool from redoing everything.

A pool file's identity is cheap to check: its size and modification time
(:func:`~dbprune_assets.core.store.state.file_signature`, in ``raw_metadata``'s
fingerprint).  So ``touch``, a copy without ``-p``, a backup restored or a shard
downloaded again byte for byte makes the shard's ingest out of date, and it is
read again.  What follows it must not run again when nothing it reads changed:
the re-ingest then keeps ``raw_metadata``'s earlier data version, which is what
every later stage's fingerprint holds (``embeddings``, ``pool_manifest`` and so
everything global), so they stay up to date and no model is retrained.

"Nothing changed" means everything later stages read of the shard
(:func:`unchanged`):

* its ``samples`` and ``problems`` rows (equal frames, as ingest made them now
  and as the earlier ingest wrote them);
* the bytes of its tar: the images the encoder embeds, the exports copy and the
  report shows.  Their digest (:func:`tar_digest`) is recorded at every ingest,
  in the commit marker's summary (``"tar"``);
* for a stored source, the pairs its ingest staged for ``embeddings``
  (``sources/stored.py``): byte for byte the shard's embeddings files in place.
  They are then dropped (:func:`drop_staged`), being what is there already.

Anything else, or any doubt (a file missing, a marker of an older dbprune
without the tar digest), is a change: the shard gets a new data version and what
follows it runs, as before.

:func:`ingest_and_write` is one shard's whole ingest as ``raw_metadata`` runs it
in a thread (read, compare, write the tables); :func:`reread_line` is what
``dbprune run`` then says.  Nothing here imports Dagster.
"""

from __future__ import annotations

import filecmp
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import polars as pl

from dbprune_assets.core.pool.shards import ShardError, ShardIngest, failed_ingest
from dbprune_assets.core.store.atomic import remove, write_parquet
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.store.state import State, file_digest, forget_last_commit, last_commit, read_state

if TYPE_CHECKING:
    from dbprune_assets.core.pool.sources.base import EmbeddingSource
    from dbprune_assets.core.settings import PipelineSettings

#: the commit-marker summary keys: the tar's digest; whether the ingest found the shard as it was
TAR_DIGEST = "tar"
UNCHANGED = "unchanged"


def tar_digest(path: Path) -> str:
    """The sha256 of the tar's bytes, or ``"absent"`` without one (a DataComp
    metadata shard has no tar)."""
    return file_digest(path)


def _same_frame(path: Path, frame: pl.DataFrame) -> bool:
    try:
        return pl.read_parquet(path).equals(frame)
    except (OSError, pl.exceptions.PolarsError):
        return False


def _staged_pairs_in_place(layout: Layout, shard: str) -> bool:
    """True when the shard has no staged pairs, or they are byte for byte its embeddings files."""
    from dbprune_assets.core.pool.sources.stored import EmbeddingFiles

    staged = EmbeddingFiles.staged(layout, shard)
    if not layout.staged_pairs(shard).exists():
        return True
    placed = EmbeddingFiles.of(layout, shard)
    try:
        return all(filecmp.cmp(a, b, shallow=False) for a, b in zip(staged.files(), placed.files()))
    except OSError:
        return False


def unchanged(layout: Layout, ingest: ShardIngest, tar: str, previous: Mapping[str, Any] | None) -> bool:
    """Whether ``ingest`` (of a shard read again, before its tables are
    written) gives later stages exactly what the earlier ingest did, whose
    commit-marker summary is ``previous`` (None: never ingested) and whose tar
    digest ``tar`` now is (module docstring)."""
    shard = ingest.shard
    if previous is None or previous.get(TAR_DIGEST) != tar:
        return False
    return (_same_frame(layout.table("samples", shard), ingest.samples)
            and _same_frame(layout.table("problems", shard), ingest.problems)
            and _staged_pairs_in_place(layout, shard))


def drop_staged(layout: Layout, shard: str) -> None:
    """Remove the pairs an unchanged re-ingest staged: its embeddings files are them."""
    remove(layout.staged_pairs(shard))


@dataclass(frozen=True)
class Ingested:
    """One shard's ingest as :func:`ingest_and_write` left it."""

    result: ShardIngest
    error: ShardError | None  # the shard could not be read (recorded as failed; the others go on)
    counts: Counter[str]  # rows per status, most common first
    tar: str  # tar_digest of its tar
    previous: State | None  # the earlier ingest's commit marker (None: a new shard)
    same: bool  # read again and unchanged: its tables were kept, and it keeps ``previous``'s data version

    @property
    def data_version(self) -> str | None:
        """The version to commit: the earlier one when unchanged, else None (the fingerprint)."""
        return self.previous.data_version if self.same and self.previous else None

    def marker_summary(self) -> dict[str, Any]:
        """What this module needs in the commit marker: the tar digest, and for a shard read again, whether
        it was unchanged."""
        return {TAR_DIGEST: self.tar, **({UNCHANGED: self.same} if self.previous is not None else {})}


def ingest_and_write(layout: Layout, source: EmbeddingSource, settings: PipelineSettings, shard: str) -> Ingested:
    """Ingest ``shard`` with ``source`` and write its ``samples`` and
    ``problems`` tables, unless it was read again and is :func:`unchanged`
    (then they stay, and its staged pairs go).  Safe in a thread."""
    previous = last_commit(layout, "raw_metadata", shard)  # dbprune run set it aside
    try:
        result, err = source.ingest(layout.pool, shard, settings, layout.home), None
    except ShardError as e:
        result, err = failed_ingest(shard, e), e
    tar = tar_digest(layout.shard_tar(shard))
    same = previous is not None and unchanged(layout, result, tar, previous.summary)
    if same:
        drop_staged(layout, shard)
    else:
        forget_last_commit(layout, "raw_metadata", shard)  # before the tables it names change
        write_parquet(layout.table("samples", shard), result.samples, layout.tmp)
        write_parquet(layout.table("problems", shard), result.problems, layout.tmp)
    counts = sorted(result.samples["status"].value_counts().iter_rows(), key=lambda kv: (-kv[1], kv[0]))
    return Ingested(result, err, Counter(dict(counts)), tar, previous, same)


def reread_line(layout: Layout, shards: list[str]) -> str | None:
    """What ``dbprune run`` says after ingesting ``shards`` when some had been ingested before."""
    seen = [st.summary[UNCHANGED] for sh in shards
            if (st := read_state(layout, "raw_metadata", sh)) and UNCHANGED in st.summary]
    if not seen:
        return None
    same = sum(seen)
    parts = ([f"{same} unchanged (the same rows, tar bytes and stored pairs: what follows them is kept)"]
             if same else []) + ([f"{len(seen) - same} changed"] if len(seen) > same else [])
    return f"  {len(seen)} of them read again: {', '.join(parts)}"
