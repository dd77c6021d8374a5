"""Commit markers and fingerprints: what makes runs resumable and skippable.

Every materialised partition ends by writing ``state/<asset>/<partition>.json``
*after* its outputs were renamed into place.  The marker holds the partition's
``fingerprint`` (hash of the code version, the settings sections it reads and
its upstream data versions) and its ``data_version``.  A partition is up to
date when its marker exists and its fingerprint equals the one computed from
the current settings and upstream markers; a crash before the marker is
written leaves it out of date, so the next run simply redoes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dbprune_assets.core.store.atomic import remove, write_json
from dbprune_assets.core.store.layout import Layout


def stable_hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass(frozen=True)
class State:
    fingerprint: str
    data_version: str
    summary: Mapping[str, Any] = field(default_factory=dict)


def read_state(layout: Layout, asset: str, partition: str) -> State | None:
    return _read_marker(layout.state(asset, partition))


def _read_marker(path: Path) -> State | None:
    try:
        data = json.loads(path.read_text())
        return State(data["fingerprint"], data["data_version"], data.get("summary", {}))
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def _set_aside(marker: Path) -> Path:
    return marker.with_name(marker.name + ".was")


def write_state(layout: Layout, asset: str, partition: str, state: State) -> None:
    write_json(
        layout.state(asset, partition),
        {"fingerprint": state.fingerprint, "data_version": state.data_version, "summary": dict(state.summary)},
        tmp_root=layout.tmp,
    )
    remove(_set_aside(layout.state(asset, partition)))


def clear_state(layout: Layout, asset: str, partition: str) -> None:
    """Drop the partition's commit marker before it is redone, so a crash half
    way leaves it out of date.  The marker is set aside (``<partition>.json.was``)
    until the partition commits again: :func:`last_commit` reads it."""
    marker = layout.state(asset, partition)
    try:
        os.replace(marker, _set_aside(marker))
    except FileNotFoundError:
        pass


def last_commit(layout: Layout, asset: str, partition: str) -> State | None:
    """The commit marker the partition's outputs on disk were made with: its
    marker, or the one :func:`clear_state` set aside for the run redoing it.  A
    step that uses it (to keep a data version when it makes the same outputs
    again, ``core/pool/reingest.py``) calls :func:`forget_last_commit` before
    it replaces any output, so the marker never outlives the outputs it names."""
    return read_state(layout, asset, partition) or _read_marker(_set_aside(layout.state(asset, partition)))


def forget_last_commit(layout: Layout, asset: str, partition: str) -> None:
    """Drop the set-aside marker of :func:`last_commit` (the outputs are about to change)."""
    remove(_set_aside(layout.state(asset, partition)))


def combine_versions(versions: Mapping[str, str | None]) -> str:
    """One version for a set of partitions (missing ones count as such)."""
    return stable_hash(sorted((k, v or "missing") for k, v in versions.items()))


def file_signature(path: Path) -> str:
    """Cheap identity of an input file: size and modification time (ns)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "absent"
    return f"{st.st_size}:{st.st_mtime_ns}"


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (streamed: memory stays flat), or ``"absent"``.
    Unlike :func:`file_signature`, a copy or ``touch`` leaves it as it was."""
    try:
        with open(path, "rb", buffering=0) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return "absent"


def ingested_statuses(layout: Layout, shards: Sequence[str]) -> dict[str, int] | None:
    """Rows per status of the ingested ``shards`` (raw_metadata's commit
    markers; a shard that failed counts its cause as ``failed``); None while a
    shard is not ingested."""
    total: dict[str, int] = {}
    for shard in shards:
        st = read_state(layout, "raw_metadata", shard)
        if st is None:
            return None
        for status, n in st.summary.get("status", {}).items():
            total[status] = total.get(status, 0) + int(n)
        if "failed" in st.summary:
            total["failed"] = total.get("failed", 0) + 1
    return total


#: what to check when a whole pool has no ok sample, by its commonest status
NOTHING_USABLE = {
    "missing_in_tar": "the shards' tars are missing: point DBPRUNE_POOL at img2dataset output (NNNNN.tar beside "
                      "NNNNN.parquet), or for DataComp metadata put each <stem>.npz beside its parquet",
    "no_embedding": "the embedding source has no row for any sample (DataComp: each <stem>.npz beside its "
                    "parquet; clip-retrieval: embeddings.path); the problems table says what is missing",
    "failed_download": "img2dataset downloaded nothing: check its output (its NNNNN_stats.json files)",
    "failed": "no shard could be read: see the causes in the problems table (dbprune sql \"SELECT * FROM problems\")",
}


def nothing_usable(layout: Layout, shards: Sequence[str]) -> str | None:
    """Why a pool has no ``ok`` sample to prune, with what to check; None when
    it has some (or is not ingested yet)."""
    statuses = ingested_statuses(layout, shards)
    if statuses is None or statuses.get("ok", 0) > 0:
        return None
    if not shards:
        return f"{layout.pool} holds no shard (no *.parquet at its top level)"
    commonest = max(statuses, key=lambda k: statuses[k]) if statuses else "failed"
    hint = NOTHING_USABLE.get(commonest, "see the problems table (dbprune sql \"SELECT * FROM problems\")")
    failed = next(((s, st.summary["failed"]) for s in shards
                   if (st := read_state(layout, "raw_metadata", s)) and "failed" in st.summary), None)
    if commonest == "failed" and failed is not None:
        hint = f"no shard could be read, e.g. {failed[0]}: {failed[1]}"
    return (f"the pool {layout.pool} has no usable sample: {len(shards)} shard(s), rows by status "
            f"{dict(sorted(statuses.items()))}; {hint}")


def ingested_ok(layout: Layout, shards: Sequence[str]) -> int | None:
    """The ``ok`` rows of the ingested ``shards`` (from raw_metadata's commit
    markers, before the cross-shard uid rule, so at most the pool's ``ok``
    count); None while a shard is not ingested."""
    total = 0
    for shard in shards:
        st = read_state(layout, "raw_metadata", shard)
        if st is None:
            return None
        total += int(st.summary.get("status", {}).get("ok", 0))
    return total

