"""A pool's rows regrouped into buckets of whole dedup clusters.

The pool-wide SemDeDup (:func:`dbprune_assets.core.method.semdedup.semdedup_pool`)
reads every shard once and sorts its rows into buckets: contiguous runs of
dedup cluster ids holding at most ``bucket_rows`` rows (:func:`plan_buckets`).
:class:`BucketStore` keeps the first buckets in memory (arrays preallocated,
since the sizes are known up front) and appends the others to raw files in a
scratch folder: the embedding bytes, a fixed-size record per row
(:data:`BUCKET_ROW`: cluster, distance, shard, row, uid byte length) and the
uids' UTF-8 bytes.  Buckets are then taken back one at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dbprune_assets.core.method.uidhash import _as_utf8

#: the record of one regrouped row
BUCKET_ROW = np.dtype([("cluster", "<i4"), ("distance", "<f4"), ("shard", "<i4"), ("row", "<i8"), ("uid_len", "<i4")])
#: the files of a bucket on disk, beside its stem
_SUFFIXES = (".meta", ".emb", ".uid")


def plan_buckets(cluster_sizes: np.ndarray, bucket_rows: int) -> np.ndarray:
    """Bucket of each cluster: contiguous runs of cluster ids holding at most
    ``bucket_rows`` rows (a larger cluster gets a bucket of its own)."""
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    bucket = np.zeros(len(sizes), dtype=np.int64)
    b, fill = 0, 0
    for c, s in enumerate(sizes.tolist()):
        if fill > 0 and fill + s > bucket_rows:
            b, fill = b + 1, 0
        bucket[c] = b
        fill += s
    return bucket


def decode_uids(raw: bytes, lengths: np.ndarray) -> np.ndarray:
    """str uids from their concatenated UTF-8 bytes and byte lengths."""
    n = len(lengths)
    if n and int(lengths.min()) == int(lengths.max()) > 0:  # all the same length (hex uids): no Python loop
        return np.strings.decode(np.frombuffer(raw, dtype=f"S{int(lengths[0])}", count=n), "utf-8")
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    return np.array([raw[x:y].decode("utf-8") for x, y in zip(starts.tolist(), ends.tolist())], dtype=str)


class _MemoryBucket:
    """A bucket regrouped in memory: its rows preallocated (sizes are known up
    front), filled shard by shard."""

    def __init__(self, rows: int, d: int, dtype: np.dtype) -> None:
        self.meta = np.empty(rows, dtype=BUCKET_ROW)
        self.emb = np.empty((rows, d), dtype=dtype)
        self.uids: list[np.ndarray] = []
        self.fill = 0

    def add(self, meta: np.ndarray, emb: np.ndarray, uids8: np.ndarray) -> None:
        x, y = self.fill, self.fill + len(meta)
        self.meta[x:y] = meta
        self.emb[x:y] = emb
        self.uids.append(uids8)
        self.fill = y

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """meta, embeddings and str uids of the rows added."""
        uids = np.strings.decode(np.concatenate(self.uids), "utf-8")
        return self.meta[: self.fill], self.emb[: self.fill], uids


class BucketStore:
    """The buckets of one pool, filled shard by shard, taken back one at a time.

    ``bucket_of`` (k,): the bucket of each dedup cluster (:func:`plan_buckets`);
    ``bucket_size``: rows per bucket; ``in_memory``: the buckets kept in
    memory, the others are appended to files under ``work``.  Every shard's
    embeddings must share one width and dtype (:meth:`check_embeddings`).
    """

    def __init__(self, work: Path, bucket_of: np.ndarray, bucket_size: np.ndarray, in_memory: np.ndarray) -> None:
        self.work = work
        self.bucket_of = bucket_of
        self.bucket_size = bucket_size
        self.in_memory = in_memory
        self.n_buckets = len(bucket_size)
        self.d: int | None = None
        self.dtype: np.dtype | None = None
        self._memory: dict[int, _MemoryBucket] = {}

    def check_embeddings(self, name: str, emb: np.ndarray) -> None:
        """Remember the first shard's embedding width and dtype; raise
        ValueError when shard ``name``'s differ."""
        if self.d is None:
            self.d, self.dtype = emb.shape[1], emb.dtype
        elif emb.shape[1] != self.d or emb.dtype != self.dtype:
            raise ValueError(
                f"shard {name}: embeddings {emb.dtype} (n, {emb.shape[1]}) differ from earlier shards' {self.dtype} (n, {self.d})"
            )

    def add_shard(self, shard_index: int, emb: np.ndarray, cluster: np.ndarray, distance: np.ndarray,
                  uids: np.ndarray) -> None:
        """Sort one shard's rows (``cluster`` int64) into their buckets."""
        bk = self.bucket_of[cluster]
        order = np.argsort(bk, kind="stable")
        bounds = np.searchsorted(bk[order], np.arange(self.n_buckets + 1))
        uids8 = _as_utf8(uids)
        ulen = np.strings.str_len(uids8).astype(np.int32)
        distance = np.asarray(distance, dtype=np.float32)
        for b in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[b] : bounds[b + 1]]
            meta = np.empty(len(rows), dtype=BUCKET_ROW)
            meta["cluster"] = cluster[rows]
            meta["distance"] = distance[rows]
            meta["shard"] = shard_index
            meta["row"] = rows
            meta["uid_len"] = ulen[rows]
            self._add(int(b), meta, emb[rows], uids8[rows])

    def _add(self, b: int, meta: np.ndarray, emb: np.ndarray, uids8: np.ndarray) -> None:
        """Rows of bucket ``b``: into its memory arrays, or appended to its files."""
        if self.in_memory[b]:
            if b not in self._memory:
                assert self.d is not None and self.dtype is not None
                self._memory[b] = _MemoryBucket(int(self.bucket_size[b]), self.d, self.dtype)
            self._memory[b].add(meta, emb, uids8)
            return
        stem = self._stem(b)
        with open(f"{stem}.meta", "ab") as f:
            f.write(meta.tobytes())
        with open(f"{stem}.emb", "ab") as f:
            f.write(np.ascontiguousarray(emb).tobytes())
        with open(f"{stem}.uid", "ab") as f:
            f.write(b"".join(uids8.tolist()))

    def take(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Bucket ``b``'s rows (:data:`BUCKET_ROW` records, embeddings, str
        uids), released from memory or read and deleted from disk; None when
        it holds no rows."""
        if b in self._memory:
            return self._memory.pop(b).arrays()
        stem = self._stem(b)
        if not Path(f"{stem}.meta").exists():
            return None
        meta = np.fromfile(f"{stem}.meta", dtype=BUCKET_ROW)
        emb = np.fromfile(f"{stem}.emb", dtype=self.dtype).reshape(len(meta), self.d)
        raw = Path(f"{stem}.uid").read_bytes()
        for suffix in _SUFFIXES:
            Path(f"{stem}{suffix}").unlink()
        return meta, emb, decode_uids(raw, meta["uid_len"])

    def _stem(self, b: int) -> Path:
        return self.work / f"b{b:06d}"
