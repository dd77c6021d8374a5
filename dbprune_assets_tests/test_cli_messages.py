"""One clear line for a command given wrong: a home that does not exist, a
selection naming no asset, a malformed ``--wait``, a failed shard's cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbprune_assets.cli import main


def test_report_on_a_home_that_does_not_exist_is_refused_and_makes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DBPRUNE_HOME", str(tmp_path / "nowhere"))
    assert main(["report"]) == 2
    assert "nowhere is not a dbprune home yet (no such folder)" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_a_wait_that_is_not_a_number_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["run", "--wait", "abc"])
    assert stop.value.code == 2
    assert "argument --wait: --wait takes seconds >= 0 or inf, not 'abc'" in capsys.readouterr().err


def test_a_selection_naming_no_asset_lists_the_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.samplepool import write_datacomp_pool

    pool = tmp_path / "pool"
    write_datacomp_pool(pool, PoolSettings(shards=1, samples_per_shard=50, concepts=4, seed=1), models=("b32",))
    monkeypatch.setenv("DBPRUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DBPRUNE_POOL", str(pool))
    assert main(["run", "--select", "pruned_subset+,prunedsubset"]) == 2
    err = capsys.readouterr().err
    assert "--select 'pruned_subset+,prunedsubset': AssetKey(s) ['prunedsubset'] were selected" in err
    assert "the assets are encoder, raw_metadata," in err and "pruned_subset" in err


def test_a_failed_shards_line_names_the_shard_once(tmp_path: Path) -> None:
    from dbprune_assets.core.store.layout import UNPARTITIONED, Layout
    from dbprune_assets.core.store.state import State, write_state
    from dbprune_assets.summary import failed_shard_lines

    layout = Layout.from_env(tmp_path / "home", tmp_path / "pool")
    write_state(layout, "pool_manifest", UNPARTITIONED, State("f", "f", {"failed_shards": ["b05b"]}))
    write_state(layout, "raw_metadata", "b05b", State("f", "f", {"failed": "shard b05b: b05b.npz cannot be read"}))
    assert failed_shard_lines(layout)[1] == "  b05b: b05b.npz cannot be read"


def test_ui_on_a_port_in_use_is_refused_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """dagster dev whose webserver cannot bind goes on running its daemon:
    the address printed would answer with whatever holds the port."""
    import socket

    monkeypatch.setenv("DBPRUNE_HOME", str(tmp_path / "home"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 75
    err = capsys.readouterr().err
    assert f"cannot serve the UI on 127.0.0.1:{port}: Address already in use" in err and "--port" in err
    assert not (tmp_path / "home").exists()  # refused before the home is touched


def test_servers_that_end_by_themselves_are_said_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dbprune_assets import servers

    from .uiproc import free_port

    monkeypatch.setenv("DBPRUNE_HOME", str(tmp_path / "home"))
    for name in ("DBPRUNE_POOL", "DAGSTER_HOME", "PYTHONSAFEPATH"):
        monkeypatch.setenv(name, "")  # cmd_ui sets them for its servers: restored after the test
    monkeypatch.setattr(servers, "supervise", lambda argv, grace_s=None: 3)
    assert main(["ui", "--port", str(free_port())]) == 3
    assert ("dbprune: the Dagster UI ended by itself (exit status 3), not stopped: the lines above say why"
            in capsys.readouterr().err)
    monkeypatch.setattr(servers, "supervise", lambda argv, grace_s=None: 0)  # stopped by a signal: no line
    assert main(["ui", "--port", str(free_port())]) == 0
    assert "ended by itself" not in capsys.readouterr().err
