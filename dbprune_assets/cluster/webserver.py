"""``python -m dbprune_assets.cluster webserver [ARGS]`` (deploy/docker-compose.yml):
the production webserver on a home's instance, beside ``dbprune daemon``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dbprune_assets.cluster.instance import ClusterError, dagster_instance


def main(argv: list[str] | None = None) -> int:
    """``python -m dbprune_assets.cluster webserver [ARGS]`` (deploy/docker-compose.yml):
    write this home's ``dagster.yaml`` (checking the database and broker),
    then become ``dagster-webserver -w <home>/dagster/workspace.yaml ARGS`` on
    that instance (code location ``dbprune``, the one the runs of ``dbprune
    run`` name), the production webserver beside ``dbprune daemon``."""
    from dbprune_assets.codelocation import workspace_args
    from dbprune_assets.core.store.layout import Layout

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "webserver":
        print("usage: python -m dbprune_assets.cluster webserver [dagster-webserver arguments]", file=sys.stderr)
        return 2
    layout = Layout.from_env()
    try:
        dagster_instance(layout).dispose()
    except ClusterError as e:
        print(f"dbprune: error: {e}", file=sys.stderr)
        return 2
    os.environ.update({"DAGSTER_HOME": str(layout.dagster_home), "DBPRUNE_HOME": str(layout.home),
                       "DBPRUNE_POOL": str(layout.pool)})
    exe = str(Path(sys.executable).with_name("dagster-webserver"))
    os.execv(exe, [exe, *workspace_args(layout), *args[1:]])
    return 0  # pragma: no cover - execv does not return
