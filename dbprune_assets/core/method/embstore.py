"""The stored embeddings as both clusterings read them: per-shard embeddings,
centroid tables, the bounded k-means sample and the per-shard assignment.

SemDeDup clusters every ``ok`` sample (``dedup_centroids`` →
``dedup_assignments``); DBP clusters the candidates (``centroids`` →
``assignments`` + ``cluster_sums``).  Both are the same three moves over the
clip-retrieval layout (``embeddings/{img_emb,metadata}/<shard>``): fit
spherical k-means on a bounded uniform sample, write the centroids as a table,
then assign each shard to its nearest centroid.  See ``docs/design.md``
(method steps 1 and 3, and "Principles": no stage holds every embedding).

polars and faiss are imported inside the functions: the Dagster code location
imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from dbprune_assets.core.store.atomic import write_parquet
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.running.parallel import ordered_map
from dbprune_assets.core.running.progress import progress

if TYPE_CHECKING:
    import polars as pl

    from dbprune_assets.core.method.drift import FitProfile

    from dbprune_assets.core.running.device import KmeansBackend


#: rows whose distances to a fit make its drift profile (``fitrecord.py``): the
#: next rows of the uniform sample after the k-means training rows, which the fit did not see
PROFILE_ROWS = 50_000
#: fewer held-out rows than this and the training rows make the profile (recorded as such)
MIN_HELD_OUT = 1_000


def fit_id(centroids: np.ndarray) -> str:
    """A digest of the centroid values (float32 bytes)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes()).hexdigest()[:16]


class MissingInput(RuntimeError):
    """An upstream table or file is missing or out of date; the message names it
    and what to materialise."""


def centroid_frame(centroids: np.ndarray) -> "pl.DataFrame":
    """The centroid table: ``cluster`` (Int32) and ``vector`` (List[Float32])."""
    import polars as pl

    from dbprune_assets.core.store.duck import polars_schema

    return pl.DataFrame({
        "cluster": np.arange(len(centroids), dtype=np.int32),
        "vector": [row.tolist() for row in centroids.astype(np.float32)],
    }, schema=polars_schema("centroids"))


def read_centroids(layout: Layout, table: str) -> np.ndarray:
    """Unit centroids (k, d) float32 of ``tables/<table>/all.parquet``, by cluster id."""
    import polars as pl

    path = layout.table(table)
    if not path.exists():
        raise MissingInput(f"{path} is missing: materialise {table} first")
    frame = pl.read_parquet(path).sort("cluster")
    return np.asarray(frame["vector"].to_list(), dtype=np.float32)


def shard_embeddings(layout: Layout, shard: str) -> tuple["pl.DataFrame", np.ndarray]:
    """(metadata frame, img_emb memmap) of one shard, rows aligned."""
    import polars as pl

    meta_path, emb_path = layout.emb_metadata(shard), layout.img_emb(shard)
    if not meta_path.exists() or not emb_path.exists():
        raise MissingInput(f"shard {shard}: embeddings missing ({emb_path}); materialise embeddings for it first")
    meta = pl.read_parquet(meta_path)
    emb = np.load(emb_path, mmap_mode="r")
    if emb.shape[0] != meta.height:
        raise MissingInput(f"shard {shard}: {emb_path} has {emb.shape[0]} rows but its metadata {meta.height}; "
                           "re-materialise embeddings for this shard")
    return meta, emb


def _selected_rows(layout: Layout, shard: str, meta: "pl.DataFrame", selection: str | None) -> "pl.DataFrame":
    """uid, shard, row, emb_row of the shard's rows to use: every embedded
    (``ok``) sample when ``selection`` is None, else those listed in
    ``tables/<selection>/<shard>.parquet``."""
    import polars as pl

    if selection is None:
        return meta.select("uid", "shard", "row", emb_row=pl.int_range(meta.height, dtype=pl.Int64))
    path = layout.table(selection, shard)
    if not path.exists():
        raise MissingInput(f"shard {shard}: {path} is missing; materialise {selection} first")
    return pl.read_parquet(path, columns=["uid", "shard", "row", "emb_row"])


