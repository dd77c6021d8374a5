"""Shared pieces of the Dagster layer: partitions, the resource, and the
versioning table that lets ``dbprune run`` skip up-to-date partitions.

The graph's shape is declared once here (``GRAPH``): which settings each asset
reads and which assets it reads from.  Assets use it to stamp their commit
markers; ``dbprune run`` uses it to decide what is stale; a test checks it
against the Dagster asset graph so the two never drift apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal, Mapping

import dagster as dg

from ..core.catalog import refresh_catalog
from ..core.layout import UNPARTITIONED, Layout
from ..core.settings import STRATEGIES, PipelineSettings, build_settings, load_settings
from ..core.state import State, combine_versions, file_signature, read_state, stable_hash, write_state

SHARDS = "shards"
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)
strategy_partitions = dg.StaticPartitionsDefinition(list(STRATEGIES))

Partitioning = Literal["shard", "strategy", None]


@dataclass(frozen=True)
class Node:
    """An asset as the versioning sees it."""

    partitioning: Partitioning
    parents: tuple[str, ...]
    settings: tuple[str, ...] = ()  # dotted paths into PipelineSettings
    code: str = "1"  # bump when the asset's output for the same inputs changes


GRAPH: dict[str, Node] = {
    "raw_metadata": Node("shard", (), ("ingest",)),
    "pool_manifest": Node(None, ("raw_metadata",)),
    # the encoder is a model, not a product of the pool: adding a shard must not
    # retrain it (and re-embed everything); it versions on its training data
    "encoder": Node(None, (), ("encoder", "compute.device")),
    "embeddings": Node("shard", ("raw_metadata", "encoder"), ("compute.precision",)),
    "dedup_centroids": Node(None, ("pool_manifest", "embeddings"), ("semdedup.dedup_k", "semdedup.niter", "semdedup.sample_size", "semdedup.seed")),
    "dedup_assignments": Node("shard", ("embeddings", "dedup_centroids")),
    "semantic_dedup": Node(None, ("pool_manifest", "dedup_assignments"), ("semdedup.eps",)),
    "candidates": Node(None, ("pool_manifest", "embeddings", "semantic_dedup"), ("clip_filter",)),
    "centroids": Node(None, ("pool_manifest", "candidates"), ("dbp.k", "dbp.niter", "dbp.sample_size", "dbp.seed")),
    "cluster_assignments": Node("shard", ("candidates", "centroids")),
    "cluster_complexity": Node(None, ("pool_manifest", "centroids", "cluster_assignments"), ("dbp",)),
    "pruned_subset": Node("strategy", ("pool_manifest", "cluster_complexity", "candidates", "semantic_dedup"), ("selection.seed", "export")),
    "trained_model": Node("strategy", ("pruned_subset",), ("train",)),
    "eval_scores": Node("strategy", ("trained_model",), ("eval",)),
    "comparison": Node(None, ("eval_scores", "pruned_subset"), ("eval.bootstrap_samples",)),
}


def use_gpu(device: str) -> bool | None:
    """faiss/torch device choice from ``compute.device``: None = when present."""
    return None if device == "auto" else device == "cuda"


def torch_device(device: str) -> str:
    """The torch device for ``compute.device`` (auto: cuda when present)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def settings_digest(settings: PipelineSettings, paths: tuple[str, ...]) -> str:
    payload: dict[str, Any] = {}
    for path in paths:
        obj: Any = settings
        for part in path.split("."):
            obj = getattr(obj, part)
        payload[path] = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return stable_hash(payload)


def current_settings(layout: Layout) -> PipelineSettings:
    """The saved settings of this home, else the profile that fits the pool."""
    if layout.config_file.is_file():
        return load_settings(layout.config_file)
    from ..core.pool import is_sample_pool

    use_sample = (not layout.pool.exists()) or is_sample_pool(layout.pool)
    return build_settings({}, profile="sample" if use_sample else "paper")


