"""What the Dagster UI shows, checked over its GraphQL API (in process): each
partition of a multi-partition step carries its own numbers, descriptions keep
their ``<placeholders>``, tables are Dagster tables (drawn inline), and
``dbprune report`` writes one self-contained HTML page."""

from __future__ import annotations

import html
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
import polars as pl
import pytest

from dbprune_assets.core.store.layout import Layout
from dbprune_assets.defs.common import DbpruneResource, Session, stage, strategy_partitions
from dbprune_assets.defs.plots import image_grid, table
from dbprune_assets.defs.common import with_fact
from dbprune_assets.definitions import asset_nodes

#: the assets whose plots the report shows, as the definitions declare them
PLOTS = with_fact(asset_nodes(), "plots")


@contextmanager
def graphql(instance: dg.DagsterInstance, module: str, attribute: str) -> Iterator[Any]:
    """A function running GraphQL queries against the UI's schema, with the code
    location ``module:attribute`` loaded in process (no webserver)."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name=module, attribute=attribute),
                                         location_name="dbprune")
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as process:
        def run(query: str) -> dict[str, Any]:
            result = execute_dagster_graphql(process.create_request_context(), query)
            assert not result.errors, result.errors
            return result.data

        yield run


def range_tags(keys: list[str]) -> dict[str, str]:
    """Run tags for one step over the partitions ``keys[0]`` … ``keys[-1]``."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    return {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}


PARTITION_METADATA = """{ assetOrError(assetKey: {path: ["%s"]}) { ... on Asset {
  assetMaterializations(partitions: %s) { partition metadataEntries { label __typename
    ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
    ... on TextMetadataEntry { text } ... on MarkdownMetadataEntry { mdStr }
    ... on TableMetadataEntry { table { records } } } } } } }"""


def partition_metadata(run: Any, asset: str, partitions: list[str]) -> dict[str, dict[str, Any]]:
    """{partition: {label: value}} of each partition's latest materialisation."""
    import json

    data = run(PARTITION_METADATA % (asset, json.dumps(partitions)))
    out: dict[str, dict[str, Any]] = {}
    for mat in data["assetOrError"]["assetMaterializations"]:  # newest first
        if mat["partition"] in out:
            continue
        values = {}
        for e in mat["metadataEntries"]:
            v = e.get("intValue", e.get("floatValue", e.get("text", e.get("mdStr"))))
            values[e["label"]] = v if "table" not in e else [json.loads(r) for r in e["table"]["records"]]
            values[e["label"] + ":type"] = e["__typename"]
        out[mat["partition"]] = values
    return out


# ---------------------------------------------------------------------------
# descriptions


def _visible_text(markdown: str) -> str:
    """What a markdown renderer shows of ``markdown`` (the UI renders descriptions
    as markdown): raw HTML tags such as ``<strategy>`` vanish."""
    from markdown_it import MarkdownIt

    return html.unescape(re.sub(r"<[^>]+>", "", MarkdownIt("commonmark").render(markdown)))


def test_descriptions_keep_their_placeholders(tmp_path: Path):
    pytest.importorskip("markdown_it")
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    with graphql(instance, "dbprune_assets.definitions", "defs") as run:
        nodes = run("{ assetNodes { assetKey { path } description } }")["assetNodes"]
    desc = {n["assetKey"]["path"][-1]: n["description"] or "" for n in nodes}
    shown = {k: _visible_text(v) for k, v in desc.items()}
    assert "tables/decisions/<strategy>.parquet" in shown["pruned_subset"]
    assert "subsets/<strategy>/" in shown["pruned_subset"]
    assert "open_clip.create_model_and_transforms('local-dir:<path>')" in shown["trained_model"]
    assert "tables/samples/<shard>.parquet" in shown["raw_metadata"]
    for asset, text in desc.items():  # every placeholder of every description is shown
        for placeholder in re.findall(r"<[A-Za-z_][\w-]*>", text):
            assert placeholder in shown[asset], (asset, placeholder, text)


# ---------------------------------------------------------------------------
# per-partition metadata (the mechanism, on a toy stage; the real graph below)


