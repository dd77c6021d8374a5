"""SemDeDup and the CLIP-score filter: ``dedup_centroids``, ``dedup_assignments``,
``semantic_dedup``, ``candidates`` (DESIGN.md, method steps 1 and 2)."""


from typing import Iterator

import dagster as dg
import numpy as np

from ..core.atomic import write_parquet
from ..core.catalog import SCHEMAS as CATALOG_TABLES
from ..core.layout import Layout
from .common import GRAPH, DbpruneResource, Session, shard_partitions, torch_device, use_gpu
from .embedding import embeddings
from .ingest import pool_manifest
from .ui import image_md, md_table, png_bytes

ALL_SHARDS = dg.AllPartitionMapping()


def centroid_frame(centroids: np.ndarray):
    import polars as pl

    return pl.DataFrame({
        "cluster": np.arange(len(centroids), dtype=np.int32),
        "vector": [row.tolist() for row in centroids.astype(np.float32)],
    }, schema={"cluster": pl.Int32, "vector": pl.List(pl.Float32)})


def read_centroids(layout: Layout, table: str) -> np.ndarray:
    import polars as pl

    path = layout.table(table)
    if not path.exists():
        raise dg.Failure(f"{path} is missing: materialise {table} first")
    frame = pl.read_parquet(path).sort("cluster")
    return np.asarray(frame["vector"].to_list(), dtype=np.float32)


def shard_embeddings(layout: Layout, shard: str) -> tuple["object", np.ndarray]:
    """(metadata frame, img_emb memmap) of one shard, rows aligned."""
    import polars as pl

    meta_path, emb_path = layout.emb_metadata(shard), layout.img_emb(shard)
    if not meta_path.exists() or not emb_path.exists():
        raise dg.Failure(f"shard {shard}: embeddings missing ({emb_path}); materialise embeddings for it first")
    meta = pl.read_parquet(meta_path)
    emb = np.load(emb_path, mmap_mode="r")
    if emb.shape[0] != meta.height:
        raise dg.Failure(f"shard {shard}: {emb_path} has {emb.shape[0]} rows but its metadata {meta.height}; "
                         "re-materialise embeddings for this shard")
    return meta, emb


def sample_chunks(layout: Layout, shards: list[str], table: str | None) -> Iterator[tuple[np.ndarray, object, str]]:
    """(uids, row loader, shard) per shard, for the bounded uniform sample.

    ``table=None``: every ``ok`` sample with an embedding; else the rows listed
    in ``tables/<table>/<shard>.parquet`` (uid, emb_row).
    """
    import polars as pl

    for shard in shards:
        meta, emb = shard_embeddings(layout, shard)
        if table is None:
            uids, rows = meta["uid"].to_numpy(), np.arange(meta.height)
        else:
            sel = pl.read_parquet(layout.table(table, shard), columns=["uid", "emb_row"])
            uids, rows = sel["uid"].to_numpy(), sel["emb_row"].to_numpy().astype(np.int64)
        yield uids, (lambda idx, e=emb, r=rows: np.asarray(e[r[idx]])), shard


def fit_centroids(s: Session, asset: str, source: str | None, k: int, niter: int, sample_size: int, seed: int,
                  what: str) -> dg.MaterializeResult:
    """Spherical k-means on a bounded uniform sample of ``source``'s rows (every
    ok sample when None), written as ``tables/<asset>/all.parquet``."""
    from ..core.kmeans import UniformSample, spherical_kmeans

    sample = UniformSample(sample_size, seed)
    for uids, loader, shard in sample_chunks(s.layout, s.shards, source):
        sample.add(uids, loader, name=f"shard {shard}")
    cent = spherical_kmeans(sample.embeddings, k, niter, seed, use_gpu(s.settings.compute.device),
                            threads=s.settings.compute.threads, what=what)
    write_parquet(s.layout.table(asset), centroid_frame(cent), s.layout.tmp)
    if asset in CATALOG_TABLES:  # DBP's centroids are a catalog view; SemDeDup's are not
        s.refresh_catalog(asset)
    st = s.commit(asset, summary={"k": len(cent), "sample": len(sample), "rows": sample.seen})
    return dg.MaterializeResult(
        data_version=dg.DataVersion(st.data_version),
        metadata={"k": len(cent), "sample_size": len(sample), "rows_sampled_from": sample.seen,
                  "seconds": s.elapsed()},
    )


