"""Reading img2dataset shards: ingest (one status per parquet row) and streaming.

An img2dataset / DataComp pool is ``NNNNN.tar`` (webdataset samples
``KEY.jpg``, ``KEY.txt``, ``KEY.json``) beside ``NNNNN.parquet``, the shard's
ledger with one row per *attempted* sample, failed downloads included.  Ingest
joins the two and gives every parquet row exactly one status (``STATUSES``);
nothing is dropped, and whatever is wrong is recorded as a problem that names
the shard, the key and the cause.

**Schema first.** Before any row is judged, the parquet's columns are checked
(``key`` a string of zero-padded digits as img2dataset writes it, ``caption``,
``status``, ``error_message`` strings, ``uid`` 32-hex strings, ``width`` and
``height`` numbers): a wrong type is a :class:`ShardError` naming the file, the
column, the expected and the found type, never a silent ``missing_in_tar`` per
row.  The asset records such a shard as failed (:func:`failed_ingest`: no
samples rows, one problems row) and the other shards go on.

**Every uid once.** Within a shard, a row whose uid an earlier row already has
gets status ``duplicate_uid`` when it is otherwise ``ok`` (the first occurrence
keeps the uid); across shards the same rule is applied pool-wide by
:mod:`dbprune_assets.core.pool.uids`.

**Captions** come from the parquet's ``caption`` column, else from ``KEY.txt``.
A ``KEY.txt`` that is not UTF-8 is repaired (invalid bytes become U+FFFD) and
recorded as a ``caption_not_utf8`` problem; export writes the catalog's caption
in its place, so the catalog and the exported ``.txt`` agree.

Tars are read as streams through :mod:`dbprune_assets.core.pool.wds` (its key rule
and grouping): memory is bounded by one sample's members, never the shard.  A
damaged tar is read up to the damage.  The statuses, tables and paths are in
``docs/design.md``.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dbprune_assets.core.store.duck import polars_schema
from dbprune_assets.core.pool.wds import TarDamaged, decode_text, image_member, iter_samples

#: every status a sample can get at ingest, in the contract's order
STATUSES: tuple[str, ...] = (
    "ok", "failed_download", "undecodable", "missing_in_tar", "empty_caption", "truncated_tar", "duplicate_uid",
    "bad_uid",  # a uid that is not 32 hex digits where the pool needs one (DataComp metadata)
    "no_embedding", "bad_embedding",  # stored embeddings (core/pool/sources/)
)
#: the ``problems`` cause prefix of a caption repaired from non-UTF-8 bytes
CAPTION_NOT_UTF8 = "caption_not_utf8"

VerifyMode = Literal["decode", "header", "none"]

SAMPLES_SCHEMA: dict[str, pl.DataType] = polars_schema("samples")
PROBLEMS_SCHEMA: dict[str, pl.DataType] = polars_schema("problems")

_STAGE = "ingest"
# img2dataset's parquet status values
_SUCCESS = "success"
_FAILED_TO_RESIZE = "failed_to_resize"
# parquet columns ingest reads (the rest of img2dataset's columns are ignored):
# the kind of arrow type each must have and how a message names it
_COLUMNS: dict[str, tuple[str, str]] = {
    "uid": ("string", "string (32 hex digits, DataComp's uid)"),
    "key": ("string", "string (zero-padded digits as img2dataset writes them, e.g. '000030017')"),
    "caption": ("string", "string"),
    "status": ("string", "string (img2dataset's 'success', 'failed_to_download', ...)"),
    "error_message": ("string", "string"),
    "width": ("number", "integer"),
    "height": ("number", "integer"),
}


class ShardError(ValueError):
    """A shard cannot be read; the message names the file, the cause and what to do."""


@dataclass(frozen=True)
class ShardIngest:
    """Ingest result of one shard.

    ``samples``: one row per parquet row, in parquet order (``SAMPLES_SCHEMA``).
    ``problems``: what is wrong (``PROBLEMS_SCHEMA``).  Every non-ok sample has a
    row naming its key, except when the whole tar is missing or damaged: that is
    one row for the shard with a null key (its samples carry the status).
    Tar members without a parquet row are reported too.
    """

    shard: str
    samples: pl.DataFrame
    problems: pl.DataFrame

    def status_counts(self) -> dict[str, int]:
        """Rows per status, every status of ``STATUSES`` present (0 when absent)."""
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self.samples.group_by("status").len().iter_rows():
            counts[status] = n
        return counts


# ---------------------------------------------------------------------------
# streaming tar members
# ---------------------------------------------------------------------------


def iter_shard_members(tar_path: Path, keys: set[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample of the tar, in tar order, for the
    wanted ``keys`` (all when None): every member (jpg, txt, json, ...) of a
    sample, as needed to re-shard it with its original bytes.

    Raises ``ShardError`` when the tar is missing, when damage stops the read
    before every wanted sample was seen, or when a wanted key is not in the tar.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise ShardError(f"{tar_path}: the shard's tar does not exist; restore it or re-run ingest for shard {tar_path.stem}")
    seen: set[str] = set()
    try:
        for key, members in iter_samples(tar_path, keys):
            seen.add(key)
            yield key, members
    except TarDamaged as damage:
        missing = set() if keys is None else set(keys) - seen
        if keys is None or missing:
            raise ShardError(
                f"{tar_path}: the tar is damaged near byte {damage.offset} ({damage.cause}); "
                f"{len(missing) if keys is not None else 'the remaining'} samples could not be read. "
                f"Re-copy or re-download the shard, then re-run ingest for shard {tar_path.stem}"
            ) from damage
    missing = set() if keys is None else set(keys) - seen
    if missing:
        raise ShardError(
            f"{tar_path}: {len(missing)} wanted keys are not in the tar (e.g. {sorted(missing)[:3]}); "
            f"the tar changed since it was ingested: re-run ingest for shard {tar_path.stem}"
        )


def iter_shard_images(tar_path: Path, keys: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield (key, image bytes) per sample, in tar order, for the wanted
    ``keys`` (all samples with an image when None); the original bytes, not
    re-encoded.  Errors as ``iter_shard_members``; a wanted key without an
    image member is a ``ShardError`` too."""
    tar_path = Path(tar_path)
    seen: set[str] = set()
    for key, members in iter_shard_members(tar_path, keys):
        if key in seen:
            continue
        image = image_member(members)
        if image is None:
            if keys is not None:
                raise ShardError(
                    f"{tar_path}: sample {key} has no image member ({', '.join(sorted(members))} only); "
                    f"the tar changed since it was ingested: re-run ingest for shard {tar_path.stem}"
                )
            continue
        seen.add(key)
        yield key, image[1]


