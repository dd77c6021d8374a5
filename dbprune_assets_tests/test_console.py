"""What reaches the console of `dbprune run`: library warnings and bars go to
the home's library log unless -v."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dbprune_assets.core.running.console import LIBRARY_LOG, quiet_libraries


def test_library_records_go_to_the_log_and_bars_are_off(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tqdm import tqdm  # imported before, as it is by the time a run's steps draw bars

    before = list(logging.getLogger().handlers)
    had = os.environ.get("TQDM_DISABLE")
    with quiet_libraries(tmp_path, verbose=False) as path:
        logging.warning("No pretrained weights loaded for model 'dbprune-tiny'")  # as open_clip warns
        assert os.environ["TQDM_DISABLE"] == "1"  # for the training subprocesses
        assert tqdm(range(2)).disable  # a library's bar
        assert not tqdm(range(2), disable=False).disable  # dbprune's own
    assert path == tmp_path / LIBRARY_LOG
    assert "No pretrained weights loaded" in path.read_text()
    assert "No pretrained" not in capsys.readouterr().err
    assert logging.getLogger().handlers == before and os.environ.get("TQDM_DISABLE") == had
    assert not tqdm(range(2), file=None).disable or had  # bars are back


def test_verbose_changes_nothing(tmp_path: Path) -> None:
    before = list(logging.getLogger().handlers)
    with quiet_libraries(tmp_path, verbose=True) as path:
        assert path is None and logging.getLogger().handlers == before
    assert not (tmp_path / LIBRARY_LOG).exists()
