"""The link index of a clip-retrieval output folder (``embeddings.source: clip_retrieval``).

clip-retrieval's parts (``metadata/metadata_N.parquet`` with
``img_emb/img_emb_N.npy`` and ``text_emb/text_emb_N.npy``, rows aligned;
:mod:`.readers`) follow its inference order, not the pool's shards, so a pool
shard's rows may be in any part.  Holding every id of the source in Python
memory is not an option at LAION scale (2B ids), so the link goes through an
on-disk index, built once by DuckDB out of core:

* ``$DBPRUNE_HOME/embeddings/source_index/ids-<hash>.parquet``: ``(id, part,
  row)`` of every source row, sorted by ``id`` (the ``uid`` when the metadata
  has that column, else the key; :func:`.readers.clip_retrieval_id`), so
  DuckDB skips the row groups outside a shard's id range (img2dataset keys of
  one shard are one contiguous range);
* ``ids-<hash>-uid16/`` beside it, when the source links by uid and every uid
  is 32 hex digits of one case (DataComp, img2dataset): the uids as 16 raw
  bytes, sorted, with their part and row (:mod:`.clip_retrieval_lookup`), for point
  lookups of random uids, which no row-group range can narrow;
* ``index.json`` beside them: the folder, the link column, the parts and their
  row counts, the width and dtype, and the size+mtime signature of every
  source file.  The index is rebuilt only when a metadata file's signature
  changes (or a part comes or goes); when only an array changes, the cheap
  checks (rows, width) are redone and the manifest updated.

Building checks every part (its three files present, as many array rows as
metadata rows, one width for image and text and across parts, the same link
column everywhere) and every id (present, listed once); a failure is a
:class:`.readers.SourceError` naming the file and what to do.  Builders in
parallel processes take turns (a ``flock`` on ``.lock``) and every file is
replaced atomically, so a reader sees an old or a new index, never half one.

Per pool shard, :func:`lookup` finds its ids' ``(part, row)``: by binary
search in the memory-mapped uid arrays when the index has them, else with a
DuckDB join against the sorted parquet (bounded connection, ``core/store/duck.py``);
:func:`gather` copies those rows out of the parts with ``np.load(mmap_mode="r")``,
part by part: memory is one shard's rows, never the source's (the uid arrays
are written from the sorted parquet in batches).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from dbprune_assets.core.store.atomic import atomic_path, remove, scratch_dir, write_json
from dbprune_assets.core.pool.sources.clip_retrieval_lookup import HexCase, UidArrays, build_uid_arrays, lookup_duckdb
from dbprune_assets.core.pool.sources.readers import (
    CLIP_RETRIEVAL_FILES,
    SourceError,
    clip_retrieval_files,
    clip_retrieval_id_sql,
    clip_retrieval_link_column,
    clip_retrieval_parts,
)
from dbprune_assets.core.store.state import file_signature, stable_hash

#: bump when the index's layout or meaning changes (an older index is rebuilt)
FORMAT = 2  # 2: the uid arrays
MANIFEST = "index.json"

LinkBy = Literal["uid", "key"]


def index_dir(home: Path) -> Path:
    """``$DBPRUNE_HOME/embeddings/source_index``."""
    return Path(home) / "embeddings" / "source_index"


def file_signatures(folder: Path) -> dict[str, dict[str, str]]:
    """Size+mtime of every clip-retrieval file of ``folder``:
    ``{"metadata": {path: signature}, "arrays": {path: signature}}``, paths
    relative to ``folder``."""
    out: dict[str, dict[str, str]] = {"metadata": {}, "arrays": {}}
    for sub, prefix, suffix in CLIP_RETRIEVAL_FILES:
        d = folder / sub
        if not d.is_dir():
            continue
        kind = "metadata" if sub == "metadata" else "arrays"
        for p in sorted(d.iterdir()):
            if p.name.startswith(prefix) and p.name.endswith(suffix):
                out[kind][f"{sub}/{p.name}"] = file_signature(p)
    return out


def source_signature(folder: Path) -> str:
    """One hash of every clip-retrieval file's signature in ``folder`` (what
    raw_metadata's fingerprint and the embeddings' data version hash)."""
    folder = Path(folder)
    if not folder.is_dir():
        return stable_hash({"clip_retrieval": str(folder), "absent": True})
    return stable_hash({"clip_retrieval": file_signatures(folder)})


@dataclass(frozen=True)
class SourceIndex:
    """A current index of one clip-retrieval folder."""

    folder: Path
    ids: Path  # the sorted (id, part, row) parquet
    by: LinkBy  # which pool column the ids are: the sample's uid or its key
    parts: tuple[str, ...]  # part numbers as the files spell them, in numeric order
    rows: tuple[int, ...]  # rows of each part
    dim: int
    dtype: str  # of the stored arrays (float16 from clip-retrieval)
    signature: str  # source_signature(folder) when checked
    built: bool  # whether this call (re)built the sorted parquet
    uids: Path | None = None  # the uid arrays' folder (32-hex uids only), else lookups join the parquet
    uid_case: HexCase | None = None  # the hex digits' case of every uid, with ``uids``

    def files(self, part: int) -> tuple[Path, Path, Path]:
        """(img_emb, text_emb, metadata) of part number ``part`` (an index into ``parts``)."""
        return clip_retrieval_files(self.folder, self.parts[part])

    def where(self, part: int, row: int) -> str:
        """``row 7 of metadata_3.parquet (img_emb_3.npy + text_emb_3.npy)``, for messages."""
        img, txt, meta = self.files(part)
        return f"row {row} of {meta.name} ({img.name} + {txt.name})"

    @property
    def column(self) -> str:
        """The metadata column the ids come from."""
        return "uid" if self.by == "uid" else "image_path"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SourceError(f"{path}: not a readable .npy array ({type(err).__name__}: {err}); re-run clip-retrieval's "
                          "inference for this part or remove its three files") from None


def check_parts(folder: Path, parts: Sequence[str]) -> tuple[LinkBy, list[int], int, str]:
    """The cheap checks of every part, reading only headers and footers: the
    link column, each part's rows, the width and dtype."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[int] = []
    by: LinkBy | None = None
    first: tuple[Path, Path, int] | None = None  # (img, meta, dim) of the first part
    dtypes = []
    for part in parts:
        img_p, txt_p, meta_p = clip_retrieval_files(folder, part)
        try:
            meta = pq.read_metadata(meta_p)
            names = pq.read_schema(meta_p).names
        except (pa.ArrowException, OSError) as err:
            raise SourceError(f"{meta_p}: cannot read the parquet ({type(err).__name__}: {err}); re-run "
                              "clip-retrieval's inference for this part or remove its three files") from None
        column = clip_retrieval_link_column(names, meta_p)
        part_by: LinkBy = "uid" if column == "uid" else "key"
        if by is not None and part_by != by and first is not None:
            has, lacks = (meta_p, first[1]) if part_by == "uid" else (first[1], meta_p)
            raise SourceError(f"{lacks} has no uid column but {has} has: the parts link by different ids; "
                              "re-run clip-retrieval's inference with --enable_metadata on every part, or drop "
                              "the uid column from all of them (then rows link by key)")
        by = part_by
        img, txt = _load_array(img_p), _load_array(txt_p)
        for path, a in ((img_p, img), (txt_p, txt)):
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
                raise SourceError(f"{path}: a {a.dtype} array of shape {a.shape}, expected rows × dim floats "
                                  "(clip-retrieval writes float16); re-run its inference for this part")
        n = int(meta.num_rows)
        if img.shape[0] != n or txt.shape[0] != n:
            bad = img_p if img.shape[0] != n else txt_p
            raise SourceError(f"{bad}: {(img if bad == img_p else txt).shape[0]} rows but {meta_p.name} has {n} "
                              f"(and {img_p.name} {img.shape[0]}, {txt_p.name} {txt.shape[0]}); a part's three "
                              "files are written together, rows aligned: re-run clip-retrieval's inference for "
                              f"part {part} or remove its three files")
        if txt.shape[1] != img.shape[1]:
            raise SourceError(f"{txt_p}: {txt.shape[1]}-d text embeddings but {img_p.name} is {img.shape[1]}-d; "
                              "image and text must come from one CLIP model (re-embed the part)")
        if first is None:
            first = (img_p, meta_p, int(img.shape[1]))
        elif img.shape[1] != first[2]:
            raise SourceError(f"{img_p}: {img.shape[1]}-d embeddings but {first[0]} is {first[2]}-d; every part "
                              "must come from one CLIP model: re-embed the odd parts with the model of the others")
        rows.append(n)
        dtypes.extend([img.dtype, txt.dtype])
    assert by is not None and first is not None  # clip_retrieval_parts returned at least one part
    return by, rows, first[2], str(np.result_type(*dtypes))


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _as_index(folder: Path, out: Path, m: dict, signature: str, built: bool) -> SourceIndex:
    return SourceIndex(folder=folder, ids=out / m["ids"], by=m["by"], parts=tuple(m["parts"]),
                       rows=tuple(m["rows"]), dim=int(m["dim"]), dtype=m["dtype"], signature=signature, built=built,
                       uids=out / m["uids"] if m.get("uids") else None, uid_case=m.get("uid_case"))


