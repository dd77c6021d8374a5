"""Shared pieces of the Dagster layer: partitions, the resource, and the
versioning that lets ``dbprune run`` skip up-to-date partitions.

The graph has one source of truth, the Dagster definitions: an asset's parents
and partitioning are read from the resolved asset graph (:func:`graph_nodes`).
Beside each asset sits only what Dagster cannot know: which settings it reads
(``@stage(settings=["dbp"], ...)``, dotted paths into the pipeline settings,
kept in the asset's metadata) and, as Dagster's own ``code_version``, a number
to bump when its output for the same inputs changes.  A partition's fingerprint hashes those with its parents' data
versions (see ``docs/design.md``); assets stamp it into their commit markers,
``dbprune run`` compares it to decide what is stale, and the markers' data
versions are the ones Dagster records (``dataversions.py``), so the UI agrees.

A partitioned stage runs one step over a range of partitions; each partition
still shows its own numbers in the UI (``Session.commit(..., metadata=...)``),
and the step's own metadata, the same on every partition it ran, is named
``step_*``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import dagster as dg

from dbprune_assets.core.running import lease, parallel
from dbprune_assets.core.store.catalog import CATALOG_TABLES, refresh_catalog
from dbprune_assets.core.pool import shardgroups
from dbprune_assets.core.pool.sources import registry
from dbprune_assets.core.pool.sources.base import EmbeddingSource
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout, list_pool_shards
from dbprune_assets.core.settings import PipelineSettings, choose_settings
from dbprune_assets.core.strategies import registry as strategy_registry
from dbprune_assets.core.store.state import State, combine_versions, read_state, stable_hash, write_state
from dbprune_assets.defs.dataversions import reported

SHARDS = "shards"
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)
#: the registered strategies when the definitions are loaded (``core/strategies/registry.py``)
strategy_partitions = dg.StaticPartitionsDefinition(list(strategy_registry.names()))
ALL_PARTITIONS = dg.AllPartitionMapping()

Partitioning = Literal["shard", "strategy", None]

#: asset metadata key listing the settings an asset reads
SETTINGS_KEY = "dbprune/settings"
#: asset metadata key holding the asset's :class:`Facts`
FACTS_KEY = "dbprune/facts"
#: the Dagster pool (concurrency limit) of the assets that use the GPU
GPU_POOL = "dbprune_gpu"


@dataclass(frozen=True)
class Facts:
    """What the rest of dbprune needs to know about an asset, declared on the
    asset itself (``@stage(facts=Facts(...))``) so that adding an asset edits
    no list elsewhere: the runner, the cluster's queues, the report and shard
    removal all derive theirs from the definitions (:func:`graph_nodes`)."""

    #: uses the GPU where there is one: Dagster pool ``dbprune_gpu``, Celery queue ``gpu``
    gpu: bool = False
    #: needs the pool's images; a run over a pool without images leaves it out
    needs_images: bool = False
    #: reads the pool itself; the runner runs it first, so the pool's size is known early
    ingest: bool = False
    #: writes PNG plots under ``artefacts/<asset>/`` that the HTML report shows
    plots: bool = False
    #: tables it writes one file per shard of (``tables/<table>/<shard>.parquet``);
    #: a shard that leaves the pool loses them
    shard_tables: tuple[str, ...] = ()
    fit: str = ""  #: a k-means fit kept across pool changes (``core/method/fitrecord.py``): its assignments' table

    def as_metadata(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "needs_images": self.needs_images, "ingest": self.ingest, "plots": self.plots,
                "shard_tables": list(self.shard_tables), "fit": self.fit}

    @classmethod
    def from_metadata(cls, value: Any) -> "Facts":
        value = dict(getattr(value, "value", value) or {})  # a MetadataValue once normalised
        return cls(**{**value, "shard_tables": tuple(value.get("shard_tables", ()))})


@dataclass(frozen=True)
class Node:
    """An asset as the versioning (and everything that asks about assets) sees it."""

    partitioning: Partitioning
    parents: tuple[str, ...]
    settings: tuple[str, ...] = ()
    code: str = "1"
    facts: Facts = Facts()


def with_fact(nodes: Mapping[str, Node], fact: str) -> list[str]:
    """The assets of ``nodes`` (in their order, topological from :func:`graph_nodes`)
    that declare ``fact`` (a :class:`Facts` field that is true)."""
    return [name for name, node in nodes.items() if getattr(node.facts, fact)]


#: extra inputs of a fingerprint beyond parents and settings (files read outside the graph): ``@stage(inputs=...)``
InputsFn = Callable[["Versions", str], Mapping[str, Any]]
_EXTRA_INPUTS: dict[str, InputsFn] = {}
_DECLARED: dict[str, tuple[tuple[str, ...], str]] = {}  # every stage's settings and code version, by name


def partitioning_of(partitions_def: dg.PartitionsDefinition | None) -> Partitioning:
    if partitions_def is None:
        return None
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name == SHARDS:
        return "shard"
    if partitions_def == strategy_partitions:
        return "strategy"
    raise ValueError(f"unexpected partitioning {partitions_def!r}: dbprune knows shard and strategy partitions")


def graph_nodes(graph: Any) -> dict[str, Node]:
    """Every asset of a resolved asset graph (``Definitions.resolve_asset_graph()``,
    or the graph of a run's job: its assets and their parents), in Dagster's
    topological order."""
    nodes: dict[str, Node] = {}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        paths = node.metadata.get(SETTINGS_KEY, [])
        paths = getattr(paths, "value", paths)  # a MetadataValue once normalised
        nodes[key.to_user_string()] = Node(
            partitioning_of(node.partitions_def),
            tuple(sorted(p.to_user_string() for p in node.parent_keys)),
            tuple(paths),
            node.code_version or "1",
            Facts.from_metadata(node.metadata.get(FACTS_KEY)),
        )
    return nodes


def settings_digest(settings: PipelineSettings, paths: tuple[str, ...]) -> str:
    payload: dict[str, Any] = {}
    for path in paths:
        obj: Any = settings
        for part in path.split("."):
            obj = getattr(obj, part)
        payload[path] = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return stable_hash(payload)


def current_settings(layout: Layout) -> PipelineSettings:
    """The saved settings of this home, else the profile that fits the pool
    (:func:`~..core.settings.choose_settings`)."""
    return choose_settings(pool=layout.pool, saved=layout.config_file)[0]


class DbpruneResource(dg.ConfigurableResource):
    """Where dbprune keeps its data and which settings it runs with.

    ``home`` and ``pool`` default to ``$DBPRUNE_HOME`` (else ``./data``) and
    ``$DBPRUNE_POOL`` (else ``<home>/pool``); the settings are
    ``<home>/config.yaml`` as saved by ``dbprune run``, else the profile that
    fits the pool (``sample`` for the generated sample pool, ``paper`` with
    ``auto`` cluster counts for a user pool).
    """

    home: str = ""
    pool: str = ""

    def layout(self) -> Layout:
        return Layout.from_env(self.home or None, self.pool or None)

    def settings(self) -> PipelineSettings:
        return current_settings(self.layout())

    def session(self, context: dg.AssetExecutionContext) -> "Session":
        return Session(self.layout(), self.settings(), context.instance,
                       graph_nodes(context.job_def.asset_layer.asset_graph), context)


#: per-partition metadata only for steps of at most this many partitions: Dagster
#: checks each call against every partition of the asset (a query per call), and a
#: bigger step's numbers are in the commit markers and the catalog
PARTITION_METADATA_MAX = 200


def registered_shards(keys: Sequence[str], pool: Path) -> list[str]:
    """The shards of partition ``keys``: a shard's own key, or every pool shard
    in a group's range (``core/pool/shardgroups.py``)."""
    if not any(shardgroups.SEP in k for k in keys):
        return list(keys)
    return shardgroups.shards_of(keys, list_pool_shards(pool))


@dataclass
class Versions:
    """Computes fingerprints from commit markers (see ``core/store/state.py``)."""

    layout: Layout
    settings: PipelineSettings
    shards: list[str]
    nodes: Mapping[str, Node]
    strategies: list[str] = field(default_factory=lambda: list(strategy_registry.names()))
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    @cached_property
    def source(self) -> EmbeddingSource:
        """The embedding source ``embeddings.source`` names (``core/pool/sources/registry.py``)."""
        return registry.get(self.settings.embeddings.source)

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

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per :class:`Versions` (e.g. a signature of files
        every partition's fingerprint includes: stat them once, not per shard)."""
        if ("memo", key) not in self._cache:
            self._cache[("memo", key)] = compute()
        return self._cache[("memo", key)]

    def forget(self, asset: str, partition: str) -> None:
        self._cache.pop((asset, partition), None)

    def fit_of(self, asset: str) -> str:
        """A fit's and its upstream stages' declared code and settings (fitrecord.py), and the encoder's version."""
        seen, todo = set(), [asset]
        while todo:
            if (a := todo.pop()) not in seen:
                seen.add(a)
                todo.extend(self.nodes[a].parents)
        declared = {a: _DECLARED.get(a, (self.nodes[a].settings, self.nodes[a].code)) for a in sorted(seen)}
        return stable_hash({"code": {a: c for a, (_, c) in declared.items()}, "encoder": self.data_version("encoder", UNPARTITIONED),
                            "settings": {a: settings_digest(self.settings, tuple(p)) for a, (p, _) in declared.items()}})

    def fingerprint(self, asset: str, partition: str) -> str:
        node = self.nodes[asset]
        parts: dict[str, Any] = {
            "asset": asset,
            "code": node.code,
            "settings": settings_digest(self.settings, node.settings),
        }
        for parent in node.parents:
            pnode = self.nodes[parent]
            if pnode.partitioning is None:
                parts[parent] = self.data_version(parent, UNPARTITIONED)
            elif pnode.partitioning == node.partitioning:
                parts[parent] = self.data_version(parent, partition)
            else:
                parts[parent] = combine_versions({k: self.data_version(parent, k) for k in self.keys(pnode.partitioning)})
        if asset in _EXTRA_INPUTS:
            parts.update(_EXTRA_INPUTS[asset](self, partition))
        return stable_hash(parts)

    def is_fresh(self, asset: str, partition: str) -> bool:
        st = read_state(self.layout, asset, partition)
        return st is not None and st.fingerprint == self.fingerprint(asset, partition)


class Session:
    """What one asset step works with: paths, settings, versions."""

    def __init__(self, layout: Layout, settings: PipelineSettings, instance: dg.DagsterInstance,
                 nodes: Mapping[str, Node], context: dg.AssetExecutionContext | None = None):
        self.layout = layout
        self.settings = settings
        self.instance = instance
        self.nodes = nodes
        self.context = context
        self.started = time.monotonic()
        self._lap = self.started
        self._group_metadata: dict[str, dict[str, Any]] = {}

    @cached_property
    def partition_keys(self) -> list[str]:
        """The registered partitions of the per-shard assets (shards or shard groups)."""
        return sorted(self.instance.get_dynamic_partitions(SHARDS))

    @cached_property
    def shards(self) -> list[str]:
        """Every shard of the registered partitions (``core/pool/shardgroups.py``)."""
        return registered_shards(self.partition_keys, self.layout.pool)

    def partition_shards(self, keys: Sequence[str]) -> list[str]:
        """The shards of a step's partition ``keys``, in order."""
        return registered_shards(keys, self.layout.pool)

    @cached_property
    def _step_keys(self) -> list[str]:
        """The step's partition keys (Dagster computes them from the instance at each access)."""
        return list(self.context.partition_keys) if self.context is not None else []

    @cached_property
    def _partition_of(self) -> dict[str, str]:
        """Each of the step's shards -> its partition key (the pool listed once)."""
        if not any(shardgroups.SEP in k for k in self._step_keys):
            return {k: k for k in self._step_keys}
        listing = list_pool_shards(self.layout.pool)
        return {sh: key for key in self._step_keys for sh in shardgroups.shards_of([key], listing)}

    @cached_property
    def _shards_by_key(self) -> dict[str, list[str]]:
        shards: dict[str, list[str]] = {}
        for sh, key in self._partition_of.items():
            shards.setdefault(key, []).append(sh)
        return shards

    def shards_of(self, key: str) -> list[str]:
        """The shards of the step's partition ``key``: a shard group's, else ``[key]``."""
        return self._shards_by_key.get(key, [key])

    @cached_property
    def _group_left(self) -> Counter[str]:
        """Shards of each of the step's shard-group partitions not yet committed."""
        return Counter(key for sh, key in self._partition_of.items() if key != sh)

    @cached_property
    def versions(self) -> Versions:
        return Versions(self.layout, self.settings, self.shards, self.nodes, list(self.settings.selection.strategies))

    @property
    def device(self) -> str:
        return self.settings.compute.device

    @cached_property
    def source(self) -> EmbeddingSource:
        """The embedding source ``embeddings.source`` names: what ingest and the
        encoder and embeddings stages ask instead of branching on its name."""
        return registry.get(self.settings.embeddings.source)

    @property
    def threads(self) -> int:
        return self.settings.compute.threads

    def parallel_shards(self, shards: int) -> int:
        """Shards a per-shard step of ``shards`` shards works on at once (``compute.parallel_shards``)."""
        return parallel.resolve_parallel(self.settings.compute.parallel_shards, shards)

    def shard_threads(self, parallel_shards: int) -> int:
        """Compute threads for each of ``parallel_shards`` shards in work (``compute.threads`` shared)."""
        return parallel.shard_threads(self.threads, parallel_shards)

    def commit(self, asset: str, partition: str = UNPARTITIONED, summary: Mapping[str, Any] | None = None,
               data_version: str | None = None, metadata: Mapping[str, Any] | None = None) -> State:
        """Write the partition's commit marker (after its outputs are in place).

        For a partition of a partitioned asset, ``metadata`` (plus the seconds
        since the previous commit of this step) becomes that partition's own
        metadata in the UI: a step over a range of partitions reports each with
        its own numbers, over the step's shared metadata of the same name."""
        fp = self.versions.fingerprint(asset, partition)
        state = State(fp, data_version or fp, dict(summary or {}))
        lease.check_held(f"{asset} {partition}")  # on a cluster worker: this run still holds its lease
        write_state(self.layout, asset, partition, state)
        self.versions.forget(asset, partition)
        now = time.monotonic()
        if (metadata is not None and self.context is not None and partition != UNPARTITIONED
                and len(self._step_keys) <= PARTITION_METADATA_MAX):
            self._partition_metadata(partition, {**metadata, "seconds": round(now - self._lap, 2)})
        self._lap = now
        return state

    @property
    def table_rows(self) -> int:
        """Rows a step's tables show: Dagster copies a step's metadata onto every
        partition it materialises, so a step over many partitions shows few."""
        return 60 if len(self._step_keys) <= PARTITION_METADATA_MAX else 10

    def _partition_metadata(self, shard: str, metadata: Mapping[str, Any]) -> None:
        """A shard's metadata on its partition; on a shard group's, once its last
        shard is committed, the sums of its shards' numbers (other values: the
        last shard's) and ``shards`` (each call costs Dagster a query)."""
        assert self.context is not None
        key = self._partition_of.get(shard, shard)
        if key != shard:
            acc = self._group_metadata.setdefault(key, {"shards": 0})
            acc["shards"] += 1
            for name, value in metadata.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                acc[name] = acc.get(name, 0) + value if number and name in acc else value
            self._group_left[key] -= 1
            if self._group_left[key] > 0:
                return
            metadata = dict(acc)
        self.context.add_asset_metadata(dict(metadata), partition_key=key)

    def done(self, asset: str, summary: Mapping[str, Any], metadata: Mapping[str, Any],
             checks: Mapping[str, tuple[bool, Mapping[str, Any]]] | None = None,
             data_version: str | None = None) -> dg.MaterializeResult:
        """Commit an unpartitioned asset and report it to Dagster: its data
        version, ``metadata`` (plus the seconds taken) and the check results
        (``{check: (passed, metadata)}``)."""
        st = self.commit(asset, summary=summary, data_version=data_version)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(st.data_version),
            metadata={**metadata, "seconds": self.elapsed()},
            check_results=[dg.AssetCheckResult(check_name=name, passed=bool(ok), metadata=dict(meta))
                           for name, (ok, meta) in (checks or {}).items()],
        )

    def unchanged(self, asset: str, partition: str) -> State | None:
        """The partition's commit marker when its inputs have not changed since
        it was made (its fingerprint still matches), else None.  ``dbprune run``
        keeps the markers of partitions it runs only because a parent in the same
        run is redone: a parent that comes out the same (a subset that keeps the
        same samples) leaves them current, and the step can keep its output
        (``--force`` drops every marker first)."""
        st = read_state(self.layout, asset, partition)
        return st if st is not None and st.fingerprint == self.versions.fingerprint(asset, partition) else None

    def check_k(self) -> None:
        """Fail the step before its expensive work when an explicit cluster count
        exceeds the ingested pool (:func:`~..core.settings.check_k`); the
        runner checks the same before starting the encoder and embeddings."""
        from dbprune_assets.core.settings import SettingsError, check_k
        from dbprune_assets.core.store.state import ingested_ok

        n_ok = ingested_ok(self.layout, self.shards)
        if n_ok is not None:
            try:
                check_k(self.settings, n_ok)
            except SettingsError as e:
                raise dg.Failure(str(e)) from None

    def refresh_catalog(self, *tables: str) -> None:
        """Refresh the catalog views of those ``tables`` that are catalog tables."""
        views = [t for t in tables if t in CATALOG_TABLES]
        if views:
            refresh_catalog(self.layout, views)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 2)