@dg.asset(
    deps=[pool_manifest, dg.AssetDep(embeddings, partition_mapping=ALL_SHARDS)],
    group_name="semdedup",
    kinds={"faiss", "parquet"},
    code_version=GRAPH["dedup_centroids"].code,
    description="SemDeDup's spherical k-means (semdedup.dedup_k clusters) on a bounded uniform sample of the ok "
                "samples' image embeddings. Writes tables/dedup_centroids/all.parquet.",
)
def dedup_centroids(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    s = dbprune.session(context)
    cfg = s.settings.semdedup
    return fit_centroids(s, "dedup_centroids", None, cfg.dedup_k, cfg.niter, cfg.sample_size, cfg.seed,
                         "ok image embeddings")


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[embeddings, dedup_centroids],
    group_name="semdedup",
    kinds={"faiss", "parquet"},
    code_version=GRAPH["dedup_assignments"].code,
    description="Each ok sample's SemDeDup cluster and cosine distance to its centroid. "
                "Writes tables/dedup_assignments/<shard>.parquet.",
)
def dedup_assignments(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import polars as pl

    from ..core.kmeans import nearest_centroid

    s = dbprune.session(context)
    cent = read_centroids(s.layout, "dedup_centroids")
    total = 0
    for shard in context.partition_keys:
        meta, emb = shard_embeddings(s.layout, shard)
        cluster, dist = nearest_centroid(np.asarray(emb), cent, use_gpu=use_gpu(s.settings.compute.device),
                                         threads=s.settings.compute.threads, what=f"shard {shard}",
                                         uids=meta["uid"].to_numpy())
        frame = pl.DataFrame({"uid": meta["uid"], "shard": meta["shard"], "row": meta["row"].cast(pl.Int32),
                              "cluster": cluster.astype(np.int32), "distance": dist.astype(np.float32)})
        write_parquet(s.layout.table("dedup_assignments", shard), frame, s.layout.tmp)
        s.commit("dedup_assignments", shard, {"rows": frame.height})
        total += frame.height
    return dg.MaterializeResult(metadata={"rows": total, "shards": len(context.partition_keys), "seconds": s.elapsed()})


def _duplicate_examples(layout: Layout, pairs: list[tuple[str, str, str, str]]) -> bytes | None:
    """Image grid of (duplicate, kept original) pairs: shard/uid of each."""
    import polars as pl

    from ..core.shards import iter_shard_images

    if not pairs:
        return None
    wanted: dict[str, set[str]] = {}
    uid_key: dict[str, tuple[str, str]] = {}
    for uid, shard, other, other_shard in pairs:
        for u, sh in ((uid, shard), (other, other_shard)):
            samples = pl.read_parquet(layout.table("samples", sh), columns=["uid", "key"])
            key = samples.filter(pl.col("uid") == u)["key"]
            if len(key):
                uid_key[u] = (sh, key[0])
                wanted.setdefault(sh, set()).add(key[0])
    images: dict[tuple[str, str], bytes] = {}
    for sh, keys in wanted.items():
        for key, data in iter_shard_images(layout.shard_tar(sh), keys):
            images[(sh, key)] = data
    rows = []
    for uid, _, other, _ in pairs:
        a, b = images.get(uid_key.get(uid, ("", ""))), images.get(uid_key.get(other, ("", "")))
        if a is not None and b is not None:
            rows.append((f"{uid[:8]} ≈ {other[:8]}", [a, b]))
    from .ui import image_grid

    return image_grid(rows) if rows else None


@dg.asset(
    deps=[pool_manifest, dg.AssetDep(dedup_assignments, partition_mapping=ALL_SHARDS)],
    group_name="semdedup",
    kinds={"pytorch", "parquet"},
    code_version=GRAPH["semantic_dedup"].code,
    description="SemDeDup duplicates: inside each dedup cluster, members in farthest-first order; member j is a "
                "duplicate when max_{i<j} cos(x_i, x_j) > 1 - eps (pairwise, computed in column tiles). "
                "Writes tables/duplicates/all.parquet (uid, shard, duplicate_of, similarity).",
)
def semantic_dedup(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import polars as pl
    import pyarrow.parquet as pq

    from ..core.atomic import atomic_path
    from ..core.semdedup import DedupShard, empty_duplicates, semdedup_pool

    s = dbprune.session(context)
    cfg = s.settings.semdedup
    k = len(read_centroids(s.layout, "dedup_centroids"))

    def load(name: str) -> DedupShard:
        meta, emb = shard_embeddings(s.layout, name)
        a = pl.read_parquet(s.layout.table("dedup_assignments", name))
        if a.height != meta.height:
            raise dg.Failure(f"shard {name}: dedup_assignments out of date ({a.height} rows, embeddings "
                             f"{meta.height}); re-materialise dedup_assignments for it")
        return DedupShard(name, meta["uid"].to_numpy(), emb, a["cluster"].to_numpy(), a["distance"].to_numpy())

    n_dup = 0
    per_cluster: dict[int, int] = {}
    examples: list[tuple[str, str, str, str]] = []
    sims: list[np.ndarray] = []
    with atomic_path(s.layout.table("duplicates"), s.layout.tmp) as tmp:
        writer = None
        try:
            sizes = np.zeros(k, np.int64)  # from the cluster column alone: no extra pass over embeddings
            for shard in s.shards:
                col = pl.read_parquet(s.layout.table("dedup_assignments", shard), columns=["cluster"])["cluster"]
                sizes += np.bincount(col.to_numpy(), minlength=k)[:k]
            for frame in semdedup_pool(s.shards, load, k, cfg.eps, s.settings.compute.tile, s.layout.tmp,
                                       torch_device(s.settings.compute.device), cluster_sizes=sizes):
                if frame.height == 0:
                    continue
                table = frame.to_arrow()
                writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
                n_dup += frame.height
                for c, cnt in frame.group_by("cluster").len().iter_rows():
                    per_cluster[int(c)] = per_cluster.get(int(c), 0) + int(cnt)
                if len(examples) < 6:
                    examples += list(frame.select("uid", "shard", "duplicate_of", "duplicate_of_shard")
                                     .head(6 - len(examples)).iter_rows())
                sims.append(frame["similarity"].to_numpy())
            if writer is None:
                empty_duplicates().write_parquet(tmp)
        finally:
            if writer is not None:
                writer.close()
    s.refresh_catalog("duplicates")
    ok = sum(pl.read_parquet(s.layout.emb_metadata(sh), columns=["uid"]).height for sh in s.shards)
    metadata: dict[str, object] = {
        "duplicates": n_dup, "ok_samples": ok, "kept_fraction": round(1 - n_dup / ok, 4) if ok else 1.0,
        "eps": cfg.eps, "dedup_k": k, "seconds": s.elapsed(),
        "clusters_with_most_duplicates": dg.MetadataValue.md(md_table(
            [{"cluster": c, "duplicates": n} for c, n in sorted(per_cluster.items(), key=lambda kv: -kv[1])[:15]])),
    }
    if sims:
        allsims = np.concatenate(sims)

        def draw(fig):
            ax = fig.add_subplot(111)
            ax.hist(allsims, bins=40)
            ax.axvline(1 - cfg.eps, color="red", ls="--", label=f"1 - eps = {1 - cfg.eps:.3f}")
            ax.set_xlabel("similarity to the member it duplicates")
            ax.legend()

        art = s.layout.artefact_dir("semantic_dedup")
        metadata["similarity_histogram"] = image_md(png_bytes(draw, (6, 3)), "duplicate similarities",
                                                    art / "similarity.png", s.layout.tmp)
        try:
            grid = _duplicate_examples(s.layout, examples)
            if grid:
                metadata["example_pairs"] = image_md(grid, "removed duplicate (left) and the member it duplicates",
                                                     art / "pairs.png", s.layout.tmp)
        except Exception as err:
            context.log.warning(f"could not draw duplicate examples: {err}")
    st = s.commit("semantic_dedup", summary={"duplicates": n_dup, "ok": ok})
    return dg.MaterializeResult(data_version=dg.DataVersion(st.data_version), metadata=metadata)


@dg.asset(
    deps=[pool_manifest, dg.AssetDep(embeddings, partition_mapping=ALL_SHARDS), semantic_dedup],
    group_name="semdedup",
    kinds={"duckdb", "parquet"},
    code_version=GRAPH["candidates"].code,
    description="Candidates: dedup survivors whose clip_score passes the CLIP filter (an absolute "
                "clip_filter.threshold, or the top clip_filter.fraction as a global quantile). "
                "Writes tables/candidates/<shard>.parquet; the threshold used is in the metadata.",
)
def candidates(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import polars as pl

    from ..core.candidates import select_candidates

    s = dbprune.session(context)
    cfg = s.settings.clip_filter
    metas = {sh: s.layout.emb_metadata(sh) for sh in s.shards}
    summary = select_candidates(metas, [s.layout.table("duplicates")], s.layout.table_dir("candidates"),
                                s.layout.tmp, cfg.threshold, cfg.fraction, threads=s.settings.compute.threads)
    # files of shards that left the pool go with them
    for f in s.layout.table_dir("candidates").glob("*.parquet"):
        if f.stem not in metas:
            f.unlink()
    scores = np.concatenate([pl.read_parquet(p, columns=["clip_score"])["clip_score"].to_numpy() for p in metas.values()]
                            ) if metas else np.zeros(0)

    def draw(fig):
        ax = fig.add_subplot(111)
        ax.hist(scores, bins=50, color="tab:blue", alpha=0.8, label="all ok samples")
        if np.isfinite(summary.threshold):
            ax.axvline(summary.threshold, color="red", ls="--", label=f"threshold {summary.threshold:.3f}")
        ax.set_xlabel("clip_score = cos(image, text)")
        ax.legend()

    st = s.commit("candidates", summary={"threshold": summary.threshold, "candidates": summary.candidates,
                                         "survivors": summary.survivors, "ok": summary.ok})
    return dg.MaterializeResult(
        data_version=dg.DataVersion(st.data_version),
        metadata={
            "threshold": summary.threshold, "rule": "threshold" if cfg.threshold is not None else f"top {cfg.fraction}",
            "ok_samples": summary.ok, "duplicates": summary.duplicates, "dedup_survivors": summary.survivors,
            "candidates": summary.candidates, "removed_low_clip_score": summary.survivors - summary.candidates,
            "clip_score_histogram": image_md(png_bytes(draw, (6, 3)), "clip scores",
                                             s.layout.artefact_dir("candidates") / "clip_scores.png", s.layout.tmp),
            "seconds": s.elapsed(),
        },
    )