def ensure_index(folder: Path, out: Path, tmp_root: Path, memory_limit: str = "1GB",
                 threads: int | None = None) -> SourceIndex:
    """The current index of clip-retrieval folder ``folder`` in ``out``
    (:func:`index_dir`), built or refreshed when the files changed (module
    docstring).  Raises :class:`SourceError` naming the file at fault."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SourceError(f"{folder} does not exist: set embeddings.path to clip-retrieval's output folder (the one "
                          "holding img_emb/, text_emb/ and metadata/; default: the pool)")
    with _locked(out):
        sigs = file_signatures(folder)
        signature = stable_hash({"clip_retrieval": sigs})
        m = _read_manifest(out / MANIFEST)
        if (m is not None and m.get("format") == FORMAT and m.get("folder") == str(folder)
                and m.get("signatures", {}).get("metadata") == sigs["metadata"] and (out / m["ids"]).is_file()
                and (not m.get("uids") or (out / m["uids"]).is_dir())):
            if m["signatures"].get("arrays") != sigs["arrays"]:  # arrays rewritten: redo the cheap checks
                by, rows, dim, dtype = check_parts(folder, clip_retrieval_parts(folder))
                if by != m["by"] or rows != m["rows"]:  # pragma: no cover - the metadata did not change
                    raise SourceError(f"{folder}: the parts changed under the index; re-run dbprune run")
                m = {**m, "dim": dim, "dtype": dtype, "signatures": sigs}
                write_json(out / MANIFEST, m, tmp_root)
            return _as_index(folder, out, m, signature, built=False)
        parts = clip_retrieval_parts(folder)
        by, rows, dim, dtype = check_parts(folder, parts)
        stem = f"ids-{stable_hash(sigs['metadata'])}"
        name, uids = f"{stem}.parquet", f"{stem}-uid16"
        m = {"format": FORMAT, "folder": str(folder), "by": by, "parts": parts, "rows": rows, "dim": dim,
             "dtype": dtype, "ids": name, "signatures": sigs, "n": int(sum(rows)), "uids": None, "uid_case": None}
        index = _as_index(folder, out, m, signature, built=True)
        with atomic_path(out / name, tmp_root) as tmp:
            _build(index, tmp, tmp_root, memory_limit, threads)
            _check_ids(index, tmp)
            if by == "uid":  # from the checked parquet before it is renamed in (a failure here leaves no parquet)
                case = build_uid_arrays(tmp, m["n"], out / uids, tmp_root)
                if case is not None:
                    m = {**m, "uids": uids, "uid_case": case}
        write_json(out / MANIFEST, m, tmp_root)
        for old in out.glob("ids-*"):  # the files of older builds (the manifest names the new ones)
            if old.name not in (name, m["uids"]):
                remove(old)
        return _as_index(folder, out, m, signature, built=True)


def _build(index: SourceIndex, target: Path, tmp_root: Path, memory_limit: str, threads: int | None) -> None:
    """Write ``(id, part, row)`` of every metadata row, sorted by id, to ``target`` (DuckDB, out of core)."""
    import pyarrow as pa

    from dbprune_assets.core.store.duck import connect

    metas = [str(index.files(i)[2]) for i in range(len(index.parts))]
    column = f'CAST(m."{index.column}" AS VARCHAR)'
    expr = column if index.by == "uid" else clip_retrieval_id_sql(column)
    with scratch_dir(tmp_root, "source-index-") as work:
        con = connect(Path(work), memory_limit, threads)
        try:
            con.register("parts", pa.table({"filename": metas, "part": pa.array(range(len(metas)), pa.int32())}))
            con.execute(
                f"""COPY (
                      SELECT {expr} AS id, p.part AS part, CAST(m.file_row_number AS BIGINT) AS "row"
                      FROM read_parquet(?, filename = true, file_row_number = true, union_by_name = true) m
                      JOIN parts p ON p.filename = m.filename
                      ORDER BY id NULLS FIRST, part, "row"
                    ) TO ? (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 65536)""",
                [metas, str(target)])
        finally:
            con.close()


def _check_ids(index: SourceIndex, path: Path) -> None:
    """Every id present and listed once: one streaming pass over the sorted parquet."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def fail_missing(part: int, row: int) -> None:
        raise SourceError(f"{index.files(part)[2]}: row {row} has no {index.column}; every row must name its "
                          "sample (re-export the part, or remove its three files)")

    dup: str | None = None
    seen: list[tuple[int, int]] = []  # (part, row) of the repeated id
    prev: tuple[str, int, int] | None = None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=["id", "part", "row"]):
        ids, parts, rows = batch.column(0), batch.column(1), batch.column(2)
        if len(ids) == 0:
            continue
        empty = pc.or_kleene(pc.is_null(ids), pc.equal(ids, ""))
        if pc.any(empty).as_py():  # NULLS FIRST, and "" sorts first: only the first rows can be empty
            i = int(pc.index(empty, True).as_py())
            fail_missing(int(parts[i].as_py()), int(rows[i].as_py()))
        if dup is not None:  # the repeated id may run on into this batch
            same = np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))
            seen += [(int(parts[int(i)].as_py()), int(rows[int(i)].as_py())) for i in same]
            if len(same) < len(ids):
                break
            continue
        first = ids[0].as_py()
        eq = np.zeros(len(ids), dtype=bool)
        if len(ids) > 1:
            eq[1:] = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
        if prev is not None and prev[0] == first:
            dup, seen = first, [prev[1:]]
        elif eq.any():
            j = int(np.flatnonzero(eq)[0])
            dup, seen = ids[j].as_py(), []
        if dup is not None:
            same = np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))
            seen += [(int(parts[int(i)].as_py()), int(rows[int(i)].as_py())) for i in same]
            if same[-1] < len(ids) - 1:
                break
            continue
        prev = (ids[-1].as_py(), int(parts[-1].as_py()), int(rows[-1].as_py()))
    if dup is not None:
        where = ", ".join(f"row {r} of {index.files(p)[2]}" for p, r in seen[:5]) + (" …" if len(seen) > 5 else "")
        raise SourceError(f"{index.column} {dup!r} appears {len(seen)} times in {index.folder} ({where}); every "
                          "uid/key must have one embedding row: de-duplicate the clip-retrieval output (remove the "
                          "extra rows from a part's three files together)")


