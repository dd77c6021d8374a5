"""Precomputed embedding sources: DataComp's parquet + npz pairs and
clip-retrieval's ``img_emb`` / ``text_emb`` / ``metadata`` folders.

Users rarely embed a pool themselves: DataComp ships every metadata shard as
``<stem>.parquet`` + ``<stem>.npz`` (rows aligned; keys ``b32_img``,
``b32_txt``, ``l14_img``, ``l14_txt``, L2-normalised, float16 in practice) and
LAION-style pools are embedded once with clip-retrieval
(``img_emb/img_emb_{N}.npy``, ``text_emb/text_emb_{N}.npy``,
``metadata/metadata_{N}.parquet``; rows aligned, ``image_path`` is the
webdataset key, ``uid`` when present).  See docs/design.md, "Pools, embedding
sources and scale".

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
from pathlib import Path
from typing import Literal

import numpy as np

#: DataComp's npz key prefix -> embedding width
DATACOMP_MODELS: dict[str, int] = {"b32": 512, "l14": 768}
DataCompModel = Literal["b32", "l14"]

_CR_PART = re.compile(r"^img_emb_(\d+)\.npy$")


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
    with np.load(npz) as data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise SourceError(f"{npz} has no {missing} (found {sorted(data.files)}); set embeddings.model to one "
                              "the file holds")
        img, txt = data[keys[0]], data[keys[1]]
    rows = SourceRows(ids, img, txt, f"{parquet.name} + {npz.name}")
    if rows.dim != DATACOMP_MODELS[model]:
        raise SourceError(f"{npz}: {keys[0]} is {rows.dim}-d, DataComp's {model} is {DATACOMP_MODELS[model]}-d")
    return rows


def clip_retrieval_parts(folder: Path) -> list[str]:
    """The part numbers ``N`` of a clip-retrieval output folder, in numeric order."""
    parts = sorted((int(m.group(1)), m.group(1)) for p in (folder / "img_emb").glob("img_emb_*.npy")
                   if (m := _CR_PART.match(p.name)))
    if not parts:
        raise SourceError(f"{folder} has no img_emb/img_emb_N.npy: point embeddings.path at clip-retrieval's "
                          "output folder (the one holding img_emb/, text_emb/ and metadata/)")
    return [name for _, name in parts]


def read_clip_retrieval(folder: Path, part: str) -> SourceRows:
    """Part ``N`` of clip-retrieval's output; ids are ``uid`` where the metadata has it, else ``image_path``."""
    import pyarrow.parquet as pq

    img_p = folder / "img_emb" / f"img_emb_{part}.npy"
    txt_p = folder / "text_emb" / f"text_emb_{part}.npy"
    meta_p = folder / "metadata" / f"metadata_{part}.parquet"
    for p in (img_p, txt_p, meta_p):
        if not p.is_file():
            raise SourceError(f"{p} is missing: clip-retrieval writes img_emb, text_emb and metadata for every "
                              "part; re-run its inference with text and metadata enabled")
    names = pq.read_schema(meta_p).names
    column = "uid" if "uid" in names else "image_path" if "image_path" in names else None
    if column is None:
        raise SourceError(f"{meta_p} has neither uid nor image_path (found {names}); cannot link its rows to the pool")
    ids = np.asarray(pq.read_table(meta_p, columns=[column]).column(column).to_pylist(), dtype=object)
    if column == "image_path":
        ids = np.asarray([Path(str(p)).stem if p is not None else None for p in ids], dtype=object)
    return SourceRows(ids, np.load(img_p, mmap_mode="r"), np.load(txt_p, mmap_mode="r"),
                      f"{img_p.name} + {txt_p.name} + {meta_p.name}")


def bad_rows(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Rows whose image or text embedding has a NaN, an inf or zero norm (``bad_embedding``)."""
    out = np.zeros(len(img), dtype=bool)
    for e in (img, txt):
        x = np.asarray(e, dtype=np.float32)
        out |= ~np.isfinite(x).all(axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            out |= ~(np.linalg.norm(np.nan_to_num(x, posinf=0.0, neginf=0.0), axis=1) > 0)
    return out


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float32 (stored pairs are normalised only to float16 precision)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def clip_scores(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """``cos(image, text)`` of stored pairs, row by row, float32."""
    return np.einsum("ij,ij->i", normalised(img), normalised(txt)).astype(np.float32)


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