#: a word holding a ``<placeholder>`` (``tables/<table>/<shard>.parquet``), less trailing punctuation
_PLACEHOLDER_WORD = re.compile(r"(?<![`\w])[^\s`]*<[A-Za-z_][\w-]*>[^\s`]*?(?=[.,;:]?(?:\s|$))")


def describe(doc: str) -> str:
    """An asset description from a docstring: one paragraph, and every word
    holding a ``<placeholder>`` in a code span, since the UI renders descriptions
    as markdown and would drop ``<strategy>`` as an unknown HTML tag."""
    text = " ".join(doc.split())
    return _PLACEHOLDER_WORD.sub(lambda m: f"`{m.group(0)}`", text)


StageFn = Callable[[dg.AssetExecutionContext, Session], dg.MaterializeResult]


def stage(*, group: str, kinds: set[str], settings: Sequence[str] = (),
          partitions: dg.PartitionsDefinition | None = None, code_version: str = "1",
          facts: Facts = Facts(), inputs: InputsFn | None = None,
          **asset_args: Any) -> Callable[[StageFn], dg.AssetsDefinition]:
    """``@dg.asset`` for a dbprune stage written as ``fn(context, session)``,
    whose docstring is the asset's description.

    Beside Dagster's own arguments it takes the ``settings`` the stage reads
    (dotted paths into the pipeline settings: a section or one field), which
    its fingerprint hashes; ``code_version`` is Dagster's, to bump when the
    output for the same inputs changes; ``facts`` (:class:`Facts`) what the
    runner, the cluster and the report need to know of it; ``inputs`` a
    function ``(versions, partition) -> {name: value}`` of what else its
    fingerprint hashes (files it reads outside the graph).  A partitioned stage handles a whole
    partition range in one step (single-run backfill: the model loads once).
    """

    def decorate(fn: StageFn) -> dg.AssetsDefinition:
        _DECLARED[fn.__name__] = (tuple(settings), code_version)
        if inputs is not None:
            _EXTRA_INPUTS[fn.__name__] = inputs

        def compute(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> Iterator[Any]:
            # the markers' data versions, as Dagster records them (``dataversions.py``)
            s = dbprune.session(context)
            yield from reported(context, s, fn.__name__, fn(context, s), partitioned=partitions is not None)

        # the types themselves, not the strings `from __future__ import annotations`
        # leaves: Dagster reads them to tell the context and the resource apart (and
        # from the MaterializeResult a generator yields too, that no IO manager stores)
        compute.__annotations__ = {"context": dg.AssetExecutionContext, "dbprune": DbpruneResource,
                                   "return": dg.MaterializeResult}
        return dg.asset(
            name=fn.__name__, group_name=group, kinds=kinds, description=describe(fn.__doc__ or ""),
            code_version=code_version,
            metadata={SETTINGS_KEY: list(settings), FACTS_KEY: facts.as_metadata()}, partitions_def=partitions,
            backfill_policy=dg.BackfillPolicy.single_run() if partitions is not None else None,
            **({"pool": GPU_POOL} if facts.gpu else {}), **asset_args,
        )(compute)

    return decorate
