"""The check of an exported subset against its decisions (the asset check).

:func:`verify_export` lists the problems of ``subsets/<strategy>/`` as
:func:`dbprune_assets.core.store.export.export_subset` writes it: the folder
(tars vs ``sizes.json``, numbering, equal sizes, stats files), the samples in
the tars vs the kept decisions (streamed into DuckDB: bounded memory), and
the id file (:mod:`dbprune_assets.core.store.subset_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dbprune_assets.core.pool import wds
from dbprune_assets.core.pool.shard_stats import STATS_SUFFIX, check_stats, read_stats, stats_name
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.store.kept import all_hex, count_kept, default_samples_dir, kept_connection
from dbprune_assets.core.store.subset_files import (
    SHARD_RE,
    SIZES_FILE,
    STATS_RE,
    UIDS_FILE,
    read_sizes,
    shard_name,
    verify_id_file,
)

#: keys per insert into the ``found`` table
_FOUND_BATCH = 1 << 16


def verify_export(
    out_dir: Path,
    decisions_path: Path,
    *,
    samples_dir: Path | None = None,
    tmp_root: Path | None = None,
    memory_limit: str = "1GB",
    limit: int = 5,
    images: bool = True,
    kept: Any = None,
) -> list[str]:
    """Problems of an exported subset against its decisions (empty = healthy):
    missing / extra / repeated samples, shard files vs ``sizes.json``, unequal
    shard sizes, each tar's ``NNNNN_stats.json`` (present, img2dataset's keys,
    ``successes`` = the tar's samples, no stray ones), and ``uids.npy`` /
    ``keys.txt`` vs the kept uids.  Streams the
    tars; the comparison runs in DuckDB (bounded memory).  ``kept``: the
    export's own :func:`~.kept.kept_connection`, when it is still open."""
    out_dir = Path(out_dir)
    decisions_path = Path(decisions_path)
    samples_dir = default_samples_dir(decisions_path, samples_dir)
    if not out_dir.is_dir():
        return [f"{out_dir}: no exported subset"]
    if not images:  # uids.npy alone (a metadata-only pool)
        return _verify_uids_only(out_dir, decisions_path, samples_dir, tmp_root, memory_limit, limit, kept)
    try:
        sizes = read_sizes(out_dir)
    except (OSError, ValueError) as err:
        return [str(err)]
    tars = sorted(p.name for p in out_dir.iterdir() if SHARD_RE.match(p.name))
    problems = _folder_problems(sizes, tars, limit)
    with kept_connection(decisions_path, samples_dir, tmp_root, memory_limit, given=kept) as con:
        problems += _read_tars(con, out_dir, tars, sizes)
        problems += _stray_stats(out_dir, tars, limit)
        problems += _found_vs_kept(con, limit)
        n_kept = count_kept(con)
        if sum(sizes.values()) != n_kept:
            problems.append(f"{SIZES_FILE} totals {sum(sizes.values())} samples, the decisions keep {n_kept}")
        problems += verify_id_file(con, out_dir, n_kept, all_hex(con))
    return problems


def _verify_uids_only(out_dir: Path, decisions_path: Path, samples_dir: Path, tmp_root: Path | None,
                      memory_limit: str, limit: int, kept: Any = None) -> list[str]:
    """Problems of the subset of a pool without images: ``uids.npy`` alone."""
    extra = sorted(p.name for p in out_dir.iterdir() if p.name != UIDS_FILE)
    with kept_connection(decisions_path, samples_dir, tmp_root, memory_limit, images=False, given=kept) as con:
        ids = verify_id_file(con, out_dir, count_kept(con), True)
    return ([f"files beside {UIDS_FILE} in a subset without images: {extra[:limit]}"] if extra else []) + ids


def _folder_problems(sizes: dict[str, int], tars: list[str], limit: int) -> list[str]:
    """The tars vs ``sizes.json``: the same names, numbered from 00000.tar,
    equal sizes but the last."""
    problems: list[str] = []
    if sorted(sizes) != tars:
        problems.append(f"{SIZES_FILE} lists {sorted(set(sizes) - set(tars))[:limit]} without a tar; tars {sorted(set(tars) - set(sizes))[:limit]} are not in it")
    if tars != [shard_name(i) for i in range(len(tars))]:
        problems.append(f"shards are not numbered 00000.tar onwards: {tars[:limit]}")
    counts = [sizes[t] for t in sorted(sizes)]
    if len(counts) > 1 and (len(set(counts[:-1])) != 1 or counts[-1] > counts[0]):
        problems.append(f"shard sizes are not equal (but the last): {counts[:limit]}...")
    return problems


