"""The one table renderer (core/report/tables.py): the same rows as markdown
(asset metadata in the Dagster UI) and as HTML (the report page)."""

from __future__ import annotations

from dbprune_assets.core.report.page import html_table
from dbprune_assets.core.report.tables import md_table as md_table_core
from dbprune_assets.defs.plots import md_table

ROWS = [
    {"name": "a|b", "score": 0.123456, "n": 3, "note": None},
    {"name": "x<y & z", "score": 12345.678, "n": 10},  # "note" missing: an empty cell, as None
]


def test_markdown_by_hand() -> None:
    assert md_table is md_table_core  # the asset modules' import path
    assert md_table(ROWS) == (
        "| name | score | n | note |\n"
        "|---|---|---|---|\n"
        "| a\\|b | 0.1235 | 3 |  |\n"
        "| x<y & z | 1.235e+04 | 10 |  |"
    )


def test_html_by_hand() -> None:
    assert html_table(ROWS) == (
        '<div class="scroll"><table><thead><tr><th>name</th><th>score</th><th>n</th><th>note</th></tr></thead>'
        "<tbody><tr><td>a|b</td><td>0.1235</td><td>3</td><td></td></tr>"
        "<tr><td>x&lt;y &amp; z</td><td>1.235e+04</td><td>10</td><td></td></tr></tbody></table></div>"
    )


def test_row_limits_and_empty_tables() -> None:
    assert md_table(ROWS, max_rows=1).endswith("| a\\|b | 0.1235 | 3 |  |\n\n_… 1 more rows_")
    assert html_table(ROWS, max_rows=1).endswith("</table></div><p><em>… 1 more rows</em></p>")
    assert md_table([]) == "_(empty)_"
    assert html_table([]) == "<p><em>(empty)</em></p>"
    text = md_table([{"line": "two\nlines"}])
    assert text.splitlines()[-1] == "| two lines |"
