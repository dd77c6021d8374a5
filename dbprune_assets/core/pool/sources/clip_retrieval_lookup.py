"""Point lookups into the clip-retrieval link index (:mod:`.clip_retrieval_index`).

:func:`.clip_retrieval_index.lookup` runs once per pool shard.  The sorted ``(id,
part, row)`` parquet serves keys well (one shard's img2dataset keys are one
contiguous range, so DuckDB skips the other row groups), but uids are random
128-bit hex: one shard's uids span the whole id range and every lookup would
scan the whole index (10^5 shards × a 40 GB file at LAION scale).  So when a
source links by uid and every uid is 32 hex digits of one case (DataComp,
img2dataset), the index also holds, in a folder ``ids-<hash>-uid16/``:

* ``uid.npy``: the uids as 16 raw bytes (``S16``), sorted;
* ``part.npy`` (int32) and ``row.npy`` (int64), aligned with ``uid.npy``;

built by streaming the sorted parquet in batches into preallocated
``open_memmap`` files (memory: one batch), and a lookup is one vectorised
``np.searchsorted`` on the memory-mapped ``uid.npy`` (O(n log N) page touches
for a shard's n uids; the queries are sorted first, which numpy's binary
search uses to narrow each search to the right of the previous one).

Why ``S16`` is exact: numpy compares, sorts and searches ``S`` items as
zero-padded bytes (unsigned, ``memcmp`` order), and it drops trailing NULs only
when it turns an item into a Python ``bytes`` (``b"\\x01\\x00"`` reads back as
``b"\\x01"``).  Every item here is 16 bytes and is only compared, never turned
back into hex, so a uid ending (or starting) with ``00`` bytes compares as its
16 bytes.  The order is the parquet's: DuckDB sorts VARCHAR bytewise, and for
hex digits of one case byte order of the text is the order of the value.

Why it answers exactly what the DuckDB join answers (string equality): hex
decoding is one-to-one on the 32-character strings of one case, which every
source id is (the build checks it, else the arrays are not written and lookups
stay on the DuckDB path); a pool id that is not 32 hex digits of the source's
case equals no source id, so it is not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from dbprune_assets.core.pool.sources.readers import SourceError
from dbprune_assets.core.store.atomic import atomic_path, scratch_dir

HexCase = Literal["lower", "upper"]
UID_BYTES = np.dtype("S16")
#: files of the uid folder, aligned rows
UID_FILE, PART_FILE, ROW_FILE = "uid.npy", "part.npy", "row.npy"
_BATCH = 1 << 16


def _hex_table(letters: bytes) -> np.ndarray:
    """byte -> nibble value, 255 for a byte that is not a hex digit of this case."""
    t = np.full(256, 255, dtype=np.uint8)
    t[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
    t[np.frombuffer(letters, np.uint8)] = np.arange(10, 16, dtype=np.uint8)
    return t


_NIBBLE: dict[HexCase, np.ndarray] = {"lower": _hex_table(b"abcdef"), "upper": _hex_table(b"ABCDEF")}


def _chars(strings: Any) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of the 32-byte strings of a pyarrow string array as
    ``(m, 32)`` uint8, and the mask (over all rows) of those rows."""
    import pyarrow as pa

    arr = strings if isinstance(strings, pa.Array) else pa.array(strings, pa.string())
    if arr.type == pa.large_string():
        arr = arr.cast(pa.string())
    n = len(arr)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=n + 1, offset=4 * arr.offset)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    ok = np.diff(offsets) == 32
    if arr.null_count:
        ok &= arr.is_valid().to_numpy(zero_copy_only=False)
    if n and ok.all():  # the common case: one contiguous block
        chars = data[offsets[0]: offsets[0] + 32 * n].reshape(n, 32)
    else:
        chars = data[offsets[:-1][ok].astype(np.int64)[:, None] + np.arange(32)]
    return chars, ok


def _pack(nib: np.ndarray) -> np.ndarray:
    """``(m, 32)`` nibble values -> ``(m,)`` S16 (two nibbles a byte, big-endian)."""
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]
    return np.ascontiguousarray(raw).view(UID_BYTES).reshape(len(nib))


def encode_uids(values: Sequence[str] | np.ndarray, case: HexCase) -> tuple[np.ndarray, np.ndarray]:
    """``values`` (strings) as S16 and the mask of those that are 32 hex digits
    of ``case``; the others' S16 values are meaningless."""
    chars, ok = _chars(values)
    out = np.zeros(len(ok), dtype=UID_BYTES)
    valid = np.zeros(len(ok), dtype=bool)
    if len(chars):
        nib = _NIBBLE[case][chars]
        out[ok], valid[ok] = _pack(nib), (nib != 255).all(axis=1)
    return out, valid


class _NotHex(Exception):
    """A source id is not 32 hex digits of the case seen so far: no uid arrays."""


