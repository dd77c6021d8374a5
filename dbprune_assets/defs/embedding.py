"""The encoder and the per-shard embeddings (image, text, clip_score)."""


import json
from typing import Any

import dagster as dg

from dbprune_assets.core.store.atomic import remove, write_json, write_parquet
from dbprune_assets.core.running.device import torch_device
from dbprune_assets.core.store.layout import Layout, list_pool_shards
from dbprune_assets.core.pool.sources.readers import SourceError
from dbprune_assets.core.running.parallel import ordered_map
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.store.state import file_digest, file_signature
from dbprune_assets.defs.common import Facts, Session, Versions, shard_partitions, stage
from dbprune_assets.defs.ingest import raw_metadata
from dbprune_assets.defs.plots import artefact_md, loss_curve_png, table


def _reference_shards(layout: Layout) -> tuple[list, int, str]:
    """Training data of the bootstrap encoder: the pool's clean reference split,
    else (a user pool) the pool itself, which is said out loud."""
    ref = layout.reference_dir
    sizes = ref / "sizes.json"
    if sizes.is_file():
        counts = json.loads(sizes.read_text())
        return [ref / name for name in sorted(counts)], int(sum(counts.values())), "reference split"
    shards = [layout.shard_tar(s) for s in list_pool_shards(layout.pool) if layout.shard_tar(s).exists()]
    if not shards:
        raise dg.Failure(f"no reference split ({sizes}) and no pool tars in {layout.pool} to train the bootstrap "
                         "encoder on; set encoder.cluster_encoder to a pretrained model or a local checkpoint")
    import polars as pl

    n = 0
    for s in list_pool_shards(layout.pool):
        n += pl.read_parquet(layout.shard_parquet(s), columns=["key"]).height
    return shards, n, "the pool itself (no reference split found: the scorer sees the pool's own mismatches)"


def encoder_inputs(versions: Versions) -> dict[str, Any]:
    """What the encoder reads besides settings: the reference split (by
    content: a pool copied without its times does not retrain the bootstrap
    encoder), and local checkpoint files (by size and mtime: a checkpoint
    replaced in place, same setting and new weights, re-runs the encoder, whose
    data version, the weights hash, then turns every shard's embeddings stale;
    one merely touched re-runs it to the same hash)."""
    from dbprune_assets.core.models.encoders import local_source_files

    ref = versions.layout.reference_dir
    parts: dict[str, Any] = {"reference": versions.memo("reference", lambda: [
        file_digest(p) for p in [ref / "sizes.json", *sorted(ref.glob("*.tar"))]])}
    enc = versions.settings.encoder
    local = [file_signature(p) for spec in (enc.cluster_encoder, enc.score) for p in local_source_files(spec)]
    if local:
        parts["local_weights"] = local
    return parts