# ---------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------


@dataclass
class _Seen:
    """What the tar holds for one key."""

    image_name: str | None  # member name of the image, None when there is none
    members: tuple[str, ...]
    width: int | None = None
    height: int | None = None
    error: str | None = None  # why the image does not decode
    text: str | None = None  # KEY.txt as UTF-8 (invalid bytes replaced), when there is one
    text_error: str | None = None  # why KEY.txt is not UTF-8


def check_image(data: bytes, mode: VerifyMode) -> tuple[int | None, int | None, str | None]:
    """(width, height, error) of image bytes: ``decode`` decodes every pixel,
    ``header`` reads only the header, ``none`` checks nothing."""
    if mode == "none":
        return None, None, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if mode == "decode":
                im.load()
        return int(width), int(height), None
    except Exception as err:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return None, None, f"{type(err).__name__}: {err}"


def _scan_tar(tar_path: Path, verify: VerifyMode) -> tuple[dict[str, _Seen], TarDamaged | None]:
    """Stream the tar once and record, per key, its image check, caption text and
    members; and the damage that stopped the read (None when the tar is whole)."""
    seen: dict[str, _Seen] = {}
    try:
        for key, members in iter_samples(tar_path):
            if key in seen:  # a key split over non-adjacent members: keep the first
                continue
            image = image_member(members)
            info = _Seen(image_name=f"{key}.{image[0]}" if image else None,
                         members=tuple(f"{key}.{e}" for e in sorted(members)))
            if image is not None:
                info.width, info.height, info.error = check_image(image[1], verify)
            if "txt" in members:
                info.text, info.text_error = decode_text(members["txt"])
            seen[key] = info
    except TarDamaged as damage:
        return seen, damage
    return seen, None


