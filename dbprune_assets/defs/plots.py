"""What a person sees in the Dagster UI: tables (Dagster's table metadata, which
the UI shows inline), plots and image grids embedded in asset metadata (PNG as
data URIs, behind the UI's "[Show Markdown]"), also saved under
``$DBPRUNE_HOME/artefacts/<asset>/`` so they can be opened outside the UI and
gathered by ``dbprune report`` into one page.

The one place that draws: core functions return numbers and image bytes, the
named functions here turn them into PNGs (matplotlib with the Agg backend,
imported when a plot is drawn, never when the code location loads).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import dagster as dg
import numpy as np

from dbprune_assets.core.report.tables import md_table  # noqa: F401  (re-exported for the asset modules)
from dbprune_assets.core.store.atomic import write_bytes
from dbprune_assets.core.store.layout import Layout

if TYPE_CHECKING:
    import polars as pl

    from dbprune_assets.core.models.compare import Panel
    from dbprune_assets.core.method.stages import ComplexityOutcome


def _column_type(values: Sequence[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


def table(rows: Sequence[Mapping[str, Any]], max_rows: int = 60) -> dg.MetadataValue:
    """Dagster table metadata of dict rows (first ``max_rows``): the UI draws it
    inline, one click less than markdown; floats are rounded to 4 significant digits."""
    rows = list(rows)[:max_rows]
    cols = list(rows[0].keys()) if rows else ["(empty)"]
    types = {c: _column_type([r.get(c) for r in rows]) for c in cols}

    def cell(v: Any, kind: str) -> Any:
        if v is None or kind in ("int", "bool"):
            return v
        if kind == "float":
            return float(f"{float(v):.4g}")
        return str(v)

    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: cell(r.get(c), types[c]) for c in cols}) for r in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, types[c]) for c in cols]),
    )


#: Dagster's metadata dialog is at most 80% of the window wide, less 40 px of
#: padding: a plot this wide is shown whole from a window of about 1,100 px
DIALOG_WIDTH_PX = 840


def png_width(png: bytes) -> int:
    """The width in pixels of PNG bytes (from the IHDR chunk)."""
    return int.from_bytes(png[16:20], "big")


def png_bytes(draw: Callable[[Any], None], figsize: tuple[float, float] = (6.0, 4.0),
              max_width_px: int | None = None) -> bytes:
    """Render a matplotlib drawing function ``draw(fig)`` to PNG bytes, at most
    ``max_width_px`` wide (drawn again at a lower resolution when wider)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, dpi=100)
    try:
        draw(fig)
        fig.tight_layout()
        png = _save_png(fig, 100)
        if max_width_px and png_width(png) > max_width_px:
            png = _save_png(fig, int(100 * max_width_px / png_width(png)))
        return png
    finally:
        plt.close(fig)


def _save_png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
    return buf.getvalue()


def _font(size: int) -> Any:
    """A scalable font of ``size`` px (DejaVu, shipped with matplotlib), else PIL's default."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def image_grid(rows: Iterable[tuple[str, Sequence[bytes]]], thumb: int = 64,
               sections: Sequence[tuple[str, int]] = ()) -> bytes:
    """A labelled grid of JPEG thumbnails: one row per (label, images).

    ``sections`` ((title, number of rows), in order) put a title bar above each
    group of rows, so groups (the most and the least complex clusters) stand apart."""
    from PIL import Image, ImageDraw

    rows = [(label, list(imgs)) for label, imgs in rows]
    ncols = max((len(imgs) for _, imgs in rows), default=1) or 1
    font, title_font = _font(14), _font(16)
    label_w, title_h, gap = 230, 26, 2
    starts = {}  # first row index of each section -> its title
    at = 0
    for title, n in sections:
        starts[at] = title
        at += n
    height = max(1, len(rows)) * (thumb + gap) + len(starts) * title_h
    canvas = Image.new("RGB", (label_w + ncols * (thumb + gap), height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for r, (label, imgs) in enumerate(rows):
        if r in starts:
            if r:  # a rule between sections
                draw.line([(0, y + 2), (canvas.width, y + 2)], fill="black", width=2)
            draw.text((4, y + 5), starts[r], fill="black", font=title_font)
            y += title_h
        draw.text((4, y + thumb // 2 - 8), label[:30], fill="black", font=font)
        for c, data in enumerate(imgs):
            try:
                im = Image.open(io.BytesIO(data)).convert("RGB").resize((thumb, thumb))
            except Exception:
                continue
            canvas.paste(im, (label_w + c * (thumb + gap), y))
        y += thumb + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def artefact_md(layout: Layout, asset: str, name: str, png: bytes, title: str) -> dg.MetadataValue:
    """Markdown metadata showing a PNG inline, saved as ``artefacts/<asset>/<name>.png``."""
    path = layout.artefact_dir(asset) / f"{name}.png"
    write_bytes(path, png, layout.tmp)
    b64 = base64.b64encode(png).decode()
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{b64})\n\n`{path}`")


#: the command that opens the run's report where a browser runs (see :func:`report_metadata`)
REPORT_COMMAND = "dbprune report --open"


def report_metadata(report: Path) -> dict[str, dg.MetadataValue]:
    """Where the HTML report is, as the UI can show it: the path (the UI's copy
    button) and the command that opens a fresh one in this machine's browser.
    Not a ``file://`` link: a browser does not follow one from a web page
    (the UI), and the webserver has no route that serves the home's files."""
    return {"report": dg.MetadataValue.path(str(report)),
            "report_open": dg.MetadataValue.text(f"{REPORT_COMMAND}   (or open {report} in a browser on this machine)")}


