"""Fitted clusters on a growing pool: what a fit saw, when it is kept, and imports.

Each k-means fit (``dedup_centroids``, ``centroids``) writes beside its
centroids a **fit record**, ``fits/<asset>.json`` under the home: the shards
it was fitted on (with their embeddings' data versions), its k, the digest of
its centroids, what it is made of besides the shards (``fit_of``: its own and
every upstream asset's code and settings, the encoder's data version), the
drift profile of 50,000 rows it did not train on
(:mod:`~dbprune_assets.core.method.drift`) and, for an imported fit, the
home it came from.  The record is removed before a new fit writes its
centroids and written after, and a record is only believed when the
centroids table has its digest.  Once a fit exists it is **kept** across
pool changes (:func:`holds`), so added shards are assigned to the clusters
the pool already has instead of refitting everything, under the ``refit``
setting:

* ``always``: never kept: the fit is redone whenever its inputs change (the
  pool, the candidates), as a first run does;
* ``never``: kept while ``fit_of`` is the one it was made with;
* ``auto`` (default): kept as with ``never`` until the drift alarm fires over
  the shards added since the fit (their assignments against it; a shard
  re-embedded since counts as added).

``centroids_from`` (``dbprune run --centroids-from HOME``) takes both fits
from another home whose embeddings share this home's encoder: the centroids
and the fit record are copied (:func:`import_fit`), so a fresh home given the
same grown pool decides exactly as the home that grew incrementally.
Nothing here knows of Dagster.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from dbprune_assets.core.method.drift import FitProfile, ShardDrift, Verdict, shard_drift, verdict
from dbprune_assets.core.method.embstore import MIN_HELD_OUT, PROFILE_ROWS, fit_id, read_centroids  # noqa: F401
from dbprune_assets.core.store.atomic import atomic_path
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout
from dbprune_assets.core.store.state import file_signature, stable_hash

if TYPE_CHECKING:
    from dbprune_assets.core.settings import PipelineSettings



class FitImportError(ValueError):
    """``centroids_from`` names a home without the fit (the message says which file and what to do)."""


@dataclass(frozen=True)
class FitRecord:
    """One fit: its centroid asset, k, drift profile, the shards it saw with
    their embeddings' data versions, and its origin (None: fitted here)."""

    asset: str
    k: int
    profile: FitProfile
    shards: tuple[str, ...]
    origin: str | None = None
    fit_id: str = ""  #: a digest of the centroids: the fit's data version
    fit_of: str = ""  #: what it is made of besides the shards (``Versions.fit_of``) when it was made
    imported: str = ""  #: for an imported fit, :func:`import_signature` of its source
    versions: tuple[str, ...] = ()  #: each shard's embeddings data version, aligned with ``shards``
    encoder: str = ""  #: the encoder's data version: the embedding space the fit lives in
    profile_kind: str = "held_out"  #: rows the fit never saw, or ``training`` rows (a small pool)

    def to_json(self) -> str:
        return json.dumps({"asset": self.asset, "k": self.k, "profile": self.profile.as_dict(),
                           "shards": list(self.shards), "origin": self.origin, "fit_id": self.fit_id,
                           "fit_of": self.fit_of, "imported": self.imported, "versions": list(self.versions),
                           "encoder": self.encoder, "profile_kind": self.profile_kind})

    @classmethod
    def from_json(cls, text: str) -> "FitRecord":
        d = json.loads(text)
        return cls(d["asset"], int(d["k"]), FitProfile(**d["profile"]), tuple(d["shards"]), d.get("origin"),
                   d.get("fit_id", ""), d.get("fit_of", ""), d.get("imported", ""), tuple(d.get("versions", ())),
                   d.get("encoder", ""), d.get("profile_kind", "held_out"))


def record_path(home: Path, asset: str) -> Path:
    """``<home>/fits/<asset>.json``."""
    return Path(home) / "fits" / f"{asset}.json"


def clear_record(layout: Layout, asset: str) -> None:
    """Remove this home's fit record: first, before a new fit's centroids are
    written, so a crash in between never pairs new centroids with an old record."""
    from dbprune_assets.core.store.atomic import remove

    remove(record_path(layout.home, asset))


def shard_versions(layout: Layout, shards: Sequence[str]) -> dict[str, str | None]:
    """Each shard's ``embeddings`` data version (its commit marker's; None when not embedded)."""
    from dbprune_assets.core.store.state import read_state

    return {s: (st.data_version if (st := read_state(layout, "embeddings", s)) else None) for s in shards}


def write_record(layout: Layout, record: FitRecord) -> None:
    with atomic_path(record_path(layout.home, record.asset), layout.tmp) as tmp:
        tmp.write_text(record.to_json())


