"""webdataset tars: the one place that knows how samples sit in a tar.

A webdataset tar (img2dataset's output, open_clip_train's input) stores a
sample as consecutive members ``KEY.EXT`` (``000030017.jpg``,
``000030017.txt``, ...).  Everything in dbprune that reads or writes such a
tar goes through this module: ingest, embedding, SemDeDup/DBP image grids,
export, evaluation and the sample-pool generator.

**The key rule** (:func:`split_key`) is webdataset's own:
``webdataset.tariterators.base_plus_ext`` splits a member name at the first
dot of its *file name* and keeps the folder prefix in the key
(``a/b/000.seg.png`` -> key ``a/b/000``, extension ``seg.png``), and
``group_by_keys`` lowercases the extension (``lcase=True``).  So a key here is
exactly the ``__key__`` open_clip_train sees, and a member inside a folder
(or a ``../`` name) is a different key than the bare parquet key: ingest
reports it as a member without a parquet row instead of silently matching it.
Extensions are compared lowercase (``KEY.JPG`` is the image of ``KEY``).
Names without a dot in the file name have no key and are skipped, as
webdataset skips them; so are members that are not regular files (folders,
symlinks, hard links, devices).

**Grouping**: consecutive members with the same key form one sample, as
``group_by_keys`` does; a key that appears again later starts a new sample.
Within a sample the first member of an extension wins.

**Why the readers do not import webdataset**: ``import webdataset`` imports
torch (2-5 s, measured), which ingest and export would otherwise pay per run
for nothing else, and webdataset's iterators cannot report *where* a tar is
damaged (a truncated member, a file cut at a member boundary without the
end-of-archive blocks), which ingest must turn into statuses.  The readers
therefore stream with :mod:`tarfile` and apply the rule above;
``test_wds.py`` checks :func:`split_key` and the grouping against
webdataset's ``base_plus_ext`` and ``group_by_keys`` on the same names.

**Writing**: :func:`write_tar` writes whole samples with webdataset's
``TarWriter`` (members in sorted extension order, fixed header fields, so the
same samples give the same bytes).  Export cannot use it (see
:func:`encode_member`) and assembles tars from :func:`encode_member` and
:func:`tar_trailer`, the same header conventions at the byte level.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar, cast

#: member extensions treated as a sample's image, in order of preference
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

#: header fields of every tar dbprune writes with :func:`write_tar` (not the clock, not the user)
POOL_MTIME = 946684800  # 2000-01-01
POOL_MODE = 0o444

# webdataset.tariterators.base_plus_ext's pattern: key = path up to the first dot of the file name
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

T = TypeVar("T")


class TarDamaged(Exception):
    """A tar stops being readable at byte ``offset`` (``cause`` says why).

    Raised by the readers after every complete sample before the damage was
    yielded; the sample being read when it struck is dropped.
    """

    def __init__(self, path: Path, cause: str, offset: int) -> None:
        super().__init__(f"{path}: damaged near byte {offset} ({cause})")
        self.path, self.cause, self.offset = Path(path), cause, offset


@dataclass(frozen=True)
class MemberRef:
    """Where a member's bytes are in an (uncompressed) tar: read ``size`` bytes at ``offset``."""

    offset: int
    size: int
    name: str


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a member name by the rule in the module docstring
    (``ext`` lowercased), or None when the file name has no dot."""
    m = _KEY_RE.match(name)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


def image_member(members: dict[str, T]) -> tuple[str, T] | None:
    """``(ext, member)`` of a sample's image: the first of :data:`IMAGE_EXTS` present."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext, members[ext]
    return None