def build_uid_arrays(ids_parquet: Path, n: int, target: Path, tmp_root: Path) -> HexCase | None:
    """Write the uid folder ``target`` (module docstring) from the sorted,
    duplicate-free ``(id, part, row)`` parquet of ``n`` rows, atomically;
    returns the uids' case, or ``None`` (and writes nothing) when some uid is
    not 32 hex digits of one case, and lookups must use the parquet."""
    import pyarrow.parquet as pq

    lower_ok = upper_ok = True
    try:
        with atomic_path(target, tmp_root) as tmp:
            tmp.mkdir(parents=True)
            uid = np.lib.format.open_memmap(tmp / UID_FILE, mode="w+", dtype=UID_BYTES, shape=(n,))
            part = np.lib.format.open_memmap(tmp / PART_FILE, mode="w+", dtype=np.int32, shape=(n,))
            row = np.lib.format.open_memmap(tmp / ROW_FILE, mode="w+", dtype=np.int64, shape=(n,))
            at = 0
            last: np.ndarray | None = None
            for batch in pq.ParquetFile(ids_parquet).iter_batches(batch_size=_BATCH, columns=["id", "part", "row"]):
                m = batch.num_rows
                if m == 0:
                    continue
                chars, ok = _chars(batch.column(0))
                if not ok.all():
                    raise _NotHex
                # every uid so far 32 hex digits of one case (both flags stay up while there is no letter)
                if lower_ok:
                    nib_lower = _NIBBLE["lower"][chars]
                    lower_ok = not (nib_lower == 255).any()
                if upper_ok:
                    nib_upper = _NIBBLE["upper"][chars]
                    upper_ok = not (nib_upper == 255).any()
                if not (lower_ok or upper_ok):
                    raise _NotHex
                vals = _pack(nib_lower if lower_ok else nib_upper)
                # strictly increasing, as searchsorted needs (DuckDB sorts bytewise and _check_ids found no repeat)
                unsorted = (vals[1:] <= vals[:-1]).any() or (last is not None and bool(last >= vals[:1]))
                if unsorted:  # pragma: no cover
                    raise _NotHex
                last = vals[-1:].copy()
                uid[at: at + m] = vals
                part[at: at + m] = batch.column(1).to_numpy()
                row[at: at + m] = batch.column(2).to_numpy()
                at += m
            if at != n:  # pragma: no cover - the parquet was written from the n metadata rows just now
                raise RuntimeError(f"{ids_parquet}: {at} ids, expected {n}; remove {target.parent} and re-run")
            for a in (uid, part, row):
                a.flush()
            del uid, part, row
    except _NotHex:
        return None
    return "lower" if lower_ok else "upper"


@dataclass(frozen=True)
class UidArrays:
    """The memory-mapped uid folder of an index."""

    uid: np.ndarray  # S16, sorted
    part: np.ndarray  # int32
    row: np.ndarray  # int64
    case: HexCase

    @classmethod
    def open(cls, folder: Path, case: HexCase) -> "UidArrays":
        try:
            arrays = [np.load(folder / f, mmap_mode="r", allow_pickle=False) for f in (UID_FILE, PART_FILE, ROW_FILE)]
        except (ValueError, OSError, EOFError) as err:
            raise SourceError(f"{folder}: the index's uid arrays cannot be read ({type(err).__name__}: {err}); "
                              f"remove {folder.parent} (the index is rebuilt) and re-run") from None
        uid, part, row = arrays
        if uid.dtype != UID_BYTES or not (len(uid) == len(part) == len(row)):
            raise SourceError(f"{folder}: uid arrays of {uid.dtype} × {len(uid)}, {len(part)}, {len(row)} rows; "
                              f"remove {folder.parent} (the index is rebuilt) and re-run")
        return cls(uid, part, row, case)

    def lookup(self, values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(part, row)`` of each of ``values`` (strings), ``(-1, -1)`` when absent."""
        n = len(values)
        part = np.full(n, -1, dtype=np.int32)
        row = np.full(n, -1, dtype=np.int64)
        if n == 0 or len(self.uid) == 0:
            return part, row
        q, valid = encode_uids(values, self.case)
        which = np.flatnonzero(valid)
        order = which[np.argsort(q[which], kind="stable")]
        keys = q[order]
        pos = np.searchsorted(self.uid, keys)
        inside = pos < len(self.uid)
        hit = np.zeros(len(keys), dtype=bool)
        hit[inside] = self.uid[pos[inside]] == keys[inside]
        dest, src = order[hit], pos[hit]
        part[dest] = self.part[src]
        row[dest] = self.row[src]
        return part, row


def lookup_duckdb(ids_parquet: Path, values: Sequence[str], tmp_root: Path,
                  memory_limit: str = "512MB") -> tuple[np.ndarray, np.ndarray]:
    """The same answer through a DuckDB join against the sorted parquet (keys,
    and uids that are not all 32-hex): the explicit id range lets DuckDB skip
    the row groups outside it (parquet min/max statistics), which for one
    shard's contiguous img2dataset keys is nearly all of them."""
    import pyarrow as pa

    from dbprune_assets.core.store.duck import connect

    part = np.full(len(values), -1, dtype=np.int32)
    row = np.full(len(values), -1, dtype=np.int64)
    if not len(values):
        return part, row
    with scratch_dir(tmp_root, "source-lookup-") as work:
        con = connect(Path(work), memory_limit, threads=1)
        try:
            con.register("pool_ids", pa.table({"pos": pa.array(np.arange(len(values)), pa.int64()),
                                               "id": pa.array(values, pa.string())}))
            found = con.execute(
                'SELECT p.pos, i.part, i."row" FROM read_parquet(?) i JOIN pool_ids p ON p.id = i.id '
                "WHERE i.id BETWEEN ? AND ?", [str(ids_parquet), min(values), max(values)]).fetchnumpy()
        finally:
            con.close()
    pos = np.asarray(found["pos"], dtype=np.int64)
    part[pos] = np.asarray(found["part"], dtype=np.int32)
    row[pos] = np.asarray(found["row"], dtype=np.int64)
    return part, row
