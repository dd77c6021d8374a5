"""The closing lines of ``dbprune run``: what ran, the shards left out, the
comparison, the ground-truth verdicts and where the results are."""

from __future__ import annotations

from pathlib import Path

from dbprune_assets.core.store.layout import Layout


def failed_shard_lines(layout: Layout, limit: int = 10) -> list[str]:
    """The shards the last manifest left out of the pool (a schema that cannot
    be read), each with its cause: a run that finishes without them says so."""
    from dbprune_assets.core.store.layout import UNPARTITIONED
    from dbprune_assets.core.store.state import read_state

    manifest = read_state(layout, "pool_manifest", UNPARTITIONED)
    failed = list(manifest.summary.get("failed_shards", [])) if manifest else []
    if not failed:
        return []
    lines = [f"\n{len(failed)} shard(s) are not in the results (each has one problems row, stage ingest, with "
             "its cause):"]
    for shard in failed[:limit]:
        st = read_state(layout, "raw_metadata", shard)
        cause = str(st.summary.get("failed", "?")) if st else "not ingested"
        lines.append(f"  {shard}: {cause.removeprefix(f'shard {shard}: ')}")  # the cause may name it already
    if len(failed) > limit:
        lines.append(f"  … and {len(failed) - limit} more: dbprune sql \"SELECT * FROM problems WHERE stage = 'ingest'\"")
    return lines


def print_summary(layout: Layout, report) -> None:
    from dbprune_assets.core.strategies.truth import summary_lines
    from dbprune_assets.refits import group_counts

    # a group refused before it started is neither run nor up to date
    refused = not report.ok and report.groups and not report.groups[-1].partitions
    ran, current, again = group_counts(report.groups[:-1] if refused else report.groups)
    print(f"\n{'done' if report.ok else 'FAILED'} in {report.seconds:.0f}s: {ran} group(s) ran"
          f"{f' ({again} of them again after a refit)' if again else ''}, {current} up to date")
    for line in failed_shard_lines(layout):
        print(line)
    comparison = layout.artefact_dir("comparison") / "comparison.md"
    if report.ok and comparison.exists():
        if report.stale_models:
            print(f"\n! the comparison below is NOT current: the subsets of {', '.join(report.stale_models)} changed "
                  "since their models were trained (`dbprune run` retrains those, and only those)")
        print("\n" + comparison.read_text())
    print("\n".join(summary_lines(layout, shown=report.ok and comparison.exists())))
    print("\n".join(where_to_look(layout, report)))


def where_to_look(layout: Layout, report) -> list[str]:
    """The summary's closing lines: where the run's results are."""
    from dbprune_assets.core.store.layout import UNPARTITIONED
    from dbprune_assets.core.store.state import read_state

    lines = ["\nwhere to look:",
             f"  tables   {layout.home / 'tables'}  (SQL: dbprune sql \"SELECT status, count(*) FROM samples GROUP BY 1\")",
             f"  subsets  {layout.home / 'subsets'}"]
    if not report.metadata_only:
        lines.append(f"  models   {layout.home / 'models'}")
    compared = read_state(layout, "comparison", UNPARTITIONED)
    page = Path(compared.summary["report"]) if compared and compared.summary.get("report") else None
    if page is not None and page.exists():
        ours = any("comparison" in g.ran for g in report.groups)  # else an earlier run's comparison wrote it
        lines.append(f"  report   {page}  ({'one HTML page' if ours else 'of an earlier run'}; "
                     "`dbprune report` writes a new one)")
    lines.append(f"  UI       dbprune ui   (Dagster instance {layout.dagster_home})")
    return lines
