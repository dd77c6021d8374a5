"""What a person sees in the Dagster UI: markdown tables, plots and image grids
embedded in asset metadata (PNG as data URIs), also saved under
``$DBPRUNE_HOME/artefacts/<asset>/`` so they can be opened outside the UI."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import dagster as dg

from ..core.atomic import write_bytes


def md_table(rows: Sequence[Mapping[str, Any]], max_rows: int = 60) -> str:
    """A markdown table of dict rows (first ``max_rows``)."""
    rows = list(rows)
    if not rows:
        return "_(empty)_"
    cols = list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"\n_… {len(rows) - max_rows} more rows_")
    return "\n".join(lines)


def png_bytes(draw: Callable[[Any], None], figsize: tuple[float, float] = (6.0, 4.0)) -> bytes:
    """Render a matplotlib drawing function ``draw(fig)`` to PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, dpi=100)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def image_md(png: bytes, title: str, save_to: Path | None = None, tmp_root: Path | None = None) -> dg.MetadataValue:
    """Markdown metadata showing a PNG inline (and saving it to ``save_to``)."""
    if save_to is not None:
        write_bytes(save_to, png, tmp_root)
    b64 = base64.b64encode(png).decode()
    where = f"\n\n`{save_to}`" if save_to is not None else ""
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{b64}){where}")


def image_grid(rows: Iterable[tuple[str, Sequence[bytes]]], thumb: int = 64) -> bytes:
    """A labelled grid of JPEG thumbnails: one row per (label, images)."""
    from PIL import Image, ImageDraw

    rows = [(label, list(imgs)) for label, imgs in rows]
    ncols = max((len(imgs) for _, imgs in rows), default=1) or 1
    label_w = 150
    canvas = Image.new("RGB", (label_w + ncols * (thumb + 2), max(1, len(rows)) * (thumb + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        y = r * (thumb + 2)
        draw.text((4, y + thumb // 2 - 6), label[:24], fill="black")
        for c, data in enumerate(imgs):
            try:
                im = Image.open(io.BytesIO(data)).convert("RGB").resize((thumb, thumb))
            except Exception:
                continue
            canvas.paste(im, (label_w + c * (thumb + 2), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
