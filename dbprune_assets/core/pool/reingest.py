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
follows it runs, as before.  Nothing here imports Dagster.
"""

from __future__ import annotations

import filecmp
import hashlib
from pathlib import Path
from typing import Any, Mapping

import polars as pl

from dbprune_assets.core.pool.shards import ShardIngest
from dbprune_assets.core.store.atomic import remove
from dbprune_assets.core.store.layout import Layout

#: the commit-marker summary keys: the tar's digest; whether the ingest found the shard as it was
TAR_DIGEST = "tar"
UNCHANGED = "unchanged"
_CHUNK = 1 << 22


def tar_digest(path: Path) -> str:
    """The sha256 of the file's bytes, or ``"absent"`` without one (a DataComp
    metadata shard has no tar).  Read in 4 MiB blocks: memory stays flat."""
    try:
        with open(path, "rb", buffering=0) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return "absent"


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


def unchanged_shards(layout: Layout, shards: list[str]) -> list[str]:
    """Those of ``shards`` whose last ingest found them as they were (its marker says so)."""
    from dbprune_assets.core.store.state import read_state

    return [sh for sh in shards if (st := read_state(layout, "raw_metadata", sh)) and st.summary.get(UNCHANGED)]


def unchanged_line(layout: Layout, shards: list[str]) -> str | None:
    """What ``dbprune run`` says after ingesting ``shards`` when some were read again unchanged."""
    same = unchanged_shards(layout, shards)
    if not same:
        return None
    return (f"  {len(same)} of them read again (their files' size or time changed), unchanged: the same rows, "
            "tar bytes and stored pairs, so what follows them is kept")