def histogram_png(values: np.ndarray, xlabel: str, line: float | None = None, line_label: str = "",
                  bins: int = 40) -> bytes:
    """A histogram with an optional dashed vertical line (a threshold)."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.85)
        if line is not None and np.isfinite(line):
            ax.axvline(line, color="red", ls="--", label=line_label)
            ax.legend()
        ax.set_xlabel(xlabel)

    return png_bytes(draw, (6, 3))


def drift_png(shards: Sequence[str], far_shares: Sequence[float], fit_share: float, limit: float) -> bytes:
    """The drift plot: per shard added since the fit (pool order, so newest
    last), the share of its samples beyond the fit's 99th-percentile distance,
    against the fit's own share and the alarm's limit."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        x = np.arange(len(shards))
        colours = ["tab:red" if v > limit else "tab:blue" for v in far_shares]
        ax.bar(x, np.asarray(far_shares) * 100, color=colours, alpha=0.85, width=0.8)
        ax.axhline(fit_share * 100, color="black", ls="-", label=f"the fit's own share ({fit_share:.1%})")
        ax.axhline(limit * 100, color="red", ls="--", label=f"alarm above ({limit:.1%}, over all added samples)")
        step = max(1, len(shards) // 12)
        ax.set_xticks(x[::step], [str(sh)[:10] for sh in shards][::step], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("% beyond the fit's p99 distance")
        ax.set_xlabel("shards added since the fit (pool order)")
        ax.legend(fontsize=8)

    return png_bytes(draw, (7, 3.5))


#: line styles told apart in a legend: one per seed (or per line beyond ten colours)
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))


def split_curve_label(label: str) -> tuple[str, str]:
    """``"<group> seed <n>"`` (the training step's labels) -> (group, ``"seed <n>"``);
    any other label is a group of its own."""
    group, sep, seed = str(label).rpartition(" seed ")
    return (group, f"seed {seed}") if sep and group else (str(label), "")