def sample_chunks(layout: Layout, shards: list[str], selection: str | None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray], str]]:
    """(uids, their row numbers in the shard's image embeddings, a reader of
    rows by number, shard) per shard, for :meth:`~.kmeans.UniformSample.add_refs`:
    only the rows k-means uses are ever read.  A uid an earlier shard has
    (:mod:`~.uids`) is not a sample of the pool, so it is not in the k-means
    sample either (the candidates exclude it already)."""
    from dbprune_assets.core.pool.uids import drop_superseded

    for shard in progress(shards, desc="k-means sample", unit="shard"):
        meta, emb = shard_embeddings(layout, shard)
        sel = _selected_rows(layout, shard, meta, selection)
        if selection is None:
            sel = drop_superseded(layout.home / "tables", shard, sel)
        path = layout.img_emb(shard)
        yield (sel["uid"].to_numpy(), sel["emb_row"].to_numpy().astype(np.int64),
               lambda numbers, p=path: np.asarray(np.load(p, mmap_mode="r")[numbers]), shard)


@dataclass(frozen=True)
class CentroidFit:
    k: int
    sample: int  # rows k-means trained on
    seen: int  # rows the sample was drawn from
    profile: "FitProfile"  # the sample's distances to the fit (its drift profile, ``drift.py``)
    fit_id: str  # a digest of the centroids
    profile_kind: str  # "held_out": rows the fit never saw; "training": a pool too small to hold enough out


def fit_centroids(layout: Layout, shards: list[str], out_table: str, selection: str | None,
                  clusters: Callable[[int], int], niter: int, sample_size: int, seed: int,
                  use_gpu: "bool | str | KmeansBackend | None",
                  threads: int, what: str) -> CentroidFit:
    """Spherical k-means on a bounded uniform sample of the selected rows (every
    ok sample when ``selection`` is None), written to ``tables/<out_table>/all.parquet``.

    ``clusters(n)`` gives k for the n selected rows, once the sample has seen
    them all: it resolves ``auto`` and checks an explicit k against n
    (``SemDedupSettings.clusters``, ``DbpSettings.clusters``), raising
    SettingsError that names the setting before k-means starts."""
    from dbprune_assets.core.method.drift import fit_profile
    from dbprune_assets.core.method.kmeans import nearest_centroid, spherical_kmeans, training_subset
    from dbprune_assets.core.method.sample import UniformSample

    # the sample_size rows of smallest (hash, uid) train, as always; the next PROFILE_ROWS, which the fit
    # never saw, measure its distances for the drift alarm (``drift.py``); a pool with fewer than
    # MIN_HELD_OUT rows beyond the sample has its training rows stand in
    sample = UniformSample(sample_size + PROFILE_ROWS, seed)
    for uids, rows, reader, shard in sample_chunks(layout, shards, selection):
        sample.add_refs(uids, rows, reader, name=f"shard {shard}")
    k = clusters(sample.seen)
    n_train = min(sample_size, len(sample))
    # k-means trains on a subset of the training rows (training_subset): only those are read
    subset = training_subset(n_train, k, seed)
    cent = spherical_kmeans(sample.rows(np.arange(n_train) if subset is None else subset), k, niter, seed, use_gpu,
                            threads=threads, max_points_per_centroid=None, what=what)
    write_parquet(layout.table(out_table), centroid_frame(cent), layout.tmp)
    kind = "held_out" if len(sample) - n_train >= MIN_HELD_OUT else "training"
    probe = sample.rows(np.arange(n_train, len(sample)) if kind == "held_out" else np.arange(min(PROFILE_ROWS, n_train)))
    _, dist = nearest_centroid(probe, cent, use_gpu=use_gpu, threads=threads, what=f"{what} (fit profile)")
    return CentroidFit(len(cent), n_train, sample.seen, fit_profile(dist), fit_id(cent), kind)