def _type_kind(t: pa.DataType) -> str:
    """``string``, ``number``, ``null`` or the arrow type's own name."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    return str(t)


def _check_schema(parquet_path: Path, shard: str, schema: pa.Schema) -> None:
    """Raise ``ShardError`` for a missing ``key`` column or a column of the wrong type."""
    names = set(schema.names)
    if "key" not in names:
        raise ShardError(
            f"{parquet_path}: shard {shard}'s parquet has no 'key' column (columns: {sorted(names)}); "
            "it is not img2dataset output: write the pool with img2dataset (output_format webdataset)"
        )
    check_column_types(parquet_path, shard, schema, _COLUMNS, _type_kind,
                       lambda col, expected: f"rewrite the parquet with {col!r} as {expected.split(' (')[0]}s "
                                             "(as img2dataset writes it) or remove the shard from the pool")


def check_column_types(parquet_path: Path, shard: str, schema: pa.Schema, columns: Mapping[str, tuple[str, str]],
                       kind_of: Callable[[pa.DataType], str], fix: Callable[[str, str], str]) -> None:
    """Raise ``ShardError`` for the first of ``columns`` (``{name: (kind, how a
    message names it)}``) that ``schema`` has with a type whose ``kind_of`` is
    neither that kind nor ``null``; the message ends with ``fix(column,
    expected)`` and says that the other shards are ingested."""
    for col, (kind, expected) in columns.items():
        if col not in schema.names:
            continue
        found = schema.field(col).type
        if kind_of(found) not in (kind, "null"):
            raise ShardError(f"{parquet_path}: column {col!r} of shard {shard} has type {found}, expected {expected}; "
                             f"{fix(col, expected)}. The shard is not ingested, the other shards are")


#: DataComp's uid: 32 hex digits
HEX32 = re.compile(r"[0-9a-fA-F]{32}")


def uid_identity(uid: str) -> str:
    """What two uids are compared by: a 32-hex uid case-insensitively (``A0…``
    and ``a0…`` are one uid, as DataComp's ``uids.npy`` sees them); any other
    id (a key standing in for a uid) as it is."""
    return uid.lower() if HEX32.fullmatch(uid) else uid


def _check_values(ledger: pl.DataFrame, parquet_path: Path, shard: str) -> None:
    """Raise ``ShardError`` for null keys, keys that are not zero-padded and uids that are not 32-hex."""
    def fail(what: str, fix: str) -> ShardError:
        return ShardError(f"{parquet_path}: {what} in shard {shard}; {fix}. The shard is not ingested, the other shards are")

    null_keys = ledger["key"].is_null()
    if null_keys.any():
        raise fail(f"row {int(null_keys.arg_true()[0])} has a null key ({int(null_keys.sum())} rows in all)",
                   "img2dataset always writes one: the parquet is damaged, re-download the shard")
    digits = ledger.filter(pl.col("key").str.contains(r"^[0-9]+$"))["key"].to_list()
    if len({len(k) for k in digits}) > 1:
        short = min(digits, key=len)
        other = next(k for k in digits if len(k) != len(short))
        raise fail(f"keys of different widths ({short!r}, {other!r}): the keys are not zero-padded",
                   "write the keys as the tar names its members (img2dataset's zero-padded keys, e.g. '000030017')")
    uids = ledger["uid"].drop_nulls()
    bad = uids.filter(~uids.str.contains(r"^[0-9a-fA-F]{32}$"))
    if bad.len():
        raise fail(f"uid {bad[0]!r} is not 32 hex digits ({bad.len()} such uids)",
                   "the uid column is DataComp's 32-hex uid: fix or drop the column (without it the key is the uid)")


def _check_keys_match_tar(ledger: pl.DataFrame, seen: dict[str, _Seen], parquet_path: Path, shard: str) -> None:
    """Raise ``ShardError`` when parquet keys miss the tar only for want of zero padding (``30017`` vs ``000030017``)."""
    unpadded = {k.lstrip("0"): k for k in seen if k.isdigit()}
    for key in ledger["key"]:
        if key not in seen and key.isdigit() and unpadded.get(key.lstrip("0"), key) != key:
            raise ShardError(
                f"{parquet_path}: key {key!r} of shard {shard} is {unpadded[key.lstrip('0')]!r} in its tar: the parquet's "
                "keys are not zero-padded as img2dataset writes them; rewrite the 'key' column with the tar's keys. "
                "The shard is not ingested, the other shards are"
            )


def _read_ledger(parquet_path: Path, shard: str) -> tuple[pl.DataFrame, bool]:
    """The shard's parquet, checked (``_check_schema``, ``_check_values``) and
    normalised: key, status, caption, uid, error_message (String) and width,
    height (Int32), in parquet order; and whether it has a caption column
    (without one, captions come from KEY.txt)."""
    if not parquet_path.is_file():
        raise ShardError(f"{parquet_path}: shard {shard} has no parquet (the shard's ledger); restore it or remove the shard from the pool")
    try:
        schema = pq.read_schema(parquet_path)
        _check_schema(parquet_path, shard, schema)
        table = pq.read_table(parquet_path, columns=[c for c in _COLUMNS if c in schema.names])
    except (pa.ArrowException, OSError) as err:
        raise ShardError(
            f"{parquet_path}: cannot read shard {shard}'s parquet ({type(err).__name__}: {err}); "
            "the file is damaged or not parquet: re-download the shard or remove it from the pool"
        ) from err
    df = pl.from_arrow(table) if table.num_rows else pl.DataFrame(schema={c: pl.String() for c in table.column_names})
    assert isinstance(df, pl.DataFrame)
    out: dict[str, pl.Series] = {}
    for col in ("key", "status", "caption", "uid", "error_message"):
        out[col] = df[col].cast(pl.String) if col in df.columns else pl.Series(col, [None] * df.height, pl.String)
    for col in ("width", "height"):
        s = df[col] if col in df.columns else pl.Series(col, [None] * df.height, pl.Int32)
        if s.dtype.is_float():
            s = s.fill_nan(None)
        out[col] = s.cast(pl.Int32, strict=False)
    if "status" not in df.columns:  # a ledger without status: every row claims a download
        out["status"] = pl.Series("status", [_SUCCESS] * df.height, pl.String)
    ledger = pl.DataFrame(out)
    _check_values(ledger, parquet_path, shard)
    return ledger, "caption" in schema.names


@dataclass
class _Verdicts:
    """Per-row statuses and the problems found, built row by row."""

    shard: str
    status: list[str] = field(default_factory=list)
    width: list[int | None] = field(default_factory=list)
    height: list[int | None] = field(default_factory=list)
    caption: list[str | None] = field(default_factory=list)
    problems: list[tuple[str, str | None, str, str]] = field(default_factory=list)

    def problem(self, key: str | None, cause: str) -> None:
        self.problems.append((self.shard, key, _STAGE, cause))


def _judge_row(
    v: _Verdicts,
    row: dict[str, object],
    seen: dict[str, _Seen] | None,
    damage: TarDamaged | None,
    tar_name: str,
    caption_from_tar: bool,
    first: tuple[int, str] | None,
) -> None:
    """Give one parquet row its status, width, height and caption.

    Precedence: failed_download (img2dataset's failed_to_resize counts as
    undecodable) > missing_in_tar / truncated_tar > undecodable > empty_caption
    > duplicate_uid (``first``: (row, key) of the earlier row with the same uid) > ok.
    """
    key = str(row["key"])
    raw, caption = row["status"], row["caption"]
    width, height = row["width"], row["height"]
    info = seen.get(key) if seen is not None else None
    if info is not None and caption_from_tar:
        caption = info.text
    if raw != _SUCCESS:
        if raw == _FAILED_TO_RESIZE:
            status = "undecodable"
            v.problem(key, f"img2dataset could not resize the image ({row['error_message'] or 'no error_message'}); the sample is skipped")
        else:
            status = "failed_download"
            detail = row["error_message"] or "no error_message"
            what = "download failed" if raw == "failed_to_download" else f"parquet status is {raw!r}, not 'success'"
            v.problem(key, f"{what} ({detail}); the sample is skipped (re-run img2dataset with retries to recover it)")
    elif seen is None:
        status = "missing_in_tar"  # the whole tar is missing: one problem for the shard
    elif info is None or info.image_name is None:
        if info is None and damage is not None:
            status = "truncated_tar"  # unreadable behind the damage: one problem for the shard
        else:
            status = "missing_in_tar"
            found = f"only {', '.join(info.members)}" if info is not None else "no member"
            v.problem(key, f"parquet says success but {tar_name} has {found} for key {key} (no image); re-download the shard to recover the sample")
    elif info.error is not None:
        status = "undecodable"
        v.problem(key, f"{info.image_name} in {tar_name} does not decode ({info.error}); the sample is skipped")
    else:
        status = _usable_status(v, key, caption, info, tar_name, first)
        if info.width is not None:
            width, height = info.width, info.height
    v.status.append(status)
    v.width.append(width)  # type: ignore[arg-type]
    v.height.append(height)  # type: ignore[arg-type]
    v.caption.append(caption)  # type: ignore[arg-type]


def _usable_status(v: _Verdicts, key: str, caption: object, info: _Seen, tar_name: str,
                   first: tuple[int, str] | None) -> str:
    """empty_caption, duplicate_uid or ok for a row whose image is fine; a
    non-UTF-8 KEY.txt of an ok row is recorded (the caption is repaired)."""
    if caption is None or not str(caption).strip():
        v.problem(key, f"caption of {key} is {'missing' if caption is None else 'empty'}; CLIP training needs one, the sample is skipped")
        return "empty_caption"
    if first is not None:
        v.problem(key, f"uid of key {key} repeats the uid of key {first[1]} (row {first[0]}) of shard {v.shard}: "
                       "the first occurrence keeps the uid, this row is skipped (status duplicate_uid)")
        return "duplicate_uid"
    if info.text_error is not None:
        v.problem(key, f"{CAPTION_NOT_UTF8}: {key}.txt in {tar_name} is not UTF-8 ({info.text_error}); the caption is "
                       "repaired (invalid bytes become U+FFFD) and export writes the catalog's caption in its place")
    return "ok"


def _shard_level_problems(v: _Verdicts, tar_path: Path, seen: dict[str, _Seen] | None, damage: TarDamaged | None, ledger: pl.DataFrame) -> None:
    """Problems of the tar as a whole: missing, damaged, members without rows, repeated keys."""
    n_success = int((ledger["status"] == _SUCCESS).sum())
    if seen is None:
        v.problem(
            None,
            f"{tar_path} is missing: the {n_success} rows its parquet marks 'success' get status missing_in_tar; "
            f"restore {tar_path.name} from the download, or remove {tar_path.stem}.parquet to drop the shard",
        )
        return
    if damage is not None:
        n_lost = sum(s == "truncated_tar" for s in v.status)
        v.problem(
            None,
            f"{tar_path} is truncated or damaged near byte {damage.offset} ({damage.cause}); samples before it are read, "
            f"the {n_lost} rows after it get status truncated_tar: re-copy or re-download the shard and re-ingest it",
        )
    keys = set(ledger["key"].to_list())
    for key, info in seen.items():
        if key not in keys:
            v.problem(key, f"tar member {info.image_name or info.members[0]} has no parquet row; it is ignored")
    repeated = ledger.group_by("key", maintain_order=True).len().filter(pl.col("len") > 1)
    for key, n in repeated.iter_rows():
        v.problem(key, f"key {key} appears {n} times in {tar_path.stem}.parquet; the rows share one tar sample: deduplicate the parquet")


def ingest_shard(pool_dir: Path, shard: str, verify_images: VerifyMode = "decode") -> ShardIngest:
    """Join ``{shard}.parquet`` with ``{shard}.tar`` and give every parquet row a status.

    ``uid`` is the parquet's uid column where present (DataComp), else the key;
    width/height come from the image when it was checked, else the parquet.
    Raises ``ShardError`` when the parquet is missing, unreadable or of the
    wrong schema (see the module docstring); everything else (missing or
    truncated tar, missing members, bad images, empty captions, repeated uids,
    members without rows) becomes a status and a problem row.
    """
    pool_dir = Path(pool_dir)
    parquet_path, tar_path = pool_dir / f"{shard}.parquet", pool_dir / f"{shard}.tar"
    ledger, has_caption = _read_ledger(parquet_path, shard)
    seen: dict[str, _Seen] | None = None
    damage: TarDamaged | None = None
    if tar_path.is_file():
        seen, damage = _scan_tar(tar_path, verify_images)
        _check_keys_match_tar(ledger, seen, parquet_path, shard)
    uids = ledger["uid"].fill_null(ledger["key"])
    v = _Verdicts(shard)
    firsts: dict[str, tuple[int, str]] = {}
    for i, (row, uid) in enumerate(zip(ledger.iter_rows(named=True), uids)):
        _judge_row(v, row, seen, damage, tar_path.name, not has_caption, firsts.get(uid_identity(uid)))
        firsts.setdefault(uid_identity(uid), (i, str(row["key"])))
    _shard_level_problems(v, tar_path, seen, damage, ledger)
    samples = pl.DataFrame(
        {
            "uid": uids,
            "shard": [shard] * ledger.height,
            "key": ledger["key"],
            "row": pl.int_range(0, ledger.height, dtype=pl.Int32, eager=True),
            "caption": pl.Series(v.caption, dtype=pl.String),
            "width": pl.Series(v.width, dtype=pl.Int32),
            "height": pl.Series(v.height, dtype=pl.Int32),
            "status": pl.Series(v.status, dtype=pl.String),
        },
        schema=SAMPLES_SCHEMA,
    )
    problems = pl.DataFrame(v.problems, schema=PROBLEMS_SCHEMA, orient="row")
    return ShardIngest(shard=shard, samples=samples, problems=problems)


def failed_ingest(shard: str, error: ShardError) -> ShardIngest:
    """The record of a shard whose parquet cannot be ingested (``ShardError``):
    no samples rows and one problems row (null key) with the error, so that the
    other shards and every later step go on with a consistent catalog."""
    problems = pl.DataFrame([(shard, None, _STAGE, f"shard not ingested: {error}")], schema=PROBLEMS_SCHEMA, orient="row")
    return ShardIngest(shard=shard, samples=pl.DataFrame(schema=SAMPLES_SCHEMA), problems=problems)