def curve_styles(labels: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """A distinct (colour, linestyle) per label: a colour per group (strategy) and
    a linestyle per seed; labels without seeds cycle ten colours, then linestyles."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    split = {label: split_curve_label(label) for label in labels}
    groups = list(dict.fromkeys(g for g, _ in split.values()))
    members = list(dict.fromkeys(m for _, m in split.values()))
    return {label: (colors(groups.index(g) % 10), LINESTYLES[(members.index(m) + groups.index(g) // 10) % len(LINESTYLES)])
            for label, (g, m) in split.items()}


def legend_handles(styles: Mapping[str, tuple[Any, Any]]) -> list[Any]:
    """The legend of :func:`curve_styles`' lines: one entry per group in its
    colour, then one per seed in its linestyle (grey): 9 entries for 6 × 3 lines."""
    from matplotlib.lines import Line2D

    handles, seen, seeds = [], set(), {}
    for label, (color, ls) in styles.items():
        group, seed = split_curve_label(label)
        if seed:
            seeds.setdefault(seed, ls)
        if group not in seen:
            seen.add(group)
            handles.append(Line2D([], [], color=color, linestyle="-" if seed else ls, label=group))
    if len(seeds) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=ls, label=seed) for seed, ls in seeds.items()]
    return handles


def draw_loss_curves(fig: Any, curves: Mapping[str, Sequence[Sequence[float]]], title: str) -> None:
    """The loss curves on ``fig``, styled by :func:`curve_styles`, with the legend
    beside the axes, never over the curves."""
    ax = fig.add_subplot(111)
    styles = curve_styles([str(k) for k in curves])
    for label, pts in curves.items():
        if pts:
            color, ls = styles[str(label)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle=ls, linewidth=1.2, label=str(label))
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(handles=legend_handles(styles), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                  frameon=False)


def loss_curve_png(curves: Mapping[str, Sequence[Sequence[float]]], title: str = "training loss") -> bytes:
    """One or more loss curves, ``{label: [(step, loss), ...]}``; labels
    ``"<strategy> seed <n>"`` share a colour per strategy and a linestyle per seed."""
    return png_bytes(lambda fig: draw_loss_curves(fig, curves, title), (6.4, 3.6), max_width_px=DIALOG_WIDTH_PX)


def cluster_pngs(clusters: "pl.DataFrame") -> dict[str, bytes]:
    """The plots a person needs to judge DBP's clustering and quotas, from the
    clusters table (size, d_intra, d_inter, complexity, probability, quota)."""
    sizes, quota = clusters["size"].to_numpy().astype(float), clusters["quota"].to_numpy().astype(float)
    comp, prob = clusters["complexity"].to_numpy(), clusters["probability"].to_numpy()
    bins = min(40, max(5, len(sizes) // 2))

    def distributions(fig: Any) -> None:
        ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
        ax1.hist(sizes, bins=bins)
        ax1.set_xlabel("cluster size")
        ax1.set_ylabel("clusters")
        ax2.hist(comp[np.isfinite(comp)], bins=bins, color="tab:orange")
        ax2.set_xlabel("complexity C = d_inter · d_intra")

    def quota_vs_size(fig: Any) -> None:
        ax = fig.add_subplot(111)
        sc = ax.scatter(sizes, quota, c=comp, cmap="viridis", s=18)
        lim = max(1, sizes.max() if len(sizes) else 1)
        ax.plot([0, lim], [0, lim], "k--", lw=0.7, label="keep all")
        ax.set_xlabel("cluster size |C_j|")
        ax.set_ylabel("quota N_j")
        ax.legend(loc="upper left")
        fig.colorbar(sc, ax=ax, label="complexity")

    def figure2(fig: Any) -> None:
        ax = fig.add_subplot(111)
        sc = ax.scatter(clusters["d_intra"].to_numpy(), clusters["d_inter"].to_numpy(), c=prob, cmap="magma", s=18)
        ax.set_xlabel("d_intra (mean distance to centroid)")
        ax.set_ylabel("d_inter (mean distance to l nearest centroids)")
        ax.set_title("clusters (the paper's Figure 2); colour = keep probability")
        fig.colorbar(sc, ax=ax, label="P_j")

    def kept_by_complexity(fig: Any) -> None:
        ax = fig.add_subplot(111)
        order = np.argsort(-comp)
        ax.bar(np.arange(len(order)), (quota / np.maximum(sizes, 1))[order], width=1.0)
        ax.set_xlabel("cluster, most complex first")
        ax.set_ylabel("kept fraction N_j / |C_j|")

    return {
        "size_complexity_distributions": png_bytes(distributions, (8, 3)),
        "quota_vs_size": png_bytes(quota_vs_size, (6, 4)),
        "d_intra_vs_d_inter": png_bytes(figure2, (6, 4.5)),
        "kept_fraction_by_complexity": png_bytes(kept_by_complexity, (7, 3)),
    }


REASON_COLORS = {"kept": "tab:green", "pruned": "tab:gray", "low_clip_score": "tab:orange",
                 "duplicate": "tab:purple", "corrupt": "tab:red"}


def reasons_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """A stacked bar per strategy: its samples by decision reason
    (rows hold ``strategy`` and ``reason_<reason>`` counts)."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        left = np.zeros(len(rows))
        for reason, color in REASON_COLORS.items():
            vals = np.array([row.get(f"reason_{reason}", 0) for row in rows], dtype=float)
            ax.barh([row["strategy"] for row in rows], vals, left=left, color=color, label=reason)
            left += vals
        ax.set_xlabel("samples")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="reason", frameon=False)

    return png_bytes(draw, (8, 0.5 + 0.5 * len(rows) + 1))


