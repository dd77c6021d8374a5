"""What ``dbprune run`` does after a group that assigned shards to a held fit.

A fit (``dedup_centroids``, ``centroids``) is kept across pool changes
(``core/method/fitrecord.py``); the shards added since are assigned to it in
the same run, and only then can the drift alarm be measured.  So after each
group that wrote a fit's assignments the runner prints the alarm's line and,
when the alarm fires under ``refit: auto``, goes back to the fit's group: the
fit is redone on the whole pool and every shard is assigned again.
"""

from __future__ import annotations

from typing import Any


def after_assignments(pipeline: Any, groups: list[list[str]], i: int, refitted: set[str]) -> int | None:
    """After group ``i``, when it wrote the assignments of a fit made earlier
    (``core/method/fitrecord.py``): one line on the shards added since the fit
    (the drift alarm), and the fit's group to go back to when the alarm makes
    ``refit: auto`` redo it (once per run); else None."""
    from dbprune_assets.core.method import fitrecord
    from dbprune_assets.defs.common import registered_shards

    wrote = {t for a in groups[i] for t in pipeline.nodes[a].facts.shard_tables}
    settings, layout, echo = pipeline.settings, pipeline.layout, pipeline.echo
    for j, group in enumerate(groups[:i]):
        for fit in group:
            table = pipeline.nodes[fit].facts.fit
            if not table or table not in wrote or (record := fitrecord.read_record(layout.home, fit)) is None:
                continue
            shards = registered_shards(sorted(pipeline.instance.get_dynamic_partitions("shards")), layout.pool)
            verdict, _ = fitrecord.drift_of(layout, record, shards, table, settings.drift.factor,
                                            settings.drift.min_samples)
            if not verdict.shards:
                continue
            echo(f"  drift: {verdict.line(fit)}")
            if not verdict.fires:
                continue
            if settings.centroids_from:
                echo(f"  kept (the fit of {settings.centroids_from}): `dbprune run --centroids-from none --refit "
                     "always` fits this pool's own clusters")
            elif settings.refit == "never":
                echo("  kept (refit: never): `dbprune run --refit always` refits on this pool")
            elif fit not in refitted:
                echo(f"  refitting {fit} (refit: auto), then every shard is assigned to the new clusters")
                refitted.add(fit)
                pipeline.forced.add(fit)  # its step then finds the alarm and fits anew (fitrecord.holds)
                return j
    return None


def group_counts(groups: list[Any]) -> tuple[int, int, int]:
    """``(ran, up to date, again)`` of a run's group results: a group the runner
    went back to after a refit (:func:`after_assignments`) is one group, that
    ran when any of its passes did; ``again`` counts the passes after the first."""
    ran: dict[tuple[str, ...], bool] = {}
    for g in groups:
        key = tuple(g.assets)
        ran[key] = ran.get(key, False) or bool(g.partitions)
    n_ran = sum(ran.values())
    return n_ran, len(ran) - n_ran, len(groups) - len(ran)
