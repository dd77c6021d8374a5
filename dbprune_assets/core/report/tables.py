"""One renderer for tables of dict rows: the cells are formatted once
(:func:`cell_text`), then written as markdown (asset metadata in the Dagster
UI, :func:`md_table`) or as HTML (the report page, :func:`html_table`).

The columns are the first row's keys; a key missing from a later row, like a
``None``, is an empty cell; floats show 4 significant digits.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class TextTable:
    """A table's columns and the text of each shown cell, ``hidden`` rows left out."""

    columns: list[str]
    cells: list[list[str]]
    hidden: int


def cell_text(value: Any) -> str:
    """A cell's text: empty for ``None``, 4 significant digits for a float, ``str`` otherwise."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(rows: Sequence[Mapping[str, Any]], max_rows: int | None = None) -> TextTable | None:
    """The first ``max_rows`` (all when ``None``) of ``rows`` as text; ``None`` for no rows."""
    rows = list(rows)
    if not rows:
        return None
    columns = [str(c) for c in rows[0].keys()]
    shown = rows if max_rows is None else rows[:max_rows]
    cells = [[cell_text(r.get(c)) for c in rows[0].keys()] for r in shown]
    return TextTable(columns, cells, len(rows) - len(shown))


def md_table(rows: Sequence[Mapping[str, Any]], max_rows: int = 60) -> str:
    """A markdown table of dict rows (first ``max_rows``); ``|`` and line breaks in cells are escaped."""
    t = text_table(rows, max_rows)
    if t is None:
        return "_(empty)_"

    def md(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in t.cells]
    if t.hidden:
        lines.append(f"\n_… {t.hidden} more rows_")
    return "\n".join(lines)


def breakable(text: str) -> str:
    """``text`` as HTML with a line-break opportunity (``<wbr>``) after each
    ``_``, ``/`` and ``@``, so a column headed ``text_retrieval_recall@10`` can
    be as narrow as its values instead of its name."""
    out = html.escape(text)
    for ch in "_/@":
        out = out.replace(ch, ch + "<wbr>")
    return out


def html_table(rows: Sequence[Mapping[str, Any]], max_rows: int | None = None) -> str:
    """An HTML table of dict rows (first ``max_rows``, all when ``None``), in a
    box as wide as the page at most, scrolling what is wider (``.scroll`` in
    the report's style); headers may wrap at ``_``, ``/`` and ``@``."""
    t = text_table(rows, max_rows)
    if t is None:
        return "<p><em>(empty)</em></p>"
    head = "".join(f"<th>{breakable(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.cells)
    more = f"<p><em>… {t.hidden} more rows</em></p>" if t.hidden else ""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}'
