"""The Dagster code location the UI serves, and the origin every run of
``dbprune run`` carries so that the UI can re-execute it.

``dbprune run`` executes its runs itself (in process, or on Celery workers)
rather than through a code location, so Dagster records no origin for them;
the UI's "Re-execute" looks the parent run's job up in the code location its
origin names, and fails on a run without one.  Each run is therefore given
the origin of location :data:`CODE_LOCATION` (module :data:`CODE_MODULE`),
the one ``workspace.yaml`` serves, and :func:`workspace_args` for the
servers ``dbprune ui`` and ``dbprune daemon`` start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dbprune_assets.core.store.layout import Layout

#: the code location the UI serves: the origin of the runs of ``dbprune run``
CODE_LOCATION = "dbprune"
#: the module that location loads
CODE_MODULE = "dbprune_assets.definitions"


def ui_workspace_yaml() -> str:
    """A Dagster workspace file (``dagster dev -w FILE``) serving
    :data:`CODE_MODULE` as location :data:`CODE_LOCATION`."""
    return ("load_from:\n  - python_module:\n"
            f"      module_name: {CODE_MODULE}\n      location_name: {CODE_LOCATION}\n")


def workspace_args(layout: "Layout") -> list[str]:
    """What makes ``dagster dev``, ``dagster-webserver`` and ``dagster-daemon
    run`` serve location :data:`CODE_LOCATION` (``-m`` would name it after
    the module): ``-w`` and the workspace file :func:`ui_workspace_yaml` in
    the home's Dagster folder, written when it differs."""
    from dbprune_assets.core.store.atomic import write_bytes

    path = layout.dagster_home / "workspace.yaml"
    text = ui_workspace_yaml()
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, text.encode(), layout.tmp)
    return ["-w", str(path)]


def give_ui_origin(instance: Any, run_ids: list[str], repository: str) -> None:
    """Give the runs ``run_ids`` of ``dbprune run`` the origin of the code
    location the UI serves (``repository``: the name of the definitions'
    repository, ``Definitions.get_repository_def().name``)."""
    from dbprune_assets.cluster.launcher import give_ui_origin as give

    for run_id in run_ids:
        give(instance, run_id, CODE_MODULE, CODE_LOCATION, repository)
