"""Export a strategy's kept samples as webdataset shards open_clip_train reads.

``subsets/<strategy>/`` (``docs/design.md``, "Formats and where things live"):

* ``NNNNN.tar``: the kept samples' **original member bytes** (every tar member
  of the sample: jpg, txt, json, ...), resharded into equal shards of
  ``shard_size`` (the last may be shorter) in a shuffled order: a sample's
  global position is its rank by ``(uid_hash(seed, uid), uid, shard)``
  (:func:`dbprune_assets.core.store.duck.register_uid_hash`), and output shard
  ``i`` holds positions ``[i * shard_size, (i + 1) * shard_size)`` in order;
* ``sizes.json``: ``{"00000.tar": n, ...}``, what open_clip_train's
  ``get_dataset_size`` reads;
* ``NNNNN_stats.json`` beside each tar: img2dataset's per-shard stats
  (:mod:`dbprune_assets.core.pool.shard_stats`; ``count`` = ``successes`` = the
  tar's samples, no failures), so tools that read img2dataset output (DataComp's
  ``resharder.py`` takes a shard's size from ``successes``) take the subset as is;
* ``uids.npy``: DataComp's subset format, the sorted ``np.dtype("u8,u8")`` array
  of the kept 32-hex uids (high 64 bits, low 64 bits); a pool whose uids are not
  all 32-hex writes ``keys.txt`` instead (the kept uids, which are then the
  keys, one per line, sorted).

Members are named ``KEY.EXT`` (key and lowercase extension by the one key
rule of :mod:`dbprune_assets.core.pool.wds`), in source tar order.  Tar members get
deterministic headers (:func:`dbprune_assets.core.pool.wds.encode_member`: mtime 0,
uid/gid 0, no owner names, mode 0o644, PAX format), so the same decisions and
seed export byte-identical files.

Memory is bounded by one sample, the kept-key map of one source shard and one
output shard's index, never the subset: pass 1 streams every source tar once
(through :func:`dbprune_assets.core.pool.shards.iter_shard_members`, the reader
ingest uses, stopping at the shard's last kept sample) and appends each kept
sample's encoded tar blocks to a spool file of its output shard (at most ``max_open`` spool files open, LRU,
reopened in append mode); pass 2 reads one spool's record headers, sorts them
by position and copies the blocks into the final tar.  The whole folder is
built under the temp root and swapped in atomically.

The module is a little over 500 lines because the export and its check
(:func:`verify_export`, the asset check) share the kept view and the id-file
formats; split, each would import the other's internals.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from dbprune_assets.core.store.atomic import atomic_path, scratch_dir
from dbprune_assets.core.pool import wds
from dbprune_assets.core.store.duck import connect, create_view, parquet_files
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.pool.shard_stats import STATS_SUFFIX, check_stats, read_stats, stats_bytes, stats_name, success_stats

SIZES_FILE = "sizes.json"
UIDS_FILE = "uids.npy"
KEYS_FILE = "keys.txt"
UID_DTYPE = np.dtype("u8,u8")
_HEX32 = "[0-9a-fA-F]{32}"
_SHARD_RE = re.compile(r"^(\d{5,})\.tar$")
_STATS_RE = re.compile(r"^(\d{5,})" + re.escape(STATS_SUFFIX) + "$")
#: start_time of an export's stats files: its tars' member mtime (deterministic bytes)
EXPORT_TIME = 0.0
_REC_HEADER = struct.Struct("<qq")  # spool record: position, byte length
#: the samples columns the export reads (caption last: only a pool with images needs it)
SAMPLE_COLUMNS = ("uid", "shard", "key", "row", "caption")


@dataclass
class ExportSummary:
    """What :func:`export_subset` wrote."""

    out_dir: Path
    n_samples: int
    n_shards: int
    shard_size: int
    seed: int
    id_file: str  #: "uids.npy" or "keys.txt"
    bytes_written: int  #: total size of the tar files
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def train_data(self) -> str:
        """``--train-data`` for open_clip_train (brace pattern)."""
        return brace_pattern(self.out_dir, self.n_shards)


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
    sizes = _read_sizes(out_dir)
    names = sorted(sizes)
    expected = [shard_name(i) for i in range(len(names))]
    if names != expected:
        raise ValueError(f"{out_dir / SIZES_FILE}: shards {names[:3]}... are not numbered 00000.tar onwards")
    return brace_pattern(out_dir, len(names)), int(sum(sizes.values()))


def _read_sizes(out_dir: Path) -> dict[str, int]:
    path = out_dir / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {SIZES_FILE}; export the subset first")
    sizes = json.loads(path.read_text())
    if not isinstance(sizes, dict):
        raise ValueError(f"{path}: expected an object of shard -> size")
    return {str(k): int(v) for k, v in sizes.items()}


# ---------------------------------------------------------------------------
# spooling
# ---------------------------------------------------------------------------
class _Spools:
    """Append-only spool files, one per output shard, at most ``max_open`` open."""

    def __init__(self, folder: Path, max_open: int) -> None:
        self.folder = folder
        self.max_open = max(1, int(max_open))
        self.open: OrderedDict[int, IO[bytes]] = OrderedDict()

    def path(self, i: int) -> Path:
        return self.folder / f"{i:05d}.spool"

    def append(self, i: int, pos: int, blob: bytes) -> None:
        f = self.open.get(i)
        if f is None:
            if len(self.open) >= self.max_open:
                _, old = self.open.popitem(last=False)
                old.close()
            f = open(self.path(i), "ab")
            self.open[i] = f
        else:
            self.open.move_to_end(i)
        f.write(_REC_HEADER.pack(pos, len(blob)))
        f.write(blob)

    def close(self) -> None:
        while self.open:
            _, f = self.open.popitem()
            f.close()


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def _kept_view(con: Any, decisions_path: Path, samples_dir: Path, images: bool = True) -> None:
    """The view ``kept`` (shard, uid, key, caption) of the kept decisions.  A
    decision names its sample by (shard, uid): of the rows of a shard that
    share a uid, the first (the others are ``duplicate_uid`` or worse, never kept).
    Reads only the samples columns it needs; without ``images`` (nothing is
    written to a tar) not the caption, which is NULL then."""
    create_view(con, "dec", [Path(decisions_path)], "decisions")
    create_view(con, "samples", parquet_files(samples_dir), columns=SAMPLE_COLUMNS if images else SAMPLE_COLUMNS[:-1])
    caption = "s.caption" if images else "CAST(NULL AS VARCHAR)"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP VIEW kept AS
        SELECT d.shard, d.uid, s.key, {caption} AS caption FROM dec d
        JOIN (SELECT * FROM samples QUALIFY row_number() OVER (PARTITION BY shard, uid ORDER BY row) = 1) s
          ON s.shard = d.shard AND s.uid = d.uid
        WHERE d.keep
        """
    )


