"""Reading precomputed embeddings: DataComp's parquet + npz pairs and
clip-retrieval's ``img_emb`` / ``text_emb`` / ``metadata`` folders.

Users rarely embed a pool themselves: DataComp ships every metadata shard as
``<stem>.parquet`` + ``<stem>.npz`` (rows aligned; keys ``b32_img``,
``b32_txt``, ``l14_img``, ``l14_txt``, L2-normalised, float16 in practice) and
LAION-style pools are embedded once with clip-retrieval's ``clip_inference``
(``img_emb/img_emb_{N}.npy``, ``text_emb/text_emb_{N}.npy``,
``metadata/metadata_{N}.parquet``; rows aligned).  What clip-retrieval writes
(its ``clip_inference/writer.py``, ``reader.py``, ``mapper.py``): ``N`` is the
output partition number zero-padded to the digits of the partition count
(``img_emb_007.npy``); the arrays are L2-normalised float16; the metadata has
``image_path`` (for webdataset input the sample's ``__key__``, which is the
img2dataset key; for a folder of files the image's path), ``caption`` and,
with ``--enable_metadata``, the columns of each sample's json (img2dataset's
``url``, ``key``, ``uid`` when the download kept it, ...).  Rows are linked by
``uid`` when the metadata has that column, else by key (``image_path``; the
file name without extension for a path).  See docs/design.md, "Pools,
embedding sources and scale".

This module reads one source file set at a time (memory bounded by one shard),
checks it, and links its rows to the pool's samples by uid or key.  The
checks are errors that name the file, the expected and the found value and
what to do; row-level damage is not an error but a status
(``bad_embedding`` for a NaN, inf or zero-norm row, ``no_embedding`` for a
pool sample the source has no row for), so no sample silently disappears.
Nothing here imports torch: a precomputed source needs no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import zipfile

import numpy as np

#: DataComp's npz key prefix -> embedding width
DATACOMP_MODELS: dict[str, int] = {"b32": 512, "l14": 768}
DataCompModel = Literal["b32", "l14"]

#: clip-retrieval's three files of part ``N``: folder, file name prefix, suffix
CLIP_RETRIEVAL_FILES: tuple[tuple[str, str, str], ...] = (
    ("img_emb", "img_emb_", ".npy"), ("text_emb", "text_emb_", ".npy"), ("metadata", "metadata_", ".parquet"))
_CR_PART = {sub: re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(suffix)}$")
            for sub, prefix, suffix in CLIP_RETRIEVAL_FILES}


class SourceError(ValueError):
    """A precomputed source that cannot be read as it is; the message says which file and what to do."""


@dataclass(frozen=True)
class SourceRows:
    """One source file set: ids and the image/text embeddings, rows aligned."""

    ids: np.ndarray  # str: uid (DataComp) or key / uid (clip-retrieval)
    img: np.ndarray  # (n, d), dtype as stored
    txt: np.ndarray  # (n, d), dtype as stored
    origin: str  # the file(s) the rows come from, for messages

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.img.ndim != 2 or self.txt.ndim != 2:
            raise SourceError(f"{self.origin}: embeddings must be 2-d (rows × dim); found image "
                              f"{self.img.shape}, text {self.txt.shape}")
        if self.img.shape[0] != n or self.txt.shape[0] != n:
            raise SourceError(f"{self.origin}: {n} metadata rows but {self.img.shape[0]} image and "
                              f"{self.txt.shape[0]} text embedding rows; the files must be rows aligned "
                              "(re-export them together)")
        if self.img.shape[1] != self.txt.shape[1]:
            raise SourceError(f"{self.origin}: image embeddings are {self.img.shape[1]}-d but text "
                              f"embeddings {self.txt.shape[1]}-d; both must come from one CLIP model")

    @property
    def dim(self) -> int:
        return int(self.img.shape[1])

    @cached_property
    def checks(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's ``(bad, clip score)`` (:func:`checked_scores`), computed once
        for the damage check and the staged pairs."""
        return checked_scores(self.img, self.txt)