def read_record(home: Path, asset: str) -> FitRecord | None:
    try:
        return FitRecord.from_json(record_path(home, asset).read_text())
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def added_since(record: FitRecord, shards: Sequence[str], versions: Mapping[str, str | None] | None = None) -> list[str]:
    """The pool's shards the fit did not see, in pool order: not among its
    shards, or (given their embeddings' data ``versions`` now) re-embedded since."""
    seen = dict(zip(record.shards, record.versions)) if record.versions else dict.fromkeys(record.shards)
    return [s for s in shards if s not in seen
            or (versions is not None and seen[s] is not None and versions.get(s) != seen[s])]


def drift_of(layout: Layout, record: FitRecord, shards: Sequence[str], table: str, factor: float,
             min_samples: int) -> tuple[Verdict, list[ShardDrift]]:
    """The alarm over the shards added since the fit that have their
    assignments in ``table`` (``tables/<table>/<shard>.parquet``), and each one's numbers."""
    import polars as pl

    per = []
    for shard in added_since(record, shards, shard_versions(layout, shards)):
        path = layout.table(table, shard)
        if path.exists():
            per.append(shard_drift(shard, pl.read_parquet(path, columns=["distance"])["distance"].to_numpy(),
                                   record.profile))
    return verdict(record.profile, per, factor, min_samples), per


def import_signature(home: str | Path, asset: str) -> str:
    """What an imported fit is of: the other home's centroids and fit record, by path and signature."""
    src = Path(home).expanduser().resolve()
    return stable_hash([str(src), file_signature(src / "tables" / asset / f"{UNPARTITIONED}.parquet"),
                        file_signature(record_path(src, asset))])


def import_fit(layout: Layout, home: str | Path, asset: str, fit_of: str, encoder: str) -> FitRecord:
    """Copy ``asset``'s centroids and fit record from another home into this
    one; returns the record (its origin is that home; ``fit_of``: this home's).
    A home without them, or whose embeddings come from another encoder
    (``encoder``: this home's encoder data version), is an error naming the
    file or the versions and what to do."""
    src = Path(home).expanduser().resolve()
    table = src / "tables" / asset / f"{UNPARTITIONED}.parquet"
    record = read_record(src, asset)
    for path, what in ((table, "centroids"), (record_path(src, asset), "fit record")):
        if not path.is_file() or (what == "fit record" and record is None):
            raise FitImportError(f"centroids_from: {path} is missing or unreadable: {src} has no {asset} {what}; "
                               "run dbprune run there first (a home made before fit records existed needs "
                               "dbprune run --refit always once), or drop --centroids-from")
    assert record is not None
    if record.encoder and record.encoder != encoder:
        raise FitImportError(f"centroids_from: {src}'s {asset} lives in another embedding space (its encoder's "
                             f"data version {record.encoder}, this home's {encoder}): its clusters would not "
                             "mean anything here; use the same encoder or embeddings.model in both homes")
    clear_record(layout, asset)
    with atomic_path(layout.table(asset), layout.tmp) as tmp:
        shutil.copyfile(table, tmp)
    imported = FitRecord(asset, record.k, record.profile, record.shards, str(src), record.fit_id, fit_of,
                         import_signature(src, asset), record.versions, record.encoder, record.profile_kind)
    write_record(layout, imported)
    return imported


def _centroids_match(layout: Layout, record: FitRecord) -> bool:
    """The centroids table is the one the record describes (a fit cut short leaves no record; still, check)."""
    return layout.table(record.asset).is_file() and fit_id(read_centroids(layout, record.asset)) == record.fit_id


def holds(layout: Layout, settings: "PipelineSettings", asset: str, fit_of: str, shards: Sequence[str],
          table: str) -> bool:
    """Whether this home's fit of ``asset`` is kept although its inputs
    changed (module docstring).  ``fit_of``: the digest of what it is made of
    besides the shards, now (its code, its own and upstream settings, the
    encoder); ``table``: its assignments, for the drift alarm.  What the fit
    was made of is in its record, which outlives the commit marker a re-run
    clears first."""
    record = read_record(layout.home, asset)
    if record is None or record.fit_of != fit_of or not record.fit_id or not _centroids_match(layout, record):
        return False
    source = settings.centroids_from
    if source:  # another home's fit: kept while it is the one imported
        return record.imported == import_signature(source, asset)
    if settings.refit == "always":
        return False
    if settings.refit == "never":
        return True
    return not drift_of(layout, record, shards, table, settings.drift.factor, settings.drift.min_samples)[0].fires