def _check_kept(con: Any, decisions_path: Path, samples_dir: Path) -> int:
    n_dec = con.execute("SELECT count(*) FROM dec WHERE keep").fetchall()[0][0]
    n_kept, n_keys, n_uids = con.execute("SELECT count(*), count(DISTINCT key), count(DISTINCT uid) FROM kept").fetchall()[0]
    if n_kept != n_dec:
        rows = con.execute(
            "SELECT d.shard, d.uid FROM dec d ANTI JOIN samples s ON s.shard = d.shard AND s.uid = d.uid WHERE d.keep LIMIT 1"
        ).fetchall()
        ex = rows[0] if rows else None
        where = f", e.g. shard {ex[0]} uid {ex[1]} has no samples row" if ex else " ((shard, uid) repeats in samples)"
        raise ValueError(
            f"{decisions_path}: {n_dec} kept decisions map to {n_kept} samples rows of {samples_dir}{where}; "
            "the decisions are out of date"
        )
    if n_keys != n_kept:
        key, n = con.execute("SELECT key, count(*) FROM kept GROUP BY key HAVING count(*) > 1 ORDER BY key LIMIT 1").fetchall()[0]
        raise ValueError(f"{decisions_path}: tar key {key!r} is shared by {n} kept samples; keys must be unique to export")
    if n_uids != n_kept:
        uid, where = con.execute(
            "SELECT uid, string_agg(shard, ', ' ORDER BY shard) FROM kept GROUP BY uid HAVING count(*) > 1 ORDER BY uid LIMIT 1"
        ).fetchall()[0]
        raise ValueError(f"{decisions_path}: uid {uid} is kept in shards {where}; the first occurrence keeps a uid "
                         "(status duplicate_uid for the others): re-materialise pool_manifest and the decisions")
    return int(n_kept)


