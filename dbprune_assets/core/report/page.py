"""``dbprune report``: one static HTML page of a run, self-contained (plots and
image grids embedded as PNG data URIs), readable without the Dagster UI.

It gathers what the stages left in ``$DBPRUNE_HOME``: the decisions per
strategy (commit markers of ``pruned_subset``), the comparison
(``tables/comparison/all.parquet``, table and verdicts), the DBP clusters table
(``tables/clusters/all.parquet``) and every plot and example grid saved under
``artefacts/<asset>/``.  Whatever a partial run has not made yet is said so.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Sequence

from dbprune_assets.core.report.tables import cell_text, html_table
from dbprune_assets.core.store.atomic import write_bytes
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout
from dbprune_assets.core.strategies import registry
from dbprune_assets.core.store.state import read_state

#: a table never makes the page wider than the window: its box (``.scroll``) is
#: at most the page's width and scrolls what does not fit; cells wrap at spaces
#: and headers at ``_``, ``/`` and ``@`` (``breakable``), so the 14-column
#: comparison fits a 1,400 px window without scrolling
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1320px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0 0 0.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; position: sticky; top: 0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
.scroll { display: block; max-width: 100%; max-height: 32em; overflow: auto; margin: 0.5em 0 1.5em; }
"""


def report_path(layout: Layout, name: str | None = None) -> Path:
    """``$DBPRUNE_HOME/reports/<name>.html``; ``name`` defaults to the current time."""
    return layout.home / "reports" / f"{name or time.strftime('%Y%m%d-%H%M%S')}.html"


def _figure(png: Path) -> str:
    b64 = base64.b64encode(png.read_bytes()).decode()
    caption = html.escape(f"{png.parent.name} / {png.stem.replace('_', ' ')}")
    return f'<figure><img alt="{caption}" src="data:image/png;base64,{b64}"><figcaption>{caption}</figcaption></figure>'


def _decisions(layout: Layout) -> str:
    rows = []
    for strategy in registry.names():
        st = read_state(layout, "pruned_subset", strategy)
        if st is not None:
            summary = st.summary
            rows.append({"strategy": strategy, "kept": summary.get("kept"), "of": summary.get("rows"),
                         **{k.removeprefix("reason_"): v for k, v in summary.items() if k.startswith("reason_")},
                         "exported": summary.get("exported")})
    return html_table(rows) if rows else "<p><em>no subsets yet (pruned_subset not materialised)</em></p>"


def _comparison(layout: Layout) -> str:
    import polars as pl

    from dbprune_assets.core.models.compare import AGGREGATE_TASK, aggregate_table_rows, samples_seen_sentence, table_rows, verdicts

    path = layout.table("comparison")
    if not path.is_file():
        return "<p><em>no comparison yet (materialise comparison: dbprune run)</em></p>"
    summary = pl.read_parquet(path)
    items = "".join(f"<li>{html.escape(v)}</li>" for v in verdicts(summary, baseline="full", focus="dbp"))
    seen = dict(summary.select("strategy", "samples_seen").unique().iter_rows())
    out = f"<p>{html.escape(samples_seen_sentence(seen))}</p>" + html_table(table_rows(summary)) + f"<ul>{items}</ul>"
    agg_path = layout.table("comparison", AGGREGATE_TASK)
    if agg_path.is_file():
        out += ("<h3>DataComp-style aggregate</h3><p>Mean over seeds of DataComp's aggregate scores (main metric "
                "per task, averaged per group over the tasks present).</p>"
                + html_table(aggregate_table_rows(pl.read_parquet(agg_path))))
    return out


def _truth(layout: Layout) -> str:
    from dbprune_assets.core.strategies.truth import read_truth, truth_rows, truth_verdicts

    found = read_truth(layout.home / "tables", registry.names())
    if not found:
        return "<p><em>no ground truth for this pool (strategies.ground_truth)</em></p>"
    items = "".join(f"<li>{html.escape(v)}</li>" for v in truth_verdicts(found))
    return ("<p>Measured on the pool's planted truth, not trained (catalog view <code>truth_quality</code>).</p>"
            + html_table(truth_rows(found)) + f"<ul>{items}</ul>")


def _clusters(layout: Layout) -> str:
    import polars as pl

    path = layout.table("clusters")
    if not path.is_file():
        return "<p><em>no clusters yet (cluster_complexity not materialised)</em></p>"
    frame = pl.read_parquet(path).sort("complexity", descending=True)
    return f"<p>{frame.height} DBP clusters, most complex first.</p>" + html_table(frame.to_dicts())


def _plots(layout: Layout, plot_assets: Sequence[str]) -> str:
    parts = []
    for asset in plot_assets:
        pngs = sorted(layout.artefact_dir(asset).glob("*.png"), key=lambda p: (p.stat().st_mtime, p.name))
        if pngs:
            parts.append(f"<h3>{html.escape(asset)}</h3>" + "".join(_figure(p) for p in pngs))
    return "".join(parts) or "<p><em>no plots yet</em></p>"


def _pool(layout: Layout) -> str:
    """The pool as ingested: its shards, and its samples by status as a table
    (usable ``ok`` first, then the most frequent), the shards left out named."""
    manifest = read_state(layout, "pool_manifest", UNPARTITIONED)
    if manifest is None:
        return "<p><em>not ingested yet (pool_manifest not materialised)</em></p>"
    status = manifest.summary.get("status") or {}
    if not isinstance(status, dict):  # an older marker: shown as it is
        return f"<p>{html.escape(cell_text(manifest.summary.get('shards')))} shards, status {html.escape(str(status))}</p>"
    total = sum(int(v) for v in status.values())
    rows = [{"status": k, "samples": int(v), "share": f"{int(v) / max(total, 1):.1%}"}
            for k, v in sorted(status.items(), key=lambda kv: (kv[0] != "ok", -int(kv[1]), kv[0]))]
    failed = list(manifest.summary.get("failed_shards") or [])
    left_out = (f"<p>{len(failed)} shard(s) left out of the pool (causes: table <code>problems</code>, stage "
                f"<code>ingest</code>): "
                f"{html.escape(', '.join(map(str, failed)))}</p>") if failed else ""
    return (f"<p>{html.escape(cell_text(manifest.summary.get('shards')))} shards, {total:,} samples; by status:</p>"
            + html_table(rows) + left_out)


def render_report(layout: Layout, plot_assets: Sequence[str], title: str = "") -> str:
    """The report page's HTML; ``plot_assets`` are the assets whose artefact
    folders hold plots, in pipeline order (the definitions declare them)."""
    heading = html.escape(title or f"dbprune report, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{heading}</title><style>{STYLE}</style></head><body>"
        f"<h1>{heading}</h1><p>home <code>{html.escape(str(layout.home))}</code>, pool "
        f"<code>{html.escape(str(layout.pool))}</code></p>"
        f"<h2>Pool</h2>{_pool(layout)}"
        f"<h2>Comparison</h2>{_comparison(layout)}"
        f"<h2>Decisions per strategy</h2>{_decisions(layout)}"
        f"<h2>What each strategy keeps, against the ground truth</h2>{_truth(layout)}"
        f"<h2>DBP clusters</h2>{_clusters(layout)}"
        f"<h2>Plots and examples</h2>{_plots(layout, plot_assets)}"
        "</body></html>"
    )


def write_report(layout: Layout, plot_assets: Sequence[str], name: str | None = None, title: str = "") -> Path:
    """Write the report to :func:`report_path` (atomically); its path."""
    path = report_path(layout, name)
    write_bytes(path, render_report(layout, plot_assets, title).encode(), layout.tmp)
    return path
