"""A home remembers its pool (core/store/homepool.py): a run that forgot
``DBPRUNE_POOL`` on a pruned home is refused before it generates the sample
pool and drops the home's shards; a pool that moved is followed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dbprune_assets.core.store.homepool import (HomePoolError, check_home_pool, record_file, remember_pool,
                                                remembered_pool)
from dbprune_assets.core.store.layout import Layout

from .conftest import run_cli, write_config


def test_a_new_home_records_its_pool_and_the_same_pool_passes(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    layout = Layout.from_env(tmp_path / "home", pool)
    assert check_home_pool(layout, True) is None and remembered_pool(layout) is None
    remember_pool(layout)
    assert remembered_pool(layout) == pool.resolve()
    assert check_home_pool(layout, True) is None
    # a pool folder not made yet is not recorded
    assert remember_pool(Layout.from_env(tmp_path / "other", tmp_path / "nowhere")) is None
    assert not record_file(Layout.from_env(tmp_path / "other", tmp_path / "nowhere")).exists()


def test_another_pool_is_refused_while_the_homes_own_is_there(tmp_path: Path) -> None:
    own, other = tmp_path / "own", tmp_path / "other"
    own.mkdir(), other.mkdir()
    remember_pool(Layout.from_env(tmp_path / "home", own))
    for pool, from_env, named in ((other, True, f"DBPRUNE_POOL={other}"),
                                  (None, False, "the default $DBPRUNE_HOME/pool: DBPRUNE_POOL is not set")):
        with pytest.raises(HomePoolError) as err:
            check_home_pool(Layout.from_env(tmp_path / "home", pool), from_env)
        assert f"holds the results of the pool {own}" in str(err.value) and named in str(err.value)
        assert f"Set DBPRUNE_POOL={own}" in str(err.value) and str(tmp_path / "home" / "pool.json") in str(err.value)


def test_a_moved_pool_is_followed_only_where_dbprune_pool_names_it(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    remember_pool(Layout.from_env(tmp_path / "home", old))
    old.rename(new)
    with pytest.raises(HomePoolError, match="which is not there now, and DBPRUNE_POOL is not set"):
        check_home_pool(Layout.from_env(tmp_path / "home"), False)
    moved = Layout.from_env(tmp_path / "home", new)
    assert check_home_pool(moved, True) == (f"the pool {old} this home was built on is gone; the home now "
                                            f"follows {new}")
    remember_pool(moved)
    assert remembered_pool(moved) == new and check_home_pool(moved, True) is None


def test_a_run_that_forgot_dbprune_pool_leaves_the_pruned_home_as_it_was(tmp_path: Path) -> None:
    """The user's case: a DataComp pool pruned, then ``dbprune run`` without
    ``DBPRUNE_POOL``.  Refused (status 2) naming the pool; no sample pool is
    generated and the samples and decisions are those of the last run; with
    the pool named again, the run finds everything up to date."""
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.samplepool import write_datacomp_pool

    from .test_pool_changes import decisions_digest

    pool, home = tmp_path / "pool", tmp_path / "home"
    write_datacomp_pool(pool, PoolSettings(shards=2, samples_per_shard=100, concepts=6, seed=3), models=("b32",))
    config = write_config(tmp_path / "c.yaml", embeddings={"source": "datacomp", "model": "b32"},
                          semdedup={"eps": 0.07})
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool)}
    first = run_cli("run", "--config", str(config), "--select", "*pruned_subset", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    before = decisions_digest(home)
    forgot = run_cli("run", env={**env, "DBPRUNE_POOL": ""})
    assert forgot.returncode == 2
    assert f"holds the results of the pool {pool}" in forgot.stderr and f"Set DBPRUNE_POOL={pool}" in forgot.stderr
    assert not (home / "pool").exists() and decisions_digest(home) == before
    again = run_cli("run", "--select", "*pruned_subset", env=env)
    assert again.returncode == 0 and "0 group(s) ran" in again.stdout, again.stdout + again.stderr
    # moved: followed where DBPRUNE_POOL names the new place
    shutil.move(pool, tmp_path / "moved")
    moved = run_cli("run", "--select", "*pruned_subset", env={**env, "DBPRUNE_POOL": str(tmp_path / "moved")})
    assert moved.returncode == 0 and f"the home now follows {tmp_path / 'moved'}" in moved.stdout
    assert decisions_digest(home) == before


@pytest.mark.parametrize("command", ["ui", "daemon"], ids=["ui-command", "daemon-command"])
def test_ui_and_daemon_refuse_another_pool_before_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], command: str) -> None:
    """The pool sensor of ``dbprune ui`` or ``daemon`` would drop the home's
    shards just as a run would: refused (status 2) before any server starts."""
    from dbprune_assets import servers
    from dbprune_assets.cli import main

    own = tmp_path / "own"
    own.mkdir()
    remember_pool(Layout.from_env(tmp_path / "home", own))
    monkeypatch.setenv("DBPRUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DBPRUNE_POOL", raising=False)
    monkeypatch.setattr(servers, "supervise", lambda *a, **k: pytest.fail("a server started"))
    assert main([command]) == 2
    assert f"holds the results of the pool {own}, but this run's pool is {tmp_path / 'home' / 'pool'}" \
        in capsys.readouterr().err