class DbpruneResource(dg.ConfigurableResource):
    """Where dbprune keeps its data and which settings it runs with.

    ``home`` and ``pool`` default to ``$DBPRUNE_HOME`` (else ``./data``) and
    ``$DBPRUNE_POOL`` (else ``<home>/pool``); the settings are
    ``<home>/config.yaml`` as saved by ``dbprune run``, else the profile that
    fits the pool (``sample`` for the generated sample pool).
    """

    home: str = ""
    pool: str = ""

    def layout(self) -> Layout:
        return Layout.from_env(self.home or None, self.pool or None)

    def settings(self) -> PipelineSettings:
        return current_settings(self.layout())

    def session(self, context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> "Session":
        return Session(self.layout(), self.settings(), context.instance)


@dataclass
class Versions:
    """Computes fingerprints from commit markers (see ``core/state.py``)."""

    layout: Layout
    settings: PipelineSettings
    shards: list[str]
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    _cache: dict[tuple[str, str], str | None] = field(default_factory=dict)

    def keys(self, partitioning: Partitioning) -> list[str]:
        if partitioning == "shard":
            return self.shards
        if partitioning == "strategy":
            return self.strategies
        return [UNPARTITIONED]

    def data_version(self, asset: str, partition: str) -> str | None:
        key = (asset, partition)
        if key not in self._cache:
            st = read_state(self.layout, asset, partition)
            self._cache[key] = st.data_version if st else None
        return self._cache[key]

    def forget(self, asset: str, partition: str) -> None:
        self._cache.pop((asset, partition), None)

    def fingerprint(self, asset: str, partition: str) -> str:
        node = GRAPH[asset]
        parts: dict[str, Any] = {
            "asset": asset,
            "code": node.code,
            "settings": settings_digest(self.settings, node.settings),
        }
        for parent in node.parents:
            pnode = GRAPH[parent]
            if pnode.partitioning is None:
                parts[parent] = self.data_version(parent, UNPARTITIONED)
            elif pnode.partitioning == node.partitioning:
                parts[parent] = self.data_version(parent, partition)
            else:
                parts[parent] = combine_versions({k: self.data_version(parent, k) for k in self.keys(pnode.partitioning)})
        if asset == "raw_metadata":
            parts["files"] = [
                file_signature(self.layout.shard_parquet(partition)),
                file_signature(self.layout.shard_tar(partition)),
            ]
        if asset == "encoder":
            parts["reference"] = file_signature(self.layout.reference_dir / "sizes.json")
            from ..core.encoders import local_source_files

            # a checkpoint replaced in place (same setting, new weights) re-runs the encoder,
            # whose data version (the weights hash) then turns every shard's embeddings stale
            enc = self.settings.encoder
            local = [file_signature(p) for spec in (enc.cluster_encoder, enc.score) for p in local_source_files(spec)]
            if local:
                parts["local_weights"] = local
        return stable_hash(parts)

    def is_fresh(self, asset: str, partition: str) -> bool:
        st = read_state(self.layout, asset, partition)
        return st is not None and st.fingerprint == self.fingerprint(asset, partition)


class Session:
    """What one asset step works with: paths, settings, versions."""

    def __init__(self, layout: Layout, settings: PipelineSettings, instance: dg.DagsterInstance):
        self.layout = layout
        self.settings = settings
        self.instance = instance
        self.started = time.monotonic()

    @cached_property
    def shards(self) -> list[str]:
        return sorted(self.instance.get_dynamic_partitions(SHARDS))

    @cached_property
    def versions(self) -> Versions:
        return Versions(self.layout, self.settings, self.shards, list(self.settings.selection.strategies))

    def commit(self, asset: str, partition: str = UNPARTITIONED, summary: Mapping[str, Any] | None = None,
               data_version: str | None = None) -> State:
        """Write the partition's commit marker (after its outputs are in place)."""
        fp = self.versions.fingerprint(asset, partition)
        state = State(fp, data_version or fp, dict(summary or {}))
        write_state(self.layout, asset, partition, state)
        self.versions.forget(asset, partition)
        return state

    def refresh_catalog(self, *tables: str) -> None:
        refresh_catalog(self.layout, list(tables) or None)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 2)


def timed(log: Callable[[str], None], what: str) -> Callable[[], None]:
    t0 = time.monotonic()
    return lambda: log(f"{what}: {time.monotonic() - t0:.1f}s")