def _read_tars(con: Any, out_dir: Path, tars: list[str], sizes: dict[str, int]) -> list[str]:
    """Stream every tar's sample keys into the table ``found`` (tar, key);
    problems of each tar: unreadable, its sample count vs ``sizes.json``, its
    stats file."""
    import pyarrow as pa

    problems: list[str] = []
    con.execute("CREATE TABLE found (tar VARCHAR, key VARCHAR)")
    for t in progress(tars, desc="export: verifying shards", unit="shard"):
        buf: list[str] = []
        n_t = 0
        try:
            for key, _ in wds.iter_samples(out_dir / t):
                buf.append(key)
                n_t += 1
                if len(buf) >= _FOUND_BATCH:
                    _insert_found(con, pa, t, buf)
                    buf = []
        except (wds.TarDamaged, OSError) as err:
            problems.append(f"{t}: unreadable ({err})")
        _insert_found(con, pa, t, buf)
        if t in sizes and sizes[t] != n_t:
            problems.append(f"{t}: holds {n_t} samples, {SIZES_FILE} says {sizes[t]}")
        problems += _verify_stats(out_dir / stats_name(t), n_t)
    return problems


def _insert_found(con: Any, pa: Any, tar: str, keys: list[str]) -> None:
    if not keys:
        return
    con.register("found_batch", pa.table({"tar": [tar] * len(keys), "key": keys}))
    con.execute("INSERT INTO found SELECT tar, key FROM found_batch")
    con.unregister("found_batch")


def _verify_stats(path: Path, samples: int) -> list[str]:
    """Problems of one exported tar's stats file (``samples``: what the tar holds)."""
    if not path.is_file():
        return [f"{path.name} is missing (img2dataset's stats of {path.name[: -len(STATS_SUFFIX)]}.tar)"]
    try:
        stats = read_stats(path)
    except (OSError, ValueError) as err:
        return [str(err)]
    problems = check_stats(stats, path.name, samples)
    if not problems and (stats["failed_to_download"] or stats["failed_to_resize"]):
        problems.append(f"{path.name}: an export has no failed samples, got {stats['failed_to_download']} + "
                        f"{stats['failed_to_resize']}")
    return problems


def _stray_stats(out_dir: Path, tars: list[str], limit: int) -> list[str]:
    """Stats files without their tar."""
    stray = sorted(p.name for p in out_dir.iterdir()
                   if STATS_RE.match(p.name) and p.name[: -len(STATS_SUFFIX)] + ".tar" not in tars)
    return [f"stats files without a tar: {stray[:limit]}"] if stray else []


def _found_vs_kept(con: Any, limit: int) -> list[str]:
    """The samples found in the tars vs the kept ones: repeated, missing, extra."""
    problems: list[str] = []
    repeated = con.execute(
        "SELECT key, count(*) FROM found GROUP BY key HAVING count(*) > 1 ORDER BY key LIMIT ?", [limit]
    ).fetchall()
    if repeated:
        problems.append(f"samples exported more than once: {[k for k, _ in repeated]}")
    n_missing, ex = _keys_not_in(con, "kept", "found", limit)
    if n_missing:
        problems.append(f"{n_missing} kept samples are missing from the export, e.g. {ex}")
    n_extra, ex = _keys_not_in(con, "found", "kept", limit)
    if n_extra:
        problems.append(f"{n_extra} exported samples are not kept by the decisions, e.g. {ex}")
    return problems


def _keys_not_in(con: Any, table: str, other: str, limit: int) -> tuple[int, list[str]]:
    """How many keys of ``table`` are not in ``other``, and the first ``limit`` of them."""
    anti = f"FROM {table} a ANTI JOIN {other} b ON b.key = a.key"
    n = con.execute(f"SELECT count(*) {anti}").fetchall()[0][0]
    if not n:
        return n, []
    return n, [r[0] for r in con.execute(f"SELECT a.key {anti} ORDER BY 1 LIMIT ?", [limit]).fetchall()]