def read_datacomp(parquet: Path, model: DataCompModel = "l14", npz: Path | None = None) -> SourceRows:
    """The rows of one DataComp metadata shard (``<stem>.parquet`` + ``<stem>.npz``)."""
    import pyarrow.parquet as pq

    if model not in DATACOMP_MODELS:
        raise SourceError(f"embeddings.model is {model!r}; DataComp ships {sorted(DATACOMP_MODELS)}")
    npz = npz or parquet.with_suffix(".npz")
    if not npz.is_file():
        raise SourceError(f"{npz} is missing: every DataComp metadata shard {parquet.name} needs the npz of the "
                          "same stem (download it with DataComp's download_upstream.py, metadata included)")
    table = pq.read_table(parquet, columns=["uid"])
    ids = np.asarray(table.column("uid").to_pylist(), dtype=object)
    keys = (f"{model}_img", f"{model}_txt")
    try:
        with np.load(npz) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise SourceError(f"{npz} has no {missing} (found {sorted(data.files)}); set embeddings.model to "
                                  "one the file holds")
            img, txt = data[keys[0]], data[keys[1]]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:  # truncated or not an npz at all
        raise SourceError(f"{npz} cannot be read ({type(err).__name__}: {err}): the file is damaged or "
                          "truncated; download it again (DataComp's download_upstream.py) or remove the shard") from None
    rows = SourceRows(ids, img, txt, f"{parquet.name} + {npz.name}")
    if rows.dim != DATACOMP_MODELS[model]:
        raise SourceError(f"{npz}: {keys[0]} is {rows.dim}-d, DataComp's {model} is {DATACOMP_MODELS[model]}-d")
    return rows


def clip_retrieval_files(folder: Path, part: str) -> tuple[Path, Path, Path]:
    """``img_emb/img_emb_N.npy``, ``text_emb/text_emb_N.npy``, ``metadata/metadata_N.parquet`` of part ``N``."""
    img, txt, meta = (folder / sub / f"{prefix}{part}{suffix}" for sub, prefix, suffix in CLIP_RETRIEVAL_FILES)
    return img, txt, meta


def clip_retrieval_parts(folder: Path) -> list[str]:
    """The part numbers ``N`` of a clip-retrieval output folder as its file
    names spell them (``"007"``), in numeric order; a part some of whose three
    files are missing is an error naming the missing file."""
    found: dict[str, set[str]] = {}
    for sub, _, _ in CLIP_RETRIEVAL_FILES:
        d = folder / sub
        for p in (d.iterdir() if d.is_dir() else ()):
            if (m := _CR_PART[sub].match(p.name)) and p.is_file():
                found.setdefault(m.group(1), set()).add(sub)
    if not found:
        raise SourceError(f"{folder} has no img_emb/img_emb_N.npy: point embeddings.path at clip-retrieval's "
                          "output folder (the one holding img_emb/, text_emb/ and metadata/)")
    parts = sorted(found, key=lambda n: (int(n), n))
    for part in parts:
        for path, (sub, _, _) in zip(clip_retrieval_files(folder, part), CLIP_RETRIEVAL_FILES):
            if sub not in found[part]:
                raise SourceError(f"{path} is missing: clip-retrieval writes img_emb, text_emb and metadata for "
                                  "every part; re-run its inference with image and text enabled (the default), "
                                  f"or remove part {part}'s other files")
    return parts


def clip_retrieval_id(image_path: str | None) -> str | None:
    """The pool key of a clip-retrieval ``image_path``: webdataset input writes
    the sample's key itself (kept as is); a folder of files writes the image's
    path, whose file name without extension is the key."""
    if image_path is None:
        return None
    name = image_path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else image_path


def clip_retrieval_id_sql(column: str) -> str:
    """:func:`clip_retrieval_id` as a DuckDB expression over the VARCHAR ``column``."""
    name = f"regexp_extract({column}, '[^/]*$')"
    return f"CASE WHEN strpos({name}, '.') > 0 THEN regexp_replace({name}, '\\.[^.]*$', '') ELSE {column} END"


def clip_retrieval_link_column(names: list[str], meta: Path) -> str:
    """``uid`` when the metadata has it, else ``image_path``; neither is an error naming the file."""
    if "uid" in names:
        return "uid"
    if "image_path" in names:
        return "image_path"
    raise SourceError(f"{meta} has neither uid nor image_path (found {names}); cannot link its rows to the pool: "
                      "run clip-retrieval's inference with image embeddings enabled (it writes image_path)")


def read_clip_retrieval(folder: Path, part: str) -> SourceRows:
    """Part ``N`` of clip-retrieval's output (arrays memory-mapped); ids are
    ``uid`` where the metadata has it, else the key (:func:`clip_retrieval_id`)."""
    import pyarrow.parquet as pq

    img_p, txt_p, meta_p = clip_retrieval_files(folder, part)
    for p in (img_p, txt_p, meta_p):
        if not p.is_file():
            raise SourceError(f"{p} is missing: clip-retrieval writes img_emb, text_emb and metadata for every "
                              "part; re-run its inference with image and text enabled (the default)")
    column = clip_retrieval_link_column(pq.read_schema(meta_p).names, meta_p)
    ids = np.asarray(pq.read_table(meta_p, columns=[column]).column(column).to_pylist(), dtype=object)
    if column == "image_path":
        ids = np.asarray([clip_retrieval_id(p) for p in ids], dtype=object)
    missing = [i for i, v in enumerate(ids) if v is None or v == ""]
    if missing:
        raise SourceError(f"{meta_p}: row {missing[0]} has no {column} ({len(missing)} such rows); every row "
                          "must name its sample (re-export the part)")
    return SourceRows(ids, np.load(img_p, mmap_mode="r"), np.load(txt_p, mmap_mode="r"),
                      f"{img_p.name} + {txt_p.name} + {meta_p.name}")


