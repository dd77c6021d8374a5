"""img2dataset's per-shard ``NNNNN_stats.json``, written beside the sample
pool's shards and every exported subset's tars, so tools that read
img2dataset output take them without extra files.

The format is img2dataset's ``logger.write_stats``
(https://github.com/rom1504/img2dataset/blob/95523bc7579745a1749b8132d408b9fea89a338e/img2dataset/logger.py)::

    {"count": rows attempted, "successes": samples in the tar,
     "failed_to_download": n, "failed_to_resize": n,
     "duration": end_time - start_time, "start_time": t0, "end_time": t1,
     "status_dict": {"success": successes, "<error message>": n, ...}}

written with ``json.dump(stats, f, indent=4)`` as ``{shard_id:0{oom_shard_count}d}_stats.json``.
Its downloader counts every row of the shard's parquet: ``status`` ``success``
(one sample in the tar, ``status_dict["success"]``), ``failed_to_download``
or ``failed_to_resize`` (no sample; ``status_dict`` counts the row's error
message).  Readers: DataComp's ``resharder.py`` takes a shard's size from
``int(stats["successes"])`` (and writes ``{"successes": n}`` for its own
output shards); img2dataset's logger reads every key above and divides by
``count`` and ``duration``.

The times: the files dbprune writes are a pure function of their content
(pools and exports are byte-identical for the same inputs), so instead of the
clock ``start_time`` is the tars' fixed mtime and ``end_time`` one second
later (``duration`` 1.0, never 0: img2dataset's logger divides by it).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

STATS_SUFFIX = "_stats.json"
#: img2dataset's keys, in the order ``write_stats`` writes them
STATS_KEYS: tuple[str, ...] = (
    "count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time", "end_time", "status_dict",
)
COUNT_KEYS: tuple[str, ...] = ("count", "successes", "failed_to_download", "failed_to_resize")
#: img2dataset's row statuses; ``success`` is also the status_dict key of a success
SUCCESS = "success"
FAILED_STATUSES: tuple[str, ...] = ("failed_to_download", "failed_to_resize")
#: ``duration`` of the files dbprune writes (module docstring)
FIXED_DURATION = 1.0


def stats_name(shard: str) -> str:
    """``00000_stats.json`` for shard ``00000`` (``00000.tar``)."""
    return f"{shard[:-len('.tar')] if shard.endswith('.tar') else shard}{STATS_SUFFIX}"


def shard_stats(rows: Iterable[tuple[str, str | None]], start_time: float) -> dict[str, Any]:
    """img2dataset's stats of one shard from its parquet rows, ``(status,
    error_message)`` each: ``successes`` the ``success`` rows, the failures by
    status, ``status_dict`` counting ``success`` and each failed row's error
    message (its status when it has none), most frequent first, ties by name.
    Raises ValueError for a status img2dataset does not write."""
    counts = {SUCCESS: 0, **{s: 0 for s in FAILED_STATUSES}}
    status_dict: Counter[str] = Counter()
    n = 0
    for status, error in rows:
        if status not in counts:
            raise ValueError(f"row {n}: status {status!r} is not one of img2dataset's "
                             f"({SUCCESS}, {', '.join(FAILED_STATUSES)})")
        counts[status] += 1
        status_dict[SUCCESS if status == SUCCESS else (error or status)] += 1
        n += 1
    return {
        "count": n,
        "successes": counts[SUCCESS],
        "failed_to_download": counts["failed_to_download"],
        "failed_to_resize": counts["failed_to_resize"],
        "duration": FIXED_DURATION,
        "start_time": float(start_time),
        "end_time": float(start_time) + FIXED_DURATION,
        "status_dict": dict(sorted(status_dict.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def success_stats(n: int, start_time: float) -> dict[str, Any]:
    """Stats of a shard of ``n`` samples that all succeeded (an exported subset's tar)."""
    return shard_stats(((SUCCESS, None) for _ in range(n)), start_time)


def stats_bytes(stats: Mapping[str, Any]) -> bytes:
    """The file's bytes, as img2dataset writes them (``json.dump(stats, f, indent=4)``)."""
    return json.dumps({k: stats[k] for k in STATS_KEYS}, indent=4).encode()


def check_stats(stats: Any, where: str, samples: int | None = None) -> list[str]:
    """Problems of one stats mapping read from ``where`` (empty = valid): every
    key of img2dataset's, counts whole and non-negative, ``count`` = successes
    + both failures, ``status_dict`` summing to ``count`` with ``success`` =
    ``successes``, times numbers with ``duration`` = end - start > 0, and
    ``successes`` = ``samples`` (the tar's sample count) when given."""
    if not isinstance(stats, Mapping):
        return [f"{where}: expected a JSON object, got {type(stats).__name__}"]
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        return [f"{where}: missing {', '.join(missing)} (img2dataset writes {', '.join(STATS_KEYS)})"]
    problems = []
    for k in COUNT_KEYS:
        v = stats[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.append(f"{where}: {k} is {v!r}, expected a whole number >= 0")
    for k in ("duration", "start_time", "end_time"):
        v = stats[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"{where}: {k} is {v!r}, expected a number")
    sd = stats["status_dict"]
    if not isinstance(sd, Mapping) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in sd.values()):
        problems.append(f"{where}: status_dict is {sd!r}, expected an object of message -> count")
    if problems:
        return problems
    parts = stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"]
    if stats["count"] != parts:
        problems.append(f"{where}: count {stats['count']} != successes + failed_to_download + failed_to_resize = {parts}")
    if sum(sd.values()) != stats["count"]:
        problems.append(f"{where}: status_dict totals {sum(sd.values())}, count is {stats['count']}")
    if sd.get(SUCCESS, 0) != stats["successes"]:
        problems.append(f"{where}: status_dict[{SUCCESS!r}] is {sd.get(SUCCESS, 0)}, successes is {stats['successes']}")
    if not stats["duration"] > 0 or not math.isclose(stats["end_time"] - stats["start_time"], stats["duration"]):
        problems.append(f"{where}: duration {stats['duration']} should be end_time - start_time "
                        f"= {stats['end_time'] - stats['start_time']} and > 0")
    if samples is not None and stats["successes"] != samples:
        problems.append(f"{where}: successes {stats['successes']}, but the tar holds {samples} samples")
    return problems


def read_stats(path: Path) -> Any:
    """The parsed stats file; ValueError naming it when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rewrite it (re-export the subset / regenerate the pool)") from None
