"""Dagster's private modules (``dagster._…``): the run launcher and the
embedded instance's storage need a few, they may move in any Dagster release,
so they live in two modules (``dbprune_assets/cluster/launcher.py`` and
``cluster/sqlite_events.py``) and each is checked here by name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dbprune_assets"
LAUNCHER = PACKAGE / "cluster" / "launcher.py"
STORAGE = PACKAGE / "cluster" / "sqlite_events.py"
ALLOWED = (LAUNCHER, STORAGE)


def _private_imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every import of a Dagster private module in ``path``
    (``name`` empty for a plain ``import dagster._x``)."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("dagster._"):
                found += [(node.module, alias.name) for alias in node.names]
            elif node.module == "dagster":
                found += [(f"dagster.{alias.name}", "") for alias in node.names if alias.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("dagster._")]
    return found


LAUNCHER_PRIVATE = sorted(set(_private_imports(LAUNCHER)) | set(_private_imports(STORAGE)))


def test_the_launcher_names_the_private_imports_it_uses() -> None:
    assert LAUNCHER_PRIVATE, "cluster/launcher.py imports no dagster._ name: drop this test and DAGSTER_CHECKED"


@pytest.mark.parametrize(("module", "name"), LAUNCHER_PRIVATE, ids=[f"{m}.{n}" for m, n in LAUNCHER_PRIVATE])
def test_each_private_dagster_name_the_launcher_uses_still_exists(module: str, name: str) -> None:
    import dagster

    from dbprune_assets.cluster.launcher import DAGSTER_CHECKED

    where = f"{module}.{name}" if name else module
    try:
        found = importlib.import_module(module)
        if name:
            getattr(found, name)
    except (ImportError, AttributeError):
        pytest.fail(f"Dagster {dagster.__version__} moved `{where}`; dbprune was checked against "
                    f"{DAGSTER_CHECKED}: update cluster/launcher.py or cluster/sqlite_events.py", pytrace=False)


def test_no_other_module_of_the_package_imports_dagster_private_modules() -> None:
    others = {str(p.relative_to(PACKAGE.parent)): _private_imports(p)
              for p in sorted(PACKAGE.rglob("*.py")) if p not in ALLOWED}
    offenders = {path: [f"{m}.{n}" if n else m for m, n in found] for path, found in others.items() if found}
    assert not offenders, ("Dagster's private modules are imported only in dbprune_assets/cluster/launcher.py "
                           f"and cluster/sqlite_events.py (wrap what you need in a function there): {offenders}")


def test_the_data_version_tags_are_dagsters() -> None:
    """``defs/dataversions.py`` names Dagster's data-version tags as strings
    (importing them would be a private import); they must be Dagster's."""
    from dagster._core.definitions.data_version import DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG

    from dbprune_assets.defs import dataversions

    assert (dataversions.DATA_VERSION_TAG, dataversions.DATA_VERSION_IS_USER_PROVIDED_TAG) == (
        DATA_VERSION_TAG, DATA_VERSION_IS_USER_PROVIDED_TAG)