@stage(
    group="encode",
    kinds={"pytorch", "openclip"},
    # the encoder is a model, not a product of the pool: adding a shard must not
    # retrain it (and re-embed everything); it versions on its training data
    settings=["encoder", "compute.device", "embeddings"],
    facts=Facts(gpu=True, plots=True),
    inputs=lambda versions, _: encoder_inputs(versions),
)
def encoder(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """The cluster and score encoders: an open_clip architecture with a pretrained tag, an hf-hub: id or a
    local checkpoint, or the offline default `bootstrap` (a small CLIP trained with open_clip_train on the
    pool's clean reference split). Its data version is the weights hash, so embeddings turn stale when it
    changes."""
    record = s.source.encoder_record(s.settings)
    if record is not None:  # stored embeddings: no model is trained or loaded
        write_json(s.layout.encoder_dir / "encoder.json", {"precomputed": record.used}, s.layout.tmp)
        return s.done("encoder", summary={"precomputed": record.used}, metadata={"source": record.used},
                      data_version=record.version)
    cfg = s.settings.encoder
    metadata = _train_bootstrap(context, s) if cfg.cluster_encoder.is_bootstrap or cfg.score.is_bootstrap else {}
    resolved, hashes = _check_encoders(s, metadata)
    version = f"{hashes['cluster'][:16]}-{hashes['score'][:16]}"
    write_json(s.layout.encoder_dir / "encoder.json", {"resolved": resolved, "weights": hashes}, s.layout.tmp)
    _embed_eval_targets(context, s)
    return s.done("encoder", summary={"resolved": resolved, "weights": hashes},
                  metadata={**metadata, "weights_hash": version}, data_version=version)


def _train_bootstrap(context: dg.AssetExecutionContext, s: Session) -> dict[str, object]:
    """Train the bootstrap encoder (on the reference split); its metadata."""
    from dbprune_assets.core.models.bootstrap import train_bootstrap

    from dbprune_assets.core.models.encoders import require_training_space

    s.check_k()
    cfg = s.settings.encoder.bootstrap
    shards, n, source = _reference_shards(s.layout)
    require_training_space(s.layout.encoder_dir, cfg.model, "training the bootstrap encoder")
    context.log.info(f"training the bootstrap encoder on {source}: {n} samples in {len(shards)} tar(s)")
    result = train_bootstrap(shards, n, s.layout.encoder_dir / "bootstrap", cfg, torch_device(s.device),
                             logs_dir=s.layout.home / "logs" / "bootstrap", tmp_root=s.layout.tmp)
    metadata: dict[str, object] = {"bootstrap_training_data": source, "bootstrap_samples": n,
                                   "bootstrap_seconds": round(result.seconds, 1)}
    if result.loss_curve:
        png = loss_curve_png({cfg.model: result.loss_curve},
                             title=f"bootstrap encoder ({cfg.model}) on {source.split(' (')[0]}")
        metadata["bootstrap_final_loss"] = float(result.loss_curve[-1][1])
        metadata["bootstrap_loss_curve"] = artefact_md(s.layout, "encoder", "loss", png, "bootstrap loss")
    return metadata


def _embed_eval_targets(context: dg.AssetExecutionContext, s: Session) -> None:
    """When ``datacomp_image``'s targets will be the evaluation images, embed them
    now, while the encoder is at hand (cached beside it: the pruned_subset step
    then needs no torch).  A failure here is only logged: that step says it."""
    from dbprune_assets.core.models.target_images import embed_eval_images
    from dbprune_assets.core.strategies.targets import target_source

    try:
        found = target_source(s.layout, s.settings)
        if found is not None and found[0] == "eval":
            x, names = embed_eval_images(s.layout, s.settings, list(found[1]))
            context.log.info(f"datacomp_image's targets: {len(x)} images of {', '.join(names)}, embedded")
    except Exception as e:  # noqa: BLE001  a cache: pruned_subset embeds them itself, or says why it cannot
        context.log.warning(f"the evaluation images were not embedded for datacomp_image ({type(e).__name__}: {e}); "
                            "pruned_subset will embed them or say why it cannot")


def _check_encoders(s: Session, metadata: dict[str, object]) -> tuple[dict[str, dict], dict[str, str]]:
    """Resolve and load both encoders on the CPU (proving they load, and fetching
    weights, before any shard needs them): (what resolved, weights hash) per role."""
    from dbprune_assets.core.models.encoders import load_encoder, resolve_encoder
    from dbprune_assets.core.models.model_dir import weights_hash

    cfg = s.settings.encoder
    resolved, hashes = {}, {}
    for role, spec in (("cluster", cfg.cluster_encoder), ("score", cfg.score)):
        enc = load_encoder(resolve_encoder(spec, s.layout.encoder_dir / "bootstrap", setting=f"encoder.{role}_encoder"),
                           "cpu")
        resolved[role] = {"spec": spec.model_dump(), "embed_dim": enc.embed_dim, "name": enc.name}
        hashes[role] = weights_hash(enc.weights_path) if enc.weights_path else "random-init"
        metadata.update({f"{role}_encoder": enc.name, f"{role}_embed_dim": enc.embed_dim})
    return resolved, hashes


@stage(
    partitions=shard_partitions,
    deps=[raw_metadata, encoder],
    group="encode",
    kinds={"pytorch", "numpy"},
    settings=["compute.precision"],
    facts=Facts(gpu=True, shard_tables=("scores",)),
)
def embeddings(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """Image and text embeddings (L2-normalised, float16) of every ok sample and its clip_score = cos(image,
    text) from the score encoder, in clip-retrieval's layout: embeddings/{img_emb,text_emb,metadata}/<shard>.
    Streamed from the tar in batches, decoded in worker processes; GPU with autocast when present."""
    import polars as pl

    from dbprune_assets.core.models.embed import embed_shard
    from dbprune_assets.core.models.encoders import load_encoder, resolve_encoder

    s.check_k()
    unready = [sh for sh in s.partition_shards(context.partition_keys) if not s.layout.table("samples", sh).is_file()]
    if unready:  # e.g. --select embeddings on a home that never ingested them
        raise dg.Failure(f"embeddings: {len(unready)} shard(s) not ingested yet ({', '.join(unready[:5])}"
                         f"{'…' if len(unready) > 5 else ''}): materialise raw_metadata for them first "
                         "(dbprune run --select '*embeddings' does both)")
    if s.source.precomputed:
        return _stored_embeddings(context, s)
    cfg = s.settings.encoder
    device = torch_device(s.device)
    bootstrap_dir = s.layout.encoder_dir / "bootstrap"
    cluster_enc = load_encoder(resolve_encoder(cfg.cluster_encoder, bootstrap_dir), device)
    score_enc = None if cfg.score == cfg.cluster_encoder else load_encoder(
        resolve_encoder(cfg.score, bootstrap_dir, setting="encoder.score_encoder"), device)
    stats_rows = []
    for shard in progress(s.partition_shards(context.partition_keys), desc="embeddings", unit="shard"):
        samples = pl.read_parquet(s.layout.table("samples", shard))
        ok = samples.filter(pl.col("status") == "ok").select("uid", "key", "caption", "row")
        stats = embed_shard(
            s.layout.shard_tar(shard), ok, cluster_enc, score_enc,
            s.layout.img_emb(shard), s.layout.text_emb(shard), s.layout.emb_metadata(shard),
            s.settings.compute, s.layout.tmp, shard=shard,
        )
        meta = _write_scores(s, shard)
        remove(s.layout.staged_pairs(shard))  # pairs a stored source's ingest left, were the source switched
        row = {"shard": shard, "embedded": stats.n, "images_per_s": round(stats.images_per_s, 1),
               "embed_seconds": round(stats.seconds, 2), "device": stats.device}
        s.commit("embeddings", shard, {"rows": stats.n, "images_per_s": row["images_per_s"]}, metadata={
            **row, "mean_clip_score": round(float(meta["clip_score"].mean() or 0.0), 4)})
        stats_rows.append(row)
        context.log.info(f"shard {shard}: {stats.n} embeddings, {stats.images_per_s:.0f} images/s on {stats.device}")
    s.refresh_catalog("scores")
    total = sum(r["embedded"] for r in stats_rows)
    secs = sum(r["embed_seconds"] for r in stats_rows) or 1e-9
    return dg.MaterializeResult(metadata={
        "step_embedded": total, "step_images_per_s": round(total / secs, 1), "device": device,
        "embed_dim": cluster_enc.embed_dim, "step_shards": table(stats_rows, s.table_rows), "step_seconds": s.elapsed(),
    })


def _write_scores(s: Session, shard: str) -> "pl.DataFrame":
    """The shard's ``scores`` table (uid, shard, clip_score) from its embeddings' metadata; returned."""
    import polars as pl

    meta = pl.read_parquet(s.layout.emb_metadata(shard), columns=["uid", "shard", "clip_score"])
    write_parquet(s.layout.table("scores", shard), meta, s.layout.tmp)
    return meta


def _stored_embeddings(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """``embeddings`` from a precomputed source: the ok rows' stored pairs,
    copied into the same layout by the source (``EmbeddingSource.write_embeddings``);
    each shard's data version is the source files'."""
    from dbprune_assets.core.store.state import read_state

    step = s.partition_shards(context.partition_keys)
    mine = set(step)
    # the width of the shards embedded before, which every shard must share
    dim = next((st.summary["dim"] for sh in s.shards if sh not in mine
                and (st := read_state(s.layout, "embeddings", sh)) and "dim" in st.summary), None)
    rows = []
    before = dim

    def one(shard: str) -> tuple[Any, "pl.DataFrame"]:  # in a thread: no Dagster calls here
        done = next(iter(s.source.write_embeddings(s.layout, s.settings, [shard], before)))
        return done, _write_scores(s, shard)

    parallel = s.parallel_shards(len(step))
    for _, (done, meta) in progress(ordered_map(one, step, parallel), desc="embeddings (stored)", unit="shard",
                                    total=len(step)):
        if dim is not None and done.dim != dim:  # shards of this step written side by side
            raise SourceError(f"shard {done.shard}: {done.source} holds {done.dim}-d embeddings but the pool's "
                              f"other shards are {dim}-d; every shard must come from the same model "
                              "(embeddings.model)")
        rows.append(_commit_stored(s, done, meta))
        dim = done.dim
    s.refresh_catalog("scores")
    return dg.MaterializeResult(metadata={
        "step_embedded": sum(r["embedded"] for r in rows), "source": s.source.label(s.settings),
        "embed_dim": dim or 0, "step_shards": table(rows, s.table_rows), "step_seconds": s.elapsed(),
    })


def _commit_stored(s: Session, done: Any, meta: "pl.DataFrame") -> dict[str, Any]:
    """Commit a shard of stored embeddings; its row of the step's table."""
    row = {"shard": done.shard, "embedded": done.rows, "source": done.source.name,
           "mean_clip_score": round(float(meta["clip_score"].mean() or 0.0), 4)}
    s.commit("embeddings", done.shard, {"rows": done.rows, "source": str(done.source), "dim": done.dim},
             data_version=done.data_version, metadata=row)
    return row