def assign_shard(layout: Layout, shard: str, centroids: np.ndarray, selection: str | None,
                 use_gpu: "bool | str | KmeansBackend | None", threads: int) -> "pl.DataFrame":
    """Nearest centroid of the shard's selected rows: uid, shard, row (Int32),
    cluster (Int32), distance (Float32, ``1 - x·c``)."""
    import polars as pl

    from dbprune_assets.core.store.duck import polars_schema
    from dbprune_assets.core.method.kmeans import nearest_centroid

    meta, emb = shard_embeddings(layout, shard)
    sel = _selected_rows(layout, shard, meta, selection)
    rows = sel["emb_row"].to_numpy().astype(np.int64)
    if len(rows):
        cluster, dist = nearest_centroid(np.asarray(emb[rows]), centroids, use_gpu=use_gpu, threads=threads,
                                         what=f"shard {shard}" + (f" {selection}" if selection else ""),
                                         uids=sel["uid"].to_numpy())
    else:
        cluster, dist = np.zeros(0, np.int32), np.zeros(0, np.float32)
    frame = pl.DataFrame({"uid": sel["uid"], "shard": sel["shard"], "row": sel["row"],
                          "cluster": cluster, "distance": dist})
    return frame.cast(polars_schema("assignments"))


def partial_sums_frame(frame: "pl.DataFrame", k: int) -> "pl.DataFrame":
    """Per-cluster (count, sum of distances) of one shard's assignments, for d_intra."""
    import polars as pl

    from dbprune_assets.core.method.dbp import cluster_partial_sums

    count, sums = cluster_partial_sums(frame["cluster"].to_numpy(), frame["distance"].to_numpy(), k)
    return pl.DataFrame({"cluster": np.arange(k, dtype=np.int32), "count": count.astype(np.int64),
                         "sum_distance": sums.astype(np.float64)})


def assign_shards(layout: Layout, shards: list[str], centroid_table: str, out_table: str, selection: str | None,
                  use_gpu: "bool | str | KmeansBackend | None", threads: int, sums_table: str | None = None,
                  parallel: int = 1) -> Iterator[tuple[str, int]]:
    """Assign each shard (``tables/<out_table>/<shard>.parquet``, plus per-cluster
    partial sums in ``sums_table`` when given), ``parallel`` shards at a time
    with ``threads`` each; yields (shard, rows) in shard order, after each
    shard's files are in place."""
    cent = read_centroids(layout, centroid_table)

    def one(shard: str) -> int:
        frame = assign_shard(layout, shard, cent, selection, use_gpu, threads)
        write_parquet(layout.table(out_table, shard), frame, layout.tmp)
        if sums_table is not None:
            write_parquet(layout.table(sums_table, shard), partial_sums_frame(frame, len(cent)), layout.tmp)
        return frame.height

    yield from progress(ordered_map(one, shards, parallel), desc=out_table, unit="shard", total=len(shards))


def cluster_sizes(layout: Layout, shards: list[str], table: str, k: int) -> np.ndarray:
    """Members per cluster (k,) from the ``cluster`` column of per-shard assignments."""
    import polars as pl

    sizes = np.zeros(k, np.int64)
    for shard in progress(shards, desc=f"{table} sizes", unit="shard"):
        col = pl.read_parquet(layout.table(table, shard), columns=["cluster"])["cluster"].to_numpy()
        sizes += np.bincount(col, minlength=k)[:k]
    return sizes


def summed_partials(layout: Layout, shards: list[str], table: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, sum of distances) per cluster, summed over the shards' partial sums."""
    import polars as pl

    count = np.zeros(k, np.int64)
    sums = np.zeros(k, np.float64)
    for shard in progress(shards, desc=table, unit="shard"):
        part = pl.read_parquet(layout.table(table, shard)).sort("cluster")
        if part.height != k:
            raise MissingInput(f"shard {shard}: {table} has {part.height} clusters, centroids {k}; "
                               "re-materialise cluster_assignments for it")
        count += part["count"].to_numpy()
        sums += part["sum_distance"].to_numpy()
    return count, sums