@stage(group="toy", kinds={"python"}, partitions=strategy_partitions)
def toy_counts(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """A partitioned stage over a range of partitions, each with its own count."""
    total = 0
    for i, strategy in enumerate(context.partition_keys):
        s.commit("toy_counts", strategy, {"n": i}, metadata={"kept": 10 * (i + 1), "strategy": strategy})
        total += 10 * (i + 1)
    return dg.MaterializeResult(metadata={"kept": -1, "step_kept": total})


TOY_DEFS = dg.Definitions(assets=[toy_counts], resources={"dbprune": DbpruneResource()})


def test_each_partition_of_a_step_carries_its_own_metadata(tmp_path: Path):
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    home = tmp_path / "home"
    result = dg.materialize([toy_counts], instance=instance, tags=range_tags(["dbp", "random"]),
                            resources={"dbprune": DbpruneResource(home=str(home), pool=str(home / "pool"))})
    assert result.success
    with graphql(instance, __name__, "TOY_DEFS") as run:
        meta = partition_metadata(run, "toy_counts", ["dbp", "ssp", "random"])
    assert {p: m["kept"] for p, m in meta.items()} == {"dbp": 10, "ssp": 20, "random": 30}
    assert {p: m["strategy"] for p, m in meta.items()} == {"dbp": "dbp", "ssp": "ssp", "random": "random"}
    assert all(m["step_kept"] == 60 and m["seconds"] >= 0 for m in meta.values())  # the step's own, on each


# ---------------------------------------------------------------------------
# tables and grids


def test_tables_are_dagster_tables_with_typed_columns():
    value = table([{"strategy": "dbp", "kept": 3, "fraction": 0.123456, "ok": True},
                   {"strategy": "ssp", "kept": 4, "fraction": 1, "ok": False}])
    assert isinstance(value, dg.TableMetadataValue)
    assert [(c.name, c.type) for c in value.schema.columns] == [
        ("strategy", "string"), ("kept", "int"), ("fraction", "float"), ("ok", "bool")]
    assert value.records[0].data == {"strategy": "dbp", "kept": 3, "fraction": 0.1235, "ok": True}
    assert isinstance(table([]), dg.TableMetadataValue)


def _png(color: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_grid_sections_stand_apart_with_readable_labels():
    import io

    from PIL import Image

    rows = [(f"#{i} C=0.1 n=5", [_png("red")] * 3) for i in range(4)]
    plain = Image.open(io.BytesIO(image_grid(rows, thumb=32)))
    split = Image.open(io.BytesIO(image_grid(rows, thumb=32, sections=[("most complex", 2), ("least complex", 2)])))
    assert split.height > plain.height  # a title bar per section
    ink = [y for y in range(split.height) if min(split.crop((0, y, 200, y + 1)).convert("L").getdata()) < 128]
    # labels are drawn in a 14 px font: a row label's ink spans ~10 px (PIL's default bitmap font: ~6)
    first_label = [y for y in ink if 26 <= y < 26 + 32]
    assert max(first_label) - min(first_label) >= 9


# ---------------------------------------------------------------------------
# dbprune report


def test_report_is_one_self_contained_page(tmp_path: Path):
    from dbprune_assets.core.store.atomic import write_parquet
    from dbprune_assets.core.report.page import write_report

    layout = Layout.from_env(tmp_path / "home", tmp_path / "home" / "pool")
    empty = write_report(layout, PLOTS, "empty").read_text()
    assert "no comparison yet" in empty and "no clusters yet" in empty
    write_parquet(layout.table("clusters"), pl.DataFrame({"cluster": [0, 1], "size": [5, 7], "complexity": [0.2, 0.4]}),
                  layout.tmp)
    (layout.artefact_dir("cluster_complexity")).mkdir(parents=True, exist_ok=True)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "blue").save(buf, format="PNG")
    (layout.artefact_dir("cluster_complexity") / "examples.png").write_bytes(buf.getvalue())
    path = write_report(layout, PLOTS, "run-x")
    assert path == layout.home / "reports" / "run-x.html"
    page = path.read_text()
    assert "data:image/png;base64," in page and "src=\"/" not in page and "file:" not in page
    assert page.index("<td>1</td>") < page.index("<td>0</td>")  # the clusters table, most complex first


def test_report_command(tmp_path: Path):
    from .conftest import run_cli

    (tmp_path / "h").mkdir()
    proc = run_cli("report", "--name", "x", env={"DBPRUNE_HOME": str(tmp_path / "h"), "DBPRUNE_POOL": ""})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "h" / "reports" / "x.html"
    assert Path(proc.stdout.strip()).read_text().startswith("<!doctype html>")


# ---------------------------------------------------------------------------
# the real graph


@pytest.mark.slow
def test_real_partitions_carry_their_own_numbers(tmp_path: Path):
    """A tiny pool through pruned_subset, each step over all its partitions:
    every shard and every strategy shows its own numbers, the clusters and
    strategies are Dagster tables, and the report holds the plots and grids."""
    from dbprune_assets.core.store.catalog import query
    from dbprune_assets.core.store.layout import list_pool_shards
    from dbprune_assets.core.report.page import write_report
    from dbprune_assets.core.settings import STRATEGIES, build_settings
    from dbprune_assets.definitions import defs
    from dbprune_assets.samplepool import write_sample_pool

    from .conftest import TINY

    layout = Layout.from_env(tmp_path / "home", tmp_path / "home" / "pool")
    settings = build_settings(TINY)
    layout.home.mkdir(parents=True)
    layout.config_file.write_text(settings.to_yaml())
    write_sample_pool(layout.pool, settings.pool, tmp_root=layout.tmp)
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    shards = list_pool_shards(layout.pool)
    instance.add_dynamic_partitions("shards", shards)
    assets = list(defs.assets)  # type: ignore[arg-type]
    resources = {"dbprune": DbpruneResource(home=str(layout.home), pool=str(layout.pool))}
    for selection, keys in ((["raw_metadata"], shards), (["pool_manifest", "encoder"], None), (["embeddings"], shards),
                            (["dedup_centroids"], None), (["dedup_assignments"], shards),
                            (["semantic_dedup", "candidates", "centroids"], None), (["cluster_assignments"], shards),
                            (["cluster_complexity"], None), (["pruned_subset"], list(STRATEGIES))):
        tags = range_tags(keys) if keys else {}
        assert dg.materialize(assets, selection=selection, instance=instance, tags=tags, resources=resources).success

    ok = {r["shard"]: r["n"] for r in query(
        layout, "SELECT shard, count(*) n FROM samples WHERE status = 'ok' GROUP BY 1").to_pylist()}
    kept = {r["strategy"]: r["n"] for r in query(
        layout, "SELECT strategy, count(*) n FROM decisions WHERE keep GROUP BY 1").to_pylist()}
    problems_of = {r["shard"]: r["n"] for r in query(
        layout, "SELECT shard, count(*) n FROM problems GROUP BY 1").to_pylist()}
    with graphql(instance, "dbprune_assets.definitions", "defs") as run:
        raw = partition_metadata(run, "raw_metadata", shards)
        emb = partition_metadata(run, "embeddings", shards)
        subsets = partition_metadata(run, "pruned_subset", list(STRATEGIES))
        data = run("""{ assetOrError(assetKey: {path: ["cluster_complexity"]}) { ... on Asset {
            assetMaterializations(limit: 1) { metadataEntries { label __typename } } } } }""")
    assert {s: m["embedded"] for s, m in emb.items()} == ok  # each shard its own count, not the total
    for shard, m in raw.items():  # each shard's own problems, the step's beside them
        assert m["problem_rows"] == problems_of.get(shard, 0)
        assert not any(f"| {other} |" in m["problems"] for other in shards if other != shard), m["problems"]
        assert m["problems"] == "no problems" or f"| {shard} |" in m["problems"]
        assert "step_problems" in m and "step_shards" in m
    assert all(m["step_embedded"] == sum(ok.values()) for m in emb.values())
    assert {s: m["kept"] for s, m in subsets.items()} == kept
    assert kept["full"] != kept["dbp"]
    assert subsets["dbp"]["step_strategies:type"] == "TableMetadataEntry"
    assert {r["strategy"] for r in subsets["dbp"]["step_strategies"]} == set(STRATEGIES)
    entries = {e["label"]: e["__typename"] for e in
               data["assetOrError"]["assetMaterializations"][0]["metadataEntries"]}
    assert entries["clusters"] == "TableMetadataEntry"
    assert entries["most_and_least_complex_clusters"] == "MarkdownMetadataEntry"  # a pool with images: the picture

    page = write_report(layout, PLOTS, "tiny").read_text()
    assert page.count("data:image/png;base64,") >= 5  # the cluster plots, grids, reasons
    assert "most complex first" in page and "<td>dbp</td>" in page
