"""The files of an exported subset beside the tars' contents.

``subsets/<strategy>/`` (:mod:`dbprune_assets.core.store.export` writes it,
:mod:`dbprune_assets.core.store.export_check` verifies it): tars named
``NNNNN.tar`` (:func:`shard_name`), each with its ``NNNNN_stats.json``;
``sizes.json`` (``{"00000.tar": n, ...}``, what open_clip_train's
``get_dataset_size`` reads; :func:`read_sizes`, :func:`train_data_spec`); and
the kept uids: ``uids.npy``, DataComp's subset format (the sorted
``np.dtype("u8,u8")`` array of the 32-hex uids: high 64 bits, low 64 bits),
or ``keys.txt`` for a pool whose uids are not all 32-hex (one per line,
sorted).  The id files are written and checked against the ``kept`` view of a
DuckDB connection (:mod:`dbprune_assets.core.store.kept`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dbprune_assets.core.pool.shard_stats import STATS_SUFFIX

SIZES_FILE = "sizes.json"
UIDS_FILE = "uids.npy"
KEYS_FILE = "keys.txt"
UID_DTYPE = np.dtype("u8,u8")
SHARD_RE = re.compile(r"^(\d{5,})\.tar$")
STATS_RE = re.compile(r"^(\d{5,})" + re.escape(STATS_SUFFIX) + "$")
#: rows per Arrow batch when streaming the kept uids
_BATCH = 1 << 16


def shard_name(i: int) -> str:
    return f"{i:05d}.tar"


def brace_pattern(out_dir: Path, n_shards: int) -> str:
    if n_shards <= 0:
        raise ValueError(f"{out_dir}: the subset is empty, there are no shards to train on")
    if n_shards == 1:
        return str(Path(out_dir) / shard_name(0))
    last = shard_name(n_shards - 1)[: -len(".tar")]
    first = f"{0:0{len(last)}d}"
    return str(Path(out_dir) / f"{{{first}..{last}}}.tar")


def train_data_spec(out_dir: Path) -> tuple[str, int]:
    """``(pattern, n_samples)`` of an exported subset: the brace pattern for
    ``open_clip_train --train-data PATTERN --dataset-type webdataset
    --train-num-samples N`` and the number of samples (from ``sizes.json``)."""
    out_dir = Path(out_dir)
    sizes = read_sizes(out_dir)
    names = sorted(sizes)
    expected = [shard_name(i) for i in range(len(names))]
    if names != expected:
        raise ValueError(f"{out_dir / SIZES_FILE}: shards {names[:3]}... are not numbered 00000.tar onwards")
    return brace_pattern(out_dir, len(names)), int(sum(sizes.values()))


def read_sizes(out_dir: Path) -> dict[str, int]:
    """``sizes.json`` of an exported subset: tar name -> samples."""
    path = out_dir / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {SIZES_FILE}; export the subset first")
    sizes = json.loads(path.read_text())
    if not isinstance(sizes, dict):
        raise ValueError(f"{path}: expected an object of shard -> size")
    return {str(k): int(v) for k, v in sizes.items()}


# ---------------------------------------------------------------------------
# uids.npy / keys.txt
# ---------------------------------------------------------------------------
def _kept_uid_halves(con: Any) -> Any:
    """A reader of Arrow batches of the kept 32-hex uids as (high, low) 64-bit
    halves, sorted."""
    return con.sql(
        """
        SELECT CAST('0x' || substr(uid, 1, 16) AS UBIGINT) AS hi, CAST('0x' || substr(uid, 17, 16) AS UBIGINT) AS lo
        FROM kept ORDER BY hi, lo
        """
    ).to_arrow_reader(_BATCH)


def _kept_uids(con: Any) -> Iterator[str]:
    """The kept uids, sorted."""
    for batch in con.sql("SELECT uid FROM kept ORDER BY uid").to_arrow_reader(_BATCH):
        yield from batch.column(0).to_pylist()


def write_id_file(con: Any, folder: Path, n: int, hex_uids: bool) -> str:
    """Write the kept uids of ``con`` (``n`` of them) into ``folder``:
    ``uids.npy`` when they are all 32-hex, else ``keys.txt``; returns the
    file's name."""
    if hex_uids:
        _write_uids_npy(con, folder / UIDS_FILE, n)
        return UIDS_FILE
    _write_keys_txt(con, folder / KEYS_FILE)
    return KEYS_FILE


def _write_uids_npy(con: Any, path: Path, n: int) -> None:
    """DataComp's subset file, built out of core: DuckDB sorts, numpy memmaps."""
    if n == 0:
        np.save(path, np.zeros(0, dtype=UID_DTYPE), allow_pickle=False)
        return
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=UID_DTYPE, shape=(n,))
    at = 0
    for batch in _kept_uid_halves(con):
        m = batch.num_rows
        arr["f0"][at : at + m] = batch.column(0).to_numpy()
        arr["f1"][at : at + m] = batch.column(1).to_numpy()
        at += m
    if at != n:
        raise RuntimeError(f"export: wrote {at} uids, expected {n}")
    arr.flush()
    del arr


def _write_keys_txt(con: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for uid in _kept_uids(con):
            f.write(uid + "\n")


def verify_id_file(con: Any, out_dir: Path, n_kept: int, hex_uids: bool) -> list[str]:
    """Problems of ``out_dir``'s ``uids.npy`` (``hex_uids``) or ``keys.txt``
    against the kept uids of ``con``: missing, the other file present, or
    different uids (the first difference)."""
    uids_p, keys_p = out_dir / UIDS_FILE, out_dir / KEYS_FILE
    if hex_uids:
        if keys_p.exists():
            return [f"{KEYS_FILE} present, but the uids are 32-hex (expected {UIDS_FILE} only)"]
        if not uids_p.is_file():
            return [f"{UIDS_FILE} is missing"]
        return _verify_uids_npy(con, uids_p, n_kept)
    if uids_p.exists():
        return [f"{UIDS_FILE} present, but the uids are not all 32-hex (expected {KEYS_FILE})"]
    if not keys_p.is_file():
        return [f"{KEYS_FILE} is missing"]
    return _verify_keys_txt(con, keys_p, n_kept)


def _verify_uids_npy(con: Any, path: Path, n_kept: int) -> list[str]:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != UID_DTYPE or arr.ndim != 1:
        return [f"{UIDS_FILE}: dtype {arr.dtype} shape {arr.shape}, expected 1-d {UID_DTYPE}"]
    if len(arr) != n_kept:
        return [f"{UIDS_FILE}: {len(arr)} uids, the decisions keep {n_kept}"]
    at = 0
    for batch in _kept_uid_halves(con):
        m = batch.num_rows
        if not (
            np.array_equal(arr["f0"][at : at + m], batch.column(0).to_numpy())
            and np.array_equal(arr["f1"][at : at + m], batch.column(1).to_numpy())
        ):
            return [f"{UIDS_FILE}: differs from the sorted kept uids near entry {at}"]
        at += m
    return []


def _verify_keys_txt(con: Any, path: Path, n_kept: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        for uid in _kept_uids(con):
            line = f.readline()
            if line.rstrip("\n") != uid:
                return [f"{KEYS_FILE}: {line.rstrip()!r} where the sorted kept uids have {uid!r}"]
        if f.readline():
            return [f"{KEYS_FILE}: more lines than the {n_kept} kept samples"]
    return []
