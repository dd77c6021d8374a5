"""The stable, seeded 64-bit uid hash that ranks samples at random: the
``random`` baseline and the k-means sample (:class:`~.sample.UniformSample`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection on uint64), vectorised."""
    h = h ^ (h >> _S33)
    h = h * _C1
    h = h ^ (h >> _S33)
    h = h * _C2
    return h ^ (h >> _S33)


def _as_utf8(uids: Sequence[str] | np.ndarray) -> np.ndarray:
    """uids as a numpy bytes (``S``) array of their UTF-8 encodings."""
    arr = np.asarray(uids)
    if arr.dtype.kind == "S":
        return arr
    if arr.dtype.kind != "U":
        arr = arr.astype(str)
    try:  # fast path: ASCII (hex uids, most keys), where the cast equals UTF-8
        return arr.astype(f"S{max(arr.dtype.itemsize // 4, 1)}")
    except UnicodeEncodeError:
        return np.strings.encode(arr, "utf-8")


def uid_hash(uids: Sequence[str] | np.ndarray, seed: int, batch: int = 1 << 20) -> np.ndarray:
    """Stable, seeded 64-bit hash of each uid (``uint64``), vectorised.

    Definition (fixed; the ``random`` baseline and the k-means sample rely on
    it, so it never changes between versions or machines):

    * ``b`` = the UTF-8 bytes of the uid, trailing NUL bytes ignored;
    * ``w_0 .. w_{m-1}`` = ``b`` zero-padded to a multiple of 8 bytes, read as
      little-endian uint64 words (``m = ceil(len(b) / 8)``);
    * ``h = fmix64((seed mod 2**64) ^ 0x9E3779B97F4A7C15)``;
      ``h = fmix64(h ^ w_i)`` for each word; result ``fmix64(h ^ len(b))``,

    with ``fmix64`` MurmurHash3's finaliser, all arithmetic mod 2**64.  It is not
    cryptographic; it is uniform enough to rank samples at random.
    """
    arr = np.asarray(uids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    n = len(arr)
    out = np.empty(n, dtype=np.uint64)
    h0 = _fmix64(np.array([(int(seed) & _M64)], dtype=np.uint64) ^ _GOLDEN)[0]
    for a in range(0, n, batch):
        b = _as_utf8(arr[a : a + batch])
        width = max(b.dtype.itemsize, 1)
        w8 = -(-width // 8) * 8
        b8 = b.astype(f"S{w8}")  # zero-padded
        words = np.frombuffer(b8.tobytes(), dtype="<u8").reshape(len(b8), w8 // 8)
        length = np.strings.str_len(b).astype(np.uint64)
        nwords = (length + np.uint64(7)) // np.uint64(8)
        h = np.full(len(b8), h0, dtype=np.uint64)
        for i in range(words.shape[1]):
            active = nwords > np.uint64(i)
            h = np.where(active, _fmix64(h ^ words[:, i]), h)
        out[a : a + len(b8)] = _fmix64(h ^ length)
    return out