#: the comparison plot's panels per row: three fit Dagster's dialog (:data:`DIALOG_WIDTH_PX`)
COMPARISON_COLUMNS = 3


def _panel_grid(n: int, draw_panel: Callable[[Any, int, Any], None], title: str) -> bytes:
    """``n`` bar panels, :data:`COMPARISON_COLUMNS` to a row, at most
    :data:`DIALOG_WIDTH_PX` wide; ``draw_panel(ax, i, colors)`` draws panel ``i``."""
    ncols = min(COMPARISON_COLUMNS, max(1, n))
    nrows = -(-max(1, n) // ncols)

    def draw(fig: Any) -> None:
        import matplotlib.pyplot as plt

        colors = plt.get_cmap("tab10")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i in range(n):
            ax = axes[i // ncols][i % ncols]
            draw_panel(ax, i, colors)
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(axis="y", alpha=0.3)
        for k in range(n, nrows * ncols):
            axes[k // ncols][k % ncols].axis("off")
        fig.suptitle(title, fontsize=9)

    return png_bytes(draw, (2.8 * ncols, 2.7 * nrows), max_width_px=DIALOG_WIDTH_PX)


def _strategy_axis(ax: Any, strategies: Sequence[str], title: str, size: int) -> None:
    ax.set_xticks(range(len(strategies)))
    ax.set_xticklabels(strategies, rotation=45, ha="right", fontsize=8)
    ax.set_title(title, fontsize=size)


def comparison_png(panels: Sequence["Panel"]) -> bytes:
    """One panel per metric: a bar per strategy at its mean with the 95%
    bootstrap interval as error bar and the seed scores as dots."""

    def panel(ax: Any, i: int, colors: Any) -> None:
        p = panels[i]
        for x, values in zip(p.x, p.seed_values):
            ax.scatter([x] * len(values), values, s=8, color="black", zorder=3)
        ax.bar(p.x, p.means, color=[colors(j % 10) for j in p.x], yerr=[p.err_lo, p.err_hi], capsize=3, alpha=0.85)
        _strategy_axis(ax, p.strategies, p.title, 9)
        ax.set_ylim(0, p.y_max)

    return _panel_grid(len(panels), panel, "mean over seeds, 95% bootstrap interval; dots: seeds")


def duplicate_pairs_png(layout: Layout, pairs: Sequence[tuple[str, str, str, str]]) -> bytes | None:
    """Image grid of removed duplicates (left) beside the member each duplicates
    (pairs of uid, shard, duplicate_of, duplicate_of_shard); None when no pair's
    images are found."""
    from dbprune_assets.core.report.examples import duplicate_pairs

    rows = duplicate_pairs(layout, pairs)
    return image_grid(rows) if rows else None


def cluster_examples_png(layout: Layout, out: "ComplexityOutcome", n: int = 4) -> bytes:
    """Images of the ``n`` most and ``n`` least complex DBP clusters, a labelled row each."""
    from dbprune_assets.core.report.examples import cluster_members

    top, bottom = out.extremes(n)
    comp, size = out.column("complexity"), out.column("size")
    rows = cluster_members(layout, top + bottom)
    return image_grid([(f"#{c}  C={comp[c]:.3f}  n={size[c]}", imgs) for c, imgs in rows],
                      sections=[("most complex clusters (DBP keeps more of these)", len(top)),
                                ("least complex clusters (DBP keeps fewer)", len(bottom))])


def truth_png(found: Mapping[str, Mapping[str, float]]) -> bytes:
    """What each strategy keeps against the pool's ground truth
    (``core/strategies/truth.py``): one panel per metric, a bar per strategy."""
    from dbprune_assets.core.strategies.truth import LABELS, METRICS

    metrics, strategies = list(METRICS), list(found)

    def panel(ax: Any, i: int, colors: Any) -> None:
        values = [0.0 if v != v else v for v in (found[s].get(metrics[i], float("nan")) for s in strategies)]
        ax.bar(range(len(strategies)), values, color=[colors(j % 10) for j in range(len(strategies))], alpha=0.85)
        ax.set_ylim(0, max(values, default=0.0) * 1.15 or 1.0)
        _strategy_axis(ax, strategies, LABELS[metrics[i]], 8)

    return _panel_grid(len(metrics), panel,
                       "what each strategy keeps, against the pool's ground truth (measured, not trained)")