def _all_hex(con: Any) -> bool:
    bad = con.execute("SELECT count(*) FROM dec WHERE uid IS NULL OR NOT regexp_full_match(uid, ?)", [_HEX32]).fetchall()[0][0]
    return bad == 0


def export_subset(
    decisions_path: Path,
    pool_dir: Path,
    out_dir: Path,
    shard_size: int,
    seed: int,
    tmp_root: Path,
    *,
    samples_dir: Path | None = None,
    max_open: int = 256,
    memory_limit: str = "1GB",
    threads: int | None = None,
    images: bool = True,
) -> ExportSummary:
    """Write the kept samples of ``decisions_path`` to ``out_dir`` (see the
    module docstring): ``NNNNN.tar`` + ``sizes.json`` + ``uids.npy`` (or
    ``keys.txt``).  Source tars are ``pool_dir/<shard>.tar``; tar keys come
    from the samples table (default: ``tables/samples`` beside the decisions'
    ``tables/decisions``).  ``out_dir`` is replaced atomically.  Raises
    ValueError naming shard and key when a kept sample is missing from its tar
    or appears twice."""
    decisions_path = Path(decisions_path)
    pool_dir = Path(pool_dir)
    out_dir = Path(out_dir)
    tmp_root = Path(tmp_root)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    if not decisions_path.is_file():
        raise FileNotFoundError(f"{decisions_path}: no decisions; materialise the strategy first")
    samples_dir = Path(samples_dir) if samples_dir is not None else decisions_path.parent.parent / "samples"
    tmp_root.mkdir(parents=True, exist_ok=True)

    with scratch_dir(tmp_root, "export-") as work_s:
        work = Path(work_s)
        con = connect(work / "db", memory_limit, threads)
        try:
            _kept_view(con, decisions_path, samples_dir, images)
            n = _check_kept(con, decisions_path, samples_dir)
            if not images:  # a metadata-only pool: DataComp's subset file, which its resharder turns into shards
                if not _all_hex(con):
                    raise ValueError(f"{decisions_path}: a pool without images needs 32-hex uids (DataComp's) to "
                                     "export its subset as uids.npy")
                with atomic_path(out_dir, tmp_root) as tmp:
                    tmp.mkdir(parents=True)
                    _write_uids_npy(con, tmp / UIDS_FILE, n)
                    _fsync_tree(tmp)
                return ExportSummary(out_dir=out_dir, n_samples=n, n_shards=0, shard_size=shard_size, seed=seed,
                                     id_file=UIDS_FILE, bytes_written=0, sizes={})
            hex_uids = _all_hex(con)
            # the shuffle: a sample's place in the subset is its rank by the seeded uid hash
            con.execute(
                """
                CREATE TABLE ranked AS
                SELECT shard, key, uid, caption, row_number() OVER (ORDER BY uid_hash(uid, ?), uid, shard) - 1 AS pos
                FROM kept ORDER BY shard, key
                """,
                [int(seed)],
            )
            n_shards = -(-n // shard_size)
            sizes = {shard_name(i): min(shard_size, n - i * shard_size) for i in range(n_shards)}
            spool_dir = work / "spool"
            spool_dir.mkdir()
            spools = _Spools(spool_dir, max_open)
            try:
                shards = [r[0] for r in con.execute("SELECT DISTINCT shard FROM ranked ORDER BY shard").fetchall()]
                for shard in progress(shards, desc="export: reading shards", unit="shard"):
                    wanted = {key: (pos, caption) for key, pos, caption in con.execute(
                        "SELECT key, pos, caption FROM ranked WHERE shard = ?", [shard]).fetchall()}
                    _spool_shard(pool_dir / f"{shard}.tar", shard, wanted, spools, shard_size)
            finally:
                spools.close()

            with atomic_path(out_dir, tmp_root) as tmp:
                tmp.mkdir(parents=True)
                total = 0
                for i in progress(range(n_shards), desc="export: writing shards", unit="shard"):
                    name = shard_name(i)
                    total += _finish_shard(spools.path(i), tmp / name, i, shard_size, sizes[name])
                    (tmp / stats_name(name)).write_bytes(stats_bytes(success_stats(sizes[name], EXPORT_TIME)))
                (tmp / SIZES_FILE).write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
                if hex_uids:
                    _write_uids_npy(con, tmp / UIDS_FILE, n)
                    id_file = UIDS_FILE
                else:
                    _write_keys_txt(con, tmp / KEYS_FILE)
                    id_file = KEYS_FILE
                _fsync_tree(tmp)
        finally:
            con.close()
    return ExportSummary(
        out_dir=out_dir,
        n_samples=n,
        n_shards=n_shards,
        shard_size=shard_size,
        seed=seed,
        id_file=id_file,
        bytes_written=total,
        sizes=sizes,
    )


def _spool_shard(tar_path: Path, shard: str, wanted: dict[str, tuple[int, str]], spools: _Spools,
                 shard_size: int) -> None:
    """Pass 1 for one source shard: append each wanted sample (key -> position,
    catalog caption) to its output spool.

    Reads with :func:`dbprune_assets.core.pool.shards.iter_shard_members` (the
    reader ingest uses, so "a sample" means the same thing in both): a stream
    that stops once every wanted key was seen and raises when one is missing.
    Members are re-named ``KEY.EXT`` in tar order; their bytes are unchanged,
    but for a ``KEY.txt`` that is not UTF-8: ingest repaired that caption
    (a ``caption_not_utf8`` problem), and its catalog caption is written instead.
    """
    from dbprune_assets.core.pool.shards import ShardError, iter_shard_members

    if not wanted:
        return
    done: set[str] = set()
    try:
        for key, members in iter_shard_members(tar_path, set(wanted)):
            if key in done:
                raise ValueError(f"shard {shard}, key {key}: its members are not contiguous in {tar_path}")
            done.add(key)
            pos, caption = wanted[key]
            if "txt" in members and wds.decode_text(members["txt"])[1] is not None:
                members = {**members, "txt": caption.encode("utf-8")}
            blob = b"".join(wds.encode_member(f"{key}.{ext}", data) for ext, data in members.items())
            spools.append(pos // shard_size, pos, blob)
    except ShardError as err:
        missing = sorted(set(wanted) - done)
        raise ValueError(
            f"shard {shard}: {len(missing)} kept samples could not be exported, e.g. key {missing[0] if missing else '?'}: {err}"
        ) from err


def _finish_shard(spool: Path, out: Path, i: int, shard_size: int, expected: int) -> int:
    """Pass 2 for one output shard: copy its spooled samples in position order."""
    index: list[tuple[int, int, int]] = []  # (pos, offset, length)
    with open(spool, "rb") as f:
        offset = 0
        while True:
            head = f.read(_REC_HEADER.size)
            if not head:
                break
            pos, length = _REC_HEADER.unpack(head)
            offset += _REC_HEADER.size
            index.append((pos, offset, length))
            offset += length
            f.seek(offset)
        index.sort()
        first = i * shard_size
        if [p for p, _, _ in index] != list(range(first, first + expected)):
            raise RuntimeError(f"export: output shard {i} got {len(index)} samples, expected {expected}")
        written = 0
        with open(out, "wb") as o:
            for _, off, length in index:
                f.seek(off)
                o.write(f.read(length))
                written += length
            o.write(wds.tar_trailer(written))
            o.flush()
            os.fsync(o.fileno())
            size = o.tell()
    spool.unlink()
    return size


def _write_uids_npy(con: Any, path: Path, n: int) -> None:
    """DataComp's subset file, built out of core: DuckDB sorts, numpy memmaps."""
    if n == 0:
        np.save(path, np.zeros(0, dtype=UID_DTYPE), allow_pickle=False)
        return
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=UID_DTYPE, shape=(n,))
    reader = con.sql(
        """
        SELECT CAST('0x' || substr(uid, 1, 16) AS UBIGINT) AS hi, CAST('0x' || substr(uid, 17, 16) AS UBIGINT) AS lo
        FROM kept ORDER BY hi, lo
        """
    ).to_arrow_reader(1 << 16)
    at = 0
    for batch in reader:
        m = batch.num_rows
        arr["f0"][at : at + m] = batch.column(0).to_numpy()
        arr["f1"][at : at + m] = batch.column(1).to_numpy()
        at += m
    if at != n:
        raise RuntimeError(f"export: wrote {at} uids, expected {n}")
    arr.flush()
    del arr


def _write_keys_txt(con: Any, path: Path) -> None:
    reader = con.sql("SELECT uid FROM kept ORDER BY uid").to_arrow_reader(1 << 16)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for batch in reader:
            for uid in batch.column(0).to_pylist():
                f.write(uid + "\n")


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------
# verification (the asset check)
# ---------------------------------------------------------------------------
def verify_export(
    out_dir: Path,
    decisions_path: Path,
    *,
    samples_dir: Path | None = None,
    tmp_root: Path | None = None,
    memory_limit: str = "1GB",
    limit: int = 5,
    images: bool = True,
) -> list[str]:
    """Problems of an exported subset against its decisions (empty = healthy):
    missing / extra / repeated samples, shard files vs ``sizes.json``, unequal
    shard sizes, each tar's ``NNNNN_stats.json`` (present, img2dataset's keys,
    ``successes`` = the tar's samples, no stray ones), and ``uids.npy`` /
    ``keys.txt`` vs the kept uids.  Streams the
    tars; the comparison runs in DuckDB (bounded memory)."""
    import pyarrow as pa

    out_dir = Path(out_dir)
    decisions_path = Path(decisions_path)
    samples_dir = Path(samples_dir) if samples_dir is not None else decisions_path.parent.parent / "samples"
    problems: list[str] = []
    if not out_dir.is_dir():
        return [f"{out_dir}: no exported subset"]
    if not images:  # uids.npy alone (a metadata-only pool)
        extra = sorted(p.name for p in out_dir.iterdir() if p.name != UIDS_FILE)
        with _kept_connection(decisions_path, samples_dir, tmp_root, memory_limit, images=False) as con:
            n_kept = con.execute("SELECT count(*) FROM kept").fetchall()[0][0]
            ids = _verify_ids(con, out_dir, n_kept, True, limit)
        return ([f"files beside {UIDS_FILE} in a subset without images: {extra[:limit]}"] if extra else []) + ids
    try:
        sizes = _read_sizes(out_dir)
    except (OSError, ValueError) as err:
        return [str(err)]
    tars = sorted(p.name for p in out_dir.iterdir() if _SHARD_RE.match(p.name))
    if sorted(sizes) != tars:
        problems.append(f"{SIZES_FILE} lists {sorted(set(sizes) - set(tars))[:limit]} without a tar; tars {sorted(set(tars) - set(sizes))[:limit]} are not in it")
    if tars != [shard_name(i) for i in range(len(tars))]:
        problems.append(f"shards are not numbered 00000.tar onwards: {tars[:limit]}")
    counts = [sizes[t] for t in sorted(sizes)]
    if len(counts) > 1 and (len(set(counts[:-1])) != 1 or counts[-1] > counts[0]):
        problems.append(f"shard sizes are not equal (but the last): {counts[:limit]}...")

    with _kept_connection(decisions_path, samples_dir, tmp_root, memory_limit) as con:
        con.execute("CREATE TABLE found (tar VARCHAR, key VARCHAR)")
        for t in progress(tars, desc="export: verifying shards", unit="shard"):
            buf: list[str] = []
            n_t = 0
            try:
                for key, _ in wds.iter_samples(out_dir / t):
                    buf.append(key)
                    n_t += 1
                    if len(buf) >= 1 << 16:
                        _insert_found(con, pa, t, buf)
                        buf = []
            except (wds.TarDamaged, OSError) as err:
                problems.append(f"{t}: unreadable ({err})")
            _insert_found(con, pa, t, buf)
            if t in sizes and sizes[t] != n_t:
                problems.append(f"{t}: holds {n_t} samples, {SIZES_FILE} says {sizes[t]}")
            problems += _verify_stats(out_dir / stats_name(t), n_t)
        stray = sorted(p.name for p in out_dir.iterdir()
                       if _STATS_RE.match(p.name) and p.name[: -len(STATS_SUFFIX)] + ".tar" not in tars)
        if stray:
            problems.append(f"stats files without a tar: {stray[:limit]}")
        repeated = con.execute(
            "SELECT key, count(*) FROM found GROUP BY key HAVING count(*) > 1 ORDER BY key LIMIT ?", [limit]
        ).fetchall()
        if repeated:
            problems.append(f"samples exported more than once: {[k for k, _ in repeated]}")
        n_missing = con.execute("SELECT count(*) FROM kept k ANTI JOIN found f ON f.key = k.key").fetchall()[0][0]
        if n_missing:
            ex = [r[0] for r in con.execute("SELECT k.key FROM kept k ANTI JOIN found f ON f.key = k.key ORDER BY 1 LIMIT ?", [limit]).fetchall()]
            problems.append(f"{n_missing} kept samples are missing from the export, e.g. {ex}")
        n_extra = con.execute("SELECT count(*) FROM found f ANTI JOIN kept k ON f.key = k.key").fetchall()[0][0]
        if n_extra:
            ex = [r[0] for r in con.execute("SELECT f.key FROM found f ANTI JOIN kept k ON f.key = k.key ORDER BY 1 LIMIT ?", [limit]).fetchall()]
            problems.append(f"{n_extra} exported samples are not kept by the decisions, e.g. {ex}")
        n_kept = con.execute("SELECT count(*) FROM kept").fetchall()[0][0]
        if sum(sizes.values()) != n_kept:
            problems.append(f"{SIZES_FILE} totals {sum(sizes.values())} samples, the decisions keep {n_kept}")
        problems += _verify_ids(con, out_dir, n_kept, _all_hex(con), limit)
    return problems


@contextlib.contextmanager
def _kept_connection(decisions_path: Path, samples_dir: Path, tmp_root: Path | None, memory_limit: str, *,
                     images: bool = True) -> Iterator[Any]:
    """A bounded DuckDB connection in a temp folder with the ``kept`` view of the decisions."""
    if tmp_root is not None:
        Path(tmp_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="verify-export-", dir=tmp_root) as work:
        con = connect(Path(work), memory_limit)
        try:
            _kept_view(con, decisions_path, samples_dir, images)
            yield con
        finally:
            con.close()


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


def _insert_found(con: Any, pa: Any, tar: str, keys: list[str]) -> None:
    if not keys:
        return
    con.register("found_batch", pa.table({"tar": [tar] * len(keys), "key": keys}))
    con.execute("INSERT INTO found SELECT tar, key FROM found_batch")
    con.unregister("found_batch")


def _verify_ids(con: Any, out_dir: Path, n_kept: int, hex_uids: bool, limit: int) -> list[str]:
    uids_p, keys_p = out_dir / UIDS_FILE, out_dir / KEYS_FILE
    if hex_uids:
        if keys_p.exists():
            return [f"{KEYS_FILE} present, but the uids are 32-hex (expected {UIDS_FILE} only)"]
        if not uids_p.is_file():
            return [f"{UIDS_FILE} is missing"]
        arr = np.load(uids_p, mmap_mode="r", allow_pickle=False)
        if arr.dtype != UID_DTYPE or arr.ndim != 1:
            return [f"{UIDS_FILE}: dtype {arr.dtype} shape {arr.shape}, expected 1-d {UID_DTYPE}"]
        if len(arr) != n_kept:
            return [f"{UIDS_FILE}: {len(arr)} uids, the decisions keep {n_kept}"]
        reader = con.sql(
            """
            SELECT CAST('0x' || substr(uid, 1, 16) AS UBIGINT), CAST('0x' || substr(uid, 17, 16) AS UBIGINT)
            FROM kept ORDER BY 1, 2
            """
        ).to_arrow_reader(1 << 16)
        at = 0
        for batch in reader:
            m = batch.num_rows
            if not (
                np.array_equal(arr["f0"][at : at + m], batch.column(0).to_numpy())
                and np.array_equal(arr["f1"][at : at + m], batch.column(1).to_numpy())
            ):
                return [f"{UIDS_FILE}: differs from the sorted kept uids near entry {at}"]
            at += m
        return []
    if uids_p.exists():
        return [f"{UIDS_FILE} present, but the uids are not all 32-hex (expected {KEYS_FILE})"]
    if not keys_p.is_file():
        return [f"{KEYS_FILE} is missing"]
    reader = con.sql("SELECT uid FROM kept ORDER BY uid").to_arrow_reader(1 << 16)
    with open(keys_p, encoding="utf-8") as f:
        for batch in reader:
            for uid in batch.column(0).to_pylist():
                line = f.readline()
                if line.rstrip("\n") != uid:
                    return [f"{KEYS_FILE}: {line.rstrip()!r} where the sorted kept uids have {uid!r}"]
        if f.readline():
            return [f"{KEYS_FILE}: more lines than the {n_kept} kept samples"]
    return []