def decode_text(data: bytes) -> tuple[str, str | None]:
    """A text member (``KEY.txt``) as ``str``: UTF-8 with invalid bytes replaced
    by U+FFFD; and where it is not UTF-8 (None when it is).  Ingest and export
    both read captions through here, so the catalog and the export agree."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return data.decode("utf-8", errors="replace"), f"byte 0x{data[err.start]:02x} at offset {err.start}"


def group_samples(members: Iterable[tuple[str, str, T]]) -> Iterator[tuple[str, dict[str, T]]]:
    """``(key, {ext: value})`` per run of consecutive ``(key, ext, value)`` with one key."""
    key: str | None = None
    sample: dict[str, T] = {}
    for k, ext, value in members:
        if k != key:
            if key is not None:
                yield key, sample
            key, sample = k, {}
        sample.setdefault(ext, value)
    if key is not None:
        yield key, sample


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def _require_file(tar_path: Path) -> Path:
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"{tar_path}: no such tar")
    return tar_path


def _has_end_marker(tar_path: Path, offset: int) -> bool:
    """True when a zero block (tar's end-of-archive marker) sits at ``offset``.

    tarfile silently treats a file cut at a member boundary, or inside a
    header, as a clean end; the missing marker is how such a cut shows.
    """
    with open(tar_path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


@dataclass
class _Stream:
    """Where a streamed read stopped (the next header's offset)."""

    end: int = 0


def _stream_members(tar_path: Path, wanted: set[str] | None, at: _Stream) -> Iterator[tuple[str, str, bytes | None]]:
    """``(key, ext, bytes)`` per keyed regular member in tar order; ``None``
    instead of bytes for keys outside ``wanted`` (their data is skipped unread).
    Raises :class:`TarDamaged` where the stream breaks."""
    tf: tarfile.TarFile | None = None
    try:
        with tarfile.open(tar_path, mode="r|") as tf:
            for info in tf:
                tf.members = []  # a stream read keeps no index: memory stays one member
                split = split_key(info.name) if info.isfile() else None
                if split is None:
                    continue
                if wanted is not None and split[0] not in wanted:
                    yield split[0], split[1], None
                    continue
                try:
                    fileobj = tf.extractfile(info)
                    data = fileobj.read() if fileobj is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                except _READ_ERRORS:
                    # the header was read: announce its key, so that the sample before it
                    # counts as complete, then drop this one with the damage
                    yield split[0], split[1], None
                    raise
                yield split[0], split[1], data
            at.end = tf.offset
    except _READ_ERRORS as err:
        raise TarDamaged(tar_path, f"{type(err).__name__}: {err}", tf.offset if tf is not None else 0) from err


def iter_samples(tar_path: Path, keys: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a tar, in tar order, streamed
    (memory: one sample); only the samples of ``keys`` when given (others are
    skipped unread, and the read stops once each wanted key was seen).

    Raises ``FileNotFoundError`` for a missing file and :class:`TarDamaged`
    where the tar breaks, including a file that ends without tar's
    end-of-archive marker (checked after the last sample was yielded).
    """
    tar_path = _require_file(tar_path)
    wanted = set(keys) if keys is not None else None
    left = set(wanted or ())
    at = _Stream()
    for key, sample in group_samples(_stream_members(tar_path, wanted, at)):
        if wanted is not None and key not in wanted:
            continue
        yield key, cast("dict[str, bytes]", sample)
        left.discard(key)
        if wanted is not None and not left:
            return
    if not _has_end_marker(tar_path, at.end):
        raise TarDamaged(tar_path, "the file ends without tar's end-of-archive marker (it was cut short)", at.end)


def iter_sample_headers(tar_path: Path) -> Iterator[tuple[str, dict[str, MemberRef]]]:
    """``(key, {ext: MemberRef})`` per sample, in tar order, from the member
    headers only (the data is seeked over, not read): an index for random
    access and for counting.  Raises ``FileNotFoundError`` and :class:`TarDamaged`
    as :func:`iter_samples` (without the end-marker check)."""
    tar_path = _require_file(tar_path)

    def refs() -> Iterator[tuple[str, str, MemberRef]]:
        tf: tarfile.TarFile | None = None
        try:
            with tarfile.open(tar_path, mode="r:") as tf:
                while (info := tf.next()) is not None:
                    split = split_key(info.name) if info.isfile() else None
                    if split is not None:
                        yield split[0], split[1], MemberRef(info.offset_data, info.size, info.name)
        except _READ_ERRORS as err:
            raise TarDamaged(tar_path, f"{type(err).__name__}: {err}", tf.offset if tf is not None else 0) from err

    yield from group_samples(refs())


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples ``(key, {ext: bytes})`` to ``path`` with webdataset's
    ``TarWriter``: members of a sample in sorted extension order, header fields
    fixed (mtime :data:`POOL_MTIME`, mode :data:`POOL_MODE`, uid/gid 0, no
    owner names).  Returns the number of samples."""
    from webdataset import TarWriter

    n = 0
    with open(path, "wb") as f, TarWriter(f, user="", group="", mode=POOL_MODE, mtime=POOL_MTIME, encoder=False) as w:
        for key, members in samples:
            w.write({"__key__": key, **members})
            n += 1
    return n


# Export writes tars from member blocks it has spooled to disk out of order
# (bounded memory, see core/store/export.py) and must keep each sample's members in
# their source order with their original bytes; TarWriter sorts a sample's
# members and writes through a tarfile stream, so export uses these two.
EXPORT_MTIME = 0
EXPORT_MODE = 0o644


def encode_member(name: str, data: bytes) -> bytes:
    """One tar member (header + data + zero padding to the block) with
    export's fixed header fields (mtime 0, mode 0o644, uid/gid 0, no owner
    names, PAX format)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = EXPORT_MTIME
    info.mode = EXPORT_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + b"\0" * ((-len(data)) % tarfile.BLOCKSIZE)


def tar_trailer(length: int) -> bytes:
    """End-of-archive after ``length`` bytes of members: two zero blocks, then
    zero padding to a full record (as tarfile writes it)."""
    end = length + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)
