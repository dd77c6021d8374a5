"""img2dataset's per-shard ``_stats.json``: counting as its downloader does, the
file format of its ``logger.write_stats``, and the checks that catch bad files.

Reference: img2dataset/logger.py (write_stats, CappedCounter) and downloader.py
at https://github.com/rom1504/img2dataset/tree/95523bc7579745a1749b8132d408b9fea89a338e
"""

from __future__ import annotations

import json

import pytest

from dbprune_assets.core.pool.shard_stats import check_stats, shard_stats, stats_bytes, stats_name, success_stats


def test_counts_like_img2dataset() -> None:
    rows = [
        ("success", None),
        ("failed_to_download", "HTTP Error 404: Not Found"),
        ("success", None),
        ("failed_to_resize", "image decoding failed"),
        ("failed_to_download", "HTTP Error 404: Not Found"),
        ("failed_to_download", "The read operation timed out"),
        ("success", None),
    ]
    s = shard_stats(rows, start_time=100.0)
    # by hand: 7 rows, 3 successes, 3 failed downloads (2 x 404, 1 timeout), 1 failed resize
    assert s == {
        "count": 7, "successes": 3, "failed_to_download": 3, "failed_to_resize": 1,
        "duration": 1.0, "start_time": 100.0, "end_time": 101.0,
        "status_dict": {"success": 3, "HTTP Error 404: Not Found": 2, "The read operation timed out": 1,
                        "image decoding failed": 1},
    }
    assert check_stats(s, "x", samples=3) == []
    # a failure without a message is counted under its status
    assert shard_stats([("failed_to_download", None)], 0.0)["status_dict"] == {"failed_to_download": 1}
    with pytest.raises(ValueError, match="row 1: status 'ok' is not one of img2dataset's"):
        shard_stats([("success", None), ("ok", None)], 0.0)


def test_file_bytes_are_write_stats_s() -> None:
    s = success_stats(2, 0.0)
    text = stats_bytes(s).decode()
    # logger.write_stats: a dict in this key order, json.dump(stats, f, indent=4)
    assert text == json.dumps({
        "count": 2, "successes": 2, "failed_to_download": 0, "failed_to_resize": 0,
        "duration": 1.0, "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": 2},
    }, indent=4)
    assert (stats_name("00012"), stats_name("00012.tar")) == ("00012_stats.json", "00012_stats.json")
    assert success_stats(0, 0.0)["status_dict"] == {}  # an empty CappedCounter dumps {}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"successes": -1}, "x: successes is -1, expected a whole number >= 0"),
        ({"count": True}, "x: count is True, expected a whole number >= 0"),
        ({"count": 3}, "x: count 3 != successes + failed_to_download + failed_to_resize = 2"),
        ({"start_time": "now"}, "x: start_time is 'now', expected a number"),
        ({"status_dict": {"success": 1, "HTTP Error 404": 0}}, "x: status_dict totals 1, count is 2"),
        ({"status_dict": {"HTTP Error 404": 2}}, "x: status_dict['success'] is 0, successes is 2"),
        ({"duration": 0.0, "end_time": 0.0}, "x: duration 0.0 should be end_time - start_time = 0.0 and > 0"),
        ({"duration": 5.0}, "x: duration 5.0 should be end_time - start_time = 1.0 and > 0"),
    ],
)
def test_check_stats_finds(change: dict, problem: str) -> None:
    s = {**success_stats(2, 0.0), **change}
    assert problem in check_stats(s, "x")


def test_check_stats_missing_keys_and_sample_count() -> None:
    s = success_stats(2, 0.0)
    del s["failed_to_resize"]
    assert check_stats(s, "x")[0].startswith("x: missing failed_to_resize (img2dataset writes count, successes")
    assert check_stats([], "x") == ["x: expected a JSON object, got list"]
    assert check_stats(success_stats(2, 0.0), "x", samples=3) == ["x: successes 2, but the tar holds 3 samples"]