#: rows converted to float32 at once by :func:`bad_rows` and :func:`clip_scores`: every value is a
#: function of its own row, so blocks give the same bits as one pass, with the copies kept in cache
_BLOCK = 512


def _squares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A block's rows in float32 and their squared norms (n, 1), as ``np.linalg.norm`` sums them."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return x, np.add.reduce(x * x, axis=1, keepdims=True)


def _unit(x: np.ndarray, sq: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        norm = np.sqrt(sq)
        return x / np.where(norm > 0, norm, 1.0)


def checked_scores(img: np.ndarray, txt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(bad, scores)``: :func:`bad_rows` and :func:`clip_scores` in one pass
    (each block is converted to float32 once); a bad row's score is meaningless.

    The arithmetic is :func:`_squares` and :func:`_unit`'s, in buffers made
    once per call (the same bits, without a fresh array per operation)."""
    n, dim = len(img), int(img.shape[1]) if img.ndim == 2 else 0
    bad = np.zeros(n, dtype=bool)
    scores = np.empty(n, dtype=np.float32)
    b = min(_BLOCK, n)
    pair, work, sq = np.empty((2, b, dim), np.float32), np.empty((b, dim), np.float32), np.empty((2, b, 1), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for a in range(0, n, _BLOCK):
            m = min(_BLOCK, n - a)
            for v, src, s in zip(pair[:, :m], (img, txt), sq[:, :m]):
                np.copyto(v, src[a : a + m], casting="unsafe")  # float16 (or any float) -> float32, exact
                np.add.reduce(np.multiply(v, v, out=work[:m]), axis=1, keepdims=True, out=s)
            # a non-finite value makes the squared norm NaN or inf; a finite row is bad when it is 0
            bad[a : a + m] = (~np.isfinite(sq[:, :m]) | ~(sq[:, :m] > 0)).any(axis=0)[:, 0]
            for v, s in zip(pair[:, :m], sq[:, :m]):
                np.sqrt(s, out=s)
                s[~(s > 0)] = 1.0  # as _unit: a zero or NaN norm divides by 1
                np.divide(v, s, out=v)
            scores[a : a + m] = np.einsum("ij,ij->i", pair[0, :m], pair[1, :m])
    return bad, scores


def bad_rows(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Rows whose image or text embedding has a NaN, an inf or zero norm (``bad_embedding``)."""
    return checked_scores(img, txt)[0]


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float32 (stored pairs are normalised only to float16 precision)."""
    # np.linalg.norm(x, axis=1)'s own arithmetic (same bits), without its conjugate copy
    return _unit(*_squares(x))


def clip_scores(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """``cos(image, text)`` of stored pairs, row by row, float32 (any float dtype in)."""
    return checked_scores(img, txt)[1]


def link(pool_ids: np.ndarray, source_ids: np.ndarray, origin: str) -> np.ndarray:
    """For each pool id, its row in the source, or -1 when the source has none.

    A source that lists one id twice is an error: which row is the sample's
    embedding would be a guess.
    """
    src = np.asarray(source_ids, dtype=object)
    order = np.argsort(src.astype(str), kind="stable")
    ordered = src[order].astype(str)
    dup = ordered[1:] == ordered[:-1]
    if dup.any():
        first = str(ordered[1:][dup][0])
        raise SourceError(f"{origin}: id {first!r} appears {int((ordered == first).sum())} times; every uid/key "
                          "must have one embedding row (de-duplicate the source files)")
    ids = np.asarray(pool_ids, dtype=object).astype(str)
    if len(ordered) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ordered, ids), len(ordered) - 1)
    return np.where(ordered[pos] == ids, order[pos], -1).astype(np.int64)


def check_dim(dim: int, expected: int | None, origin: str) -> int:
    """The pool's embedding width: the first shard's, and every later shard must match it."""
    if expected is not None and dim != expected:
        raise SourceError(f"{origin}: embeddings are {dim}-d but earlier shards were {expected}-d; all shards must "
                          "come from one model (check embeddings.model / embeddings.path)")
    return dim
