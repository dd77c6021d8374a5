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

The export and its check (:func:`verify_export`, the asset check, in
:mod:`dbprune_assets.core.store.export_check`) share the ``kept`` view of the
decisions (:mod:`dbprune_assets.core.store.kept`) and the folder's file names
and id files (:mod:`dbprune_assets.core.store.subset_files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from dbprune_assets.core.pool import wds
from dbprune_assets.core.pool.shard_stats import stats_bytes, stats_name, success_stats
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.store.atomic import atomic_path, scratch_dir
from dbprune_assets.core.store.export_check import verify_export  # noqa: F401  (re-exported)
from dbprune_assets.core.store.kept import SAMPLE_COLUMNS  # noqa: F401  (re-exported)
from dbprune_assets.core.store.kept import all_hex, check_kept, default_samples_dir, kept_connection
from dbprune_assets.core.store.subset_files import train_data_spec  # noqa: F401  (re-exported)
from dbprune_assets.core.store.subset_files import SIZES_FILE, UIDS_FILE, brace_pattern, shard_name, write_id_file

#: start_time of an export's stats files: its tars' member mtime (deterministic bytes)
EXPORT_TIME = 0.0
_REC_HEADER = struct.Struct("<qq")  # spool record: position, byte length


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
    kept: Any = None,
) -> ExportSummary:
    """Write the kept samples of ``decisions_path`` to ``out_dir`` (see the
    module docstring): ``NNNNN.tar`` + ``sizes.json`` + ``uids.npy`` (or
    ``keys.txt``).  Source tars are ``pool_dir/<shard>.tar``; tar keys come
    from the samples table (default: ``tables/samples`` beside the decisions'
    ``tables/decisions``).  ``out_dir`` is replaced atomically.  Raises
    ValueError naming shard and key when a kept sample is missing from its tar
    or appears twice.  ``kept``: a :func:`~.kept.kept_connection` of these
    decisions already open (its check, :func:`~.export_check.verify_export`,
    reads the same ``kept`` table)."""
    decisions_path = Path(decisions_path)
    pool_dir = Path(pool_dir)
    out_dir = Path(out_dir)
    tmp_root = Path(tmp_root)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    if not decisions_path.is_file():
        raise FileNotFoundError(f"{decisions_path}: no decisions; materialise the strategy first")
    samples_dir = default_samples_dir(decisions_path, samples_dir)
    tmp_root.mkdir(parents=True, exist_ok=True)

    with scratch_dir(tmp_root, "export-") as work_s, kept_connection(
            decisions_path, samples_dir, Path(work_s), memory_limit, images=images, threads=threads, given=kept) as con:
        n = check_kept(con, decisions_path, samples_dir)
        if not images:  # a metadata-only pool: DataComp's subset file, which its resharder turns into shards
            return _export_uids_only(con, decisions_path, out_dir, tmp_root, n, shard_size, seed)
        hex_uids = all_hex(con)
        _rank_kept(con, seed)
        sizes = _output_sizes(n, shard_size)
        spools = _spool_kept(con, pool_dir, Path(work_s) / "spool", max_open, shard_size)
        with _new_folder(out_dir, tmp_root) as tmp:
            total = _write_shards(spools, tmp, sizes, shard_size)
            id_file = write_id_file(con, tmp, n, hex_uids)
    return ExportSummary(
        out_dir=out_dir,
        n_samples=n,
        n_shards=len(sizes),
        shard_size=shard_size,
        seed=seed,
        id_file=id_file,
        bytes_written=total,
        sizes=sizes,
    )


def _export_uids_only(con: Any, decisions_path: Path, out_dir: Path, tmp_root: Path, n: int, shard_size: int,
                      seed: int) -> ExportSummary:
    """The subset of a pool without images: ``uids.npy`` alone (the uids must
    be 32-hex)."""
    if not all_hex(con):
        raise ValueError(f"{decisions_path}: a pool without images needs 32-hex uids (DataComp's) to "
                         "export its subset as uids.npy")
    with _new_folder(out_dir, tmp_root) as tmp:
        write_id_file(con, tmp, n, True)
    return ExportSummary(out_dir=out_dir, n_samples=n, n_shards=0, shard_size=shard_size, seed=seed,
                         id_file=UIDS_FILE, bytes_written=0, sizes={})


def _rank_kept(con: Any, seed: int) -> None:
    """The table ``ranked`` (shard, key, uid, caption, pos): the shuffle, a
    sample's place in the subset is its rank by the seeded uid hash."""
    con.execute(
        """
        CREATE TABLE ranked AS
        SELECT shard, key, uid, caption, row_number() OVER (ORDER BY uid_hash(uid, ?), uid, shard) - 1 AS pos
        FROM kept ORDER BY shard, key
        """,
        [int(seed)],
    )


def _output_sizes(n: int, shard_size: int) -> dict[str, int]:
    """Samples per output tar: ``shard_size`` each, the last shorter."""
    n_shards = -(-n // shard_size)
    return {shard_name(i): min(shard_size, n - i * shard_size) for i in range(n_shards)}


def _spool_kept(con: Any, pool_dir: Path, spool_dir: Path, max_open: int, shard_size: int) -> _Spools:
    """Pass 1: every source shard's ranked samples appended to the spools of
    their output shards (closed on return)."""
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
    return spools


@contextlib.contextmanager
def _new_folder(out_dir: Path, tmp_root: Path) -> Iterator[Path]:
    """A new folder to fill, fsynced and swapped in as ``out_dir`` at the end."""
    with atomic_path(out_dir, tmp_root) as tmp:
        tmp.mkdir(parents=True)
        yield tmp
        _fsync_tree(tmp)


def _write_shards(spools: _Spools, folder: Path, sizes: dict[str, int], shard_size: int) -> int:
    """Pass 2: every output tar from its spool, its stats file and
    ``sizes.json``; returns the tars' total size."""
    total = 0
    for i in progress(range(len(sizes)), desc="export: writing shards", unit="shard"):
        name = shard_name(i)
        total += _finish_shard(spools.path(i), folder / name, i, shard_size, sizes[name])
        (folder / stats_name(name)).write_bytes(stats_bytes(success_stats(sizes[name], EXPORT_TIME)))
    (folder / SIZES_FILE).write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    return total


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


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
