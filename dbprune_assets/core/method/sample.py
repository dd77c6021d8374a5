"""The bounded uniform sample k-means trains on: the ``size`` samples with the
smallest seeded uid hash, gathered shard by shard in ``O(size)`` memory."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from dbprune_assets.core.method.kmeans import EmbSource, check_rows
from dbprune_assets.core.method.uidhash import _as_utf8, uid_hash




class UniformSample:
    """The ``size`` samples with the smallest ``(uid_hash(seed, uid), uid)``.

    Feed it the pool chunk by chunk (e.g. one shard at a time) with
    :meth:`add`; it keeps at most ``size`` rows plus the chunks waiting to
    be merged (fewer than ``size`` rows: they merge together, so the sample is
    sorted once per ``size`` rows offered, not once per chunk), so memory is
    ``O(size * d)`` plus one chunk.  A chunk's embeddings may be an array or a
    callable ``idx -> emb[idx]`` (``idx`` sorted ascending, int64): then only
    the rows that can enter the sample are read (use it with ``np.load(...,
    mmap_mode="r")`` to read a fraction of each shard).

    The result is a function of the *set* of (uid, embedding) pairs, not of the
    chunk order: ranking by a hash of the uid is a uniform random sample
    without replacement, and a sample's membership does not depend on which
    shard it sits in.  Uids are assumed unique across the pool; if a uid occurs
    twice the earlier chunk wins (still deterministic for a fixed order).

    Rows are returned ordered by ``(hash, uid)`` in the dtype they came in
    (float16 embeddings stay float16: half the memory).

    :meth:`add_refs` offers a chunk by reference instead: each uid's row
    number in a file and a reader of rows by number.  The sample then holds
    two integers per row, no embeddings, and :meth:`rows` reads only the rows
    asked for, one read per chunk, when they are asked for (k-means trains
    on a subset of the sample: the rest is never read).
    """

    def __init__(self, size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError(f"sample size must be positive, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self._h = np.zeros(0, dtype=np.uint64)
        self._u = np.zeros(0, dtype="S1")
        self._e: np.ndarray | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        self.seen = 0  # rows offered so far
        self._readers: dict[int, tuple[Callable[[np.ndarray], np.ndarray], str]] | None = None  # add_refs' chunks
        self._chunks = 0

    def add_refs(self, uids: Sequence[str] | np.ndarray, rows: np.ndarray,
                 reader: Callable[[np.ndarray], np.ndarray], name: str) -> None:
        """Offer one chunk by reference: its uids (n,), each uid's row number
        ``rows`` (n,) and ``reader(numbers) -> embeddings`` (numbers sorted
        ascending); hold no open file in ``reader`` (a pool has thousands of chunks)."""
        if self._readers is None:
            if self._e is not None or self._pending:
                raise ValueError("a UniformSample takes chunks by value (add) or by reference (add_refs), not both")
            self._readers = {}
        rows = np.asarray(rows, dtype=np.int64)
        chunk = self._chunks = self._chunks + 1

        def refs(idx: np.ndarray) -> np.ndarray:  # called only when some of the chunk's rows enter the sample
            assert self._readers is not None
            self._readers[chunk] = (reader, name)
            return np.stack([np.full(len(idx), chunk), rows[idx]], axis=1)

        self._offer(uids, refs, name)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The sample's rows at positions ``idx`` (in :attr:`embeddings`' order)."""
        self._merge()
        if self._readers is None:
            return self.embeddings[idx]
        refs = self._e[np.asarray(idx, dtype=np.int64)] if self._e is not None else np.zeros((0, 2), np.int64)
        by = np.lexsort((refs[:, 1], refs[:, 0]))  # by chunk, then row number
        chunks, starts = np.unique(refs[by, 0], return_index=True)
        out: np.ndarray | None = None
        for chunk, lo, hi in zip(chunks.tolist(), starts.tolist(), [*starts[1:].tolist(), len(by)]):
            at = by[lo:hi]
            reader, name = self._readers[chunk]
            got = np.asarray(reader(refs[at, 1]))
            check_rows(got, f"{name} (k-means sample rows)", uids=np.strings.decode(self._u[np.asarray(idx)[at]]))
            if out is None:
                out = np.empty((len(refs), got.shape[1]), dtype=got.dtype)
            out[at] = got
        if out is None:  # no row asked for: a read of none gives the width
            if not self._readers or self._e is None or not len(self._e):
                raise ValueError("the uniform sample is empty: no samples were offered")
            reader, _ = self._readers[int(self._e[0, 0])]
            return np.asarray(reader(np.zeros(0, dtype=np.int64)))
        return out

    def add(self, uids: Sequence[str] | np.ndarray, emb: EmbSource, name: str | None = None) -> None:
        """Offer one chunk: its uids (n,) and its embeddings (n, d) or a loader."""
        if self._readers is not None:
            raise ValueError("a UniformSample takes chunks by value (add) or by reference (add_refs), not both")
        self._offer(uids, emb, name)

    def _offer(self, uids: Sequence[str] | np.ndarray, emb: EmbSource, name: str | None) -> None:
        u = _as_utf8(uids)
        if u.ndim != 1:
            raise ValueError(f"{name or 'chunk'}: uids must be 1-D, got shape {u.shape}")
        n = len(u)
        if not callable(emb):
            emb_arr = np.asarray(emb)
            if emb_arr.ndim != 2 or emb_arr.shape[0] != n:
                raise ValueError(f"{name or 'chunk'}: {n} uids but embeddings of shape {emb_arr.shape}")
        self.seen += n
        if n == 0:
            return
        h = uid_hash(u, self.seed)
        cand = np.arange(n, dtype=np.int64)
        if len(self._h) >= self.size:
            # only rows that can beat the current largest key
            thr = self._h[-1]
            cand = cand[h <= thr]
            if len(cand) == 0:
                return
        if len(cand) > self.size:
            order = np.lexsort((u[cand], h[cand]))[: self.size]
            cand = np.sort(cand[order])
        rows = emb(cand) if callable(emb) else emb_arr[cand]
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] != len(cand):
            raise ValueError(f"{name or 'chunk'}: embedding loader returned shape {rows.shape} for {len(cand)} rows")
        if self._readers is None:  # by reference: checked when read (rows)
            check_rows(rows, f"{name or 'chunk'} (k-means sample rows)", uids=u[cand])
        if self._e is None:
            self._e = np.zeros((0, rows.shape[1]), dtype=rows.dtype)
        elif rows.shape[1] != self._e.shape[1]:
            raise ValueError(f"{name or 'chunk'}: embedding dimension {rows.shape[1]} != {self._e.shape[1]} of earlier chunks")
        # chunks wait until they hold a sample's worth of rows, then merge at once: merging
        # per chunk would sort and copy the whole sample once per shard
        self._pending.append((h[cand], u[cand], rows.astype(self._e.dtype, copy=False)))
        self._n_pending += len(cand)
        if self._n_pending >= self.size:
            self._merge()

    def _merge(self) -> None:
        """Fold the waiting chunks into the sample (in offer order, so ties keep the earlier row)."""
        if not self._pending:
            return
        assert self._e is not None
        hh = np.concatenate([self._h, *(p[0] for p in self._pending)])
        uu = np.concatenate([self._u, *(p[1] for p in self._pending)])
        order = np.lexsort((uu, hh))[: self.size]
        self._h = hh[order]
        self._u = uu[order]
        # gather the kept rows from each part rather than concatenating every row first:
        # the peak is the old sample, the waiting chunks and the new sample (not twice more)
        parts = [self._e, *(p[2] for p in self._pending)]
        starts = np.cumsum([0] + [len(part) for part in parts])
        src = np.searchsorted(starts, order, side="right") - 1
        by_part = np.argsort(src, kind="stable")  # the kept rows grouped by part: one pass, not one per part
        bounds = np.searchsorted(src[by_part], np.arange(len(parts) + 1))
        merged = np.empty((len(order), self._e.shape[1]), dtype=self._e.dtype)
        for i, part in enumerate(parts):
            at = by_part[bounds[i]:bounds[i + 1]]
            if len(at):
                merged[at] = part[order[at] - starts[i]]
        self._pending, self._n_pending = [], 0
        self._e = merged
        if self._readers is not None:  # forget the chunks no row refers to any more
            kept = set(np.unique(merged[:, 0]).tolist())
            self._readers = {c: r for c, r in self._readers.items() if c in kept}

    @property
    def hashes(self) -> np.ndarray:
        self._merge()
        return self._h

    @property
    def uids(self) -> np.ndarray:
        """uids of the sample (str array), ordered like :attr:`embeddings`."""
        self._merge()
        return np.strings.decode(self._u, "utf-8") if len(self._u) else np.zeros(0, dtype=str)

    @property
    def embeddings(self) -> np.ndarray:
        if self._e is None:
            raise ValueError("the uniform sample is empty: no samples were offered")
        self._merge()
        return self._e if self._readers is None else self.rows(np.arange(len(self._e)))

    def __len__(self) -> int:
        self._merge()
        return len(self._h)