def lookup(index: SourceIndex, ids: Sequence[str] | np.ndarray, tmp_root: Path,
           memory_limit: str = "512MB") -> tuple[np.ndarray, np.ndarray]:
    """For each of ``ids`` (one shard's uids or keys) its ``(part, row)`` in the
    source, ``(-1, -1)`` when the source has no row for it: a binary search in
    the uid arrays when the index has them, else a join against the parquet
    (:mod:`.clip_retrieval_lookup`; both compare the ids as strings)."""
    values = [str(v) for v in np.asarray(ids, dtype=object)]
    if index.uids is not None and index.uid_case is not None:
        return UidArrays.open(index.uids, index.uid_case).lookup(values)
    return lookup_duckdb(index.ids, values, tmp_root, memory_limit)


def gather(index: SourceIndex, part: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored (image, text) rows at ``(part, row)`` (all found), in that
    order, in the stored dtype; the parts are read memory-mapped, one at a time."""
    n = len(part)
    img = np.empty((n, index.dim), dtype=index.dtype)
    txt = np.empty((n, index.dim), dtype=index.dtype)
    if (part < 0).any():  # pragma: no cover - callers pass found rows only
        raise ValueError("gather: rows the source has not")
    for p in np.unique(part):
        sel = np.flatnonzero(part == p)
        order = np.argsort(row[sel], kind="stable")
        sel, rows = sel[order], row[sel][order]
        img_p, txt_p, _ = index.files(int(p))
        for path, dest in ((img_p, img), (txt_p, txt)):
            a = _load_array(path)
            if a.ndim != 2 or a.shape[1] != index.dim or (len(rows) and rows[-1] >= a.shape[0]):
                raise SourceError(f"{path} changed after its index was built (shape {a.shape}); re-run dbprune run")
            dest[sel] = a[rows]
    return img, txt
