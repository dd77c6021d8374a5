"""Writing the sample pool: layout (shards, keys, uids, urls), images,
img2dataset's tar + parquet per shard, the ground truth, the ``eval/`` and
``reference/`` splits and ``pool_info.json``."""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dbprune_assets.core.store.atomic import atomic_path
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.pool.poolkind import GENERATOR, is_sample_pool  # noqa: F401  (re-exported)
from dbprune_assets.core.settings import PoolSettings
from dbprune_assets.core.pool.shard_stats import shard_stats, stats_bytes, stats_name
from dbprune_assets.core.pool.wds import POOL_MTIME, write_tar

from dbprune_assets.samplepool.captions import BACKGROUND_COLORS, EVAL_TEMPLATES, describe_rendering, make_caption
from dbprune_assets.samplepool.concepts import COLORS, Concept, make_concepts, rng_stream
from dbprune_assets.samplepool.plan import Row, plan_pool
from dbprune_assets.samplepool.render import NEAR_NOISE_SIGMA, RenderParams, corrupt, encode_jpeg, noise, render, sample_params
from dbprune_assets.samplepool.webmeta import random_original_size, random_url



#: bump when the same settings would produce different files
GENERATOR_VERSION = 2  # 2: eval/ holds CLIP_benchmark webdataset sets (shapes, shapes_retrieval)


#: what ingest should find for each planted row (a subset of ingest's statuses)
PLANTED_STATUSES: tuple[str, ...] = ("ok", "failed_download", "undecodable", "empty_caption")

EVAL_SHARD_SIZE = 1000
REFERENCE_SHARD_SIZE = 1000

_ERRORS: tuple[str, ...] = (
    "HTTP Error 404: Not Found",
    "HTTP Error 403: Forbidden",
    "<urlopen error [Errno -2] Name or service not known>",
    "The read operation timed out",
    "HTTP Error 410: Gone",
    "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>",
)


@dataclass(frozen=True)
class PoolSummary:
    """What ``write_sample_pool`` wrote."""

    pool_dir: Path
    shards: tuple[str, ...]
    samples: int  # parquet rows over all shards (failed included)
    status_counts: dict[str, int]  # planted status -> rows
    duplicates: int  # copies (exact + near), originals excluded
    mismatched: int
    eval_dir: Path
    eval_samples: int
    reference_dir: Path
    reference_samples: int
    seconds: float = field(default=0.0, compare=False)

    def __str__(self) -> str:
        statuses = ", ".join(f"{k} {v}" for k, v in self.status_counts.items())
        return (
            f"{self.samples} rows in {len(self.shards)} shards ({statuses}); {self.duplicates} planted duplicates, "
            f"{self.mismatched} mismatched captions; eval {self.eval_samples}, reference {self.reference_samples} "
            f"samples; {self.seconds:.1f} s -> {self.pool_dir}"
        )



class ImageMaker:
    """Renders rows to JPEG bytes; copies are derived from their original's
    rendering, which is cached until the pool is written."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._originals: dict[int, tuple[np.ndarray, bytes]] = {}

    def original(self, row: Row) -> tuple[np.ndarray, bytes]:
        """Pixels and JPEG bytes of a duplicate group's original (cached)."""
        if id(row) not in self._originals:
            pixels = render(row.params, self.size)
            self._originals[id(row)] = (pixels, encode_jpeg(pixels, row.params.quality))
        return self._originals[id(row)]

    def __call__(self, row: Row) -> bytes:
        if row.source is None:
            if row.dup_kind == "original":
                return self.original(row)[1]
            return encode_jpeg(render(row.params, self.size), row.params.quality)
        pixels, data = self.original(row.source)
        if row.variant == "exact":
            return data
        if row.variant == "requality":  # decode and re-encode, as a re-upload would
            decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            return encode_jpeg(decoded, row.params.quality)
        if row.variant == "noise":  # the same picture with a little extra pixel noise
            noisy = pixels.astype(np.float32) + noise(row.params.noise_seed, self.size) * NEAR_NOISE_SIGMA
            return encode_jpeg(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), row.params.quality)
        if row.variant == "rescale":  # re-uploaded at 3/4 of the size, shown at the original size
            small = self.size * 3 // 4
            img = Image.fromarray(pixels).resize((small, small), Image.BILINEAR).resize((self.size, self.size),
                                                                                          Image.BILINEAR)
            return encode_jpeg(np.asarray(img), row.params.quality)
        raise ValueError(f"unknown near-duplicate variant {row.variant!r}")


def write_sample_pool(pool_dir: Path, settings: PoolSettings, tmp_root: Path | None = None) -> PoolSummary:
    """Write the sample pool for ``settings`` at ``pool_dir``, atomically.

    The whole folder is built under ``tmp_root`` (default: ``.tmp`` next to
    ``pool_dir``) and renamed into place at the end, so no reader ever sees a
    half pool; an existing folder is replaced.
    """
    start = time.perf_counter()
    pool_dir = Path(pool_dir)
    concepts = make_concepts(settings)
    rows = plan_pool(settings, concepts)
    shard_names = _shard_names(settings.shards)
    with atomic_path(pool_dir, tmp_root if tmp_root is not None else pool_dir.parent / ".tmp") as tmp:
        tmp.mkdir(parents=True)
        _write_pool_shards(tmp, rows, shard_names, settings)
        _write_ground_truth(tmp / "ground_truth.parquet", rows, concepts)
        eval_n = _write_eval_split(tmp / "eval", settings, concepts)
        ref_n = _write_reference_split(tmp / "reference", settings, concepts)
        counts = {s: sum(r.planted == s for r in rows) for s in PLANTED_STATUSES}
        info = _pool_info(settings, concepts, rows, counts, shard_names, eval_n, ref_n)
        (tmp / "pool_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return PoolSummary(
        pool_dir=pool_dir,
        shards=tuple(shard_names),
        samples=len(rows),
        status_counts=counts,
        duplicates=sum(r.dup_kind in ("exact", "near") for r in rows),
        mismatched=sum(r.mismatched for r in rows),
        eval_dir=pool_dir / "eval",
        eval_samples=eval_n,
        reference_dir=pool_dir / "reference",
        reference_samples=ref_n,
        seconds=time.perf_counter() - start,
    )


def load_ground_truth(pool_dir: Path) -> pl.DataFrame:
    """The planted truth of a sample pool: one row per parquet row of every shard."""
    path = Path(pool_dir) / "ground_truth.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {pool_dir} is not a generated sample pool "
            "(write one with `dbprune sample-pool`); user pools have no ground truth"
        )
    return pl.read_parquet(path)


def _shard_names(n: int) -> list[str]:
    width = max(5, len(str(n - 1)))
    return [f"{i:0{width}d}" for i in range(n)]


def _key(shard_idx: int, index: int, shard_width: int, index_width: int) -> str:
    """img2dataset's key: zero-padded shard id followed by the zero-padded index."""
    return f"{shard_idx:0{shard_width}d}{index:0{index_width}d}"


def _assign_layout(rows: Sequence[Row], settings: PoolSettings, shard_names: Sequence[str]) -> None:
    """Give every row its shard, img2dataset key, DataComp uid, url and the
    metadata a download would have produced."""
    rng = rng_stream(settings.seed, 5)
    per_shard = settings.samples_per_shard
    index_width = max(4, len(str(per_shard - 1)))
    shard_width = len(shard_names[0])
    seen: set[str] = set()
    for i, row in enumerate(rows):
        s_idx, idx = divmod(i, per_shard)
        row.shard = shard_names[s_idx]
        row.key = _key(s_idx, idx, shard_width, index_width)
        uid = rng.bytes(16).hex()
        while uid in seen:
            uid = rng.bytes(16).hex()
        seen.add(uid)
        row.uid = uid
        row.url = random_url(rng)
        row.original_size = random_original_size(rng)
        if row.planted == "failed_download":
            row.error_message = _ERRORS[int(rng.integers(len(_ERRORS)))]


def _render_images(rows: Sequence[Row], size: int, seed: int) -> None:
    """Fill ``row.image`` for every row that was 'downloaded'."""
    rng = rng_stream(seed, 6)
    maker = ImageMaker(size)
    n_undecodable = 0
    for row in progress(rows, desc="sample pool: rendering", unit="image"):
        if row.planted == "failed_download":
            continue
        row.image = maker(row)
        if row.planted == "undecodable":
            row.image = corrupt(row.image, n_undecodable, rng)
            n_undecodable += 1


_SHARD_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("sha256", pa.string()),
    ]
)


#: fixed parquet writer settings (deterministic bytes), for both generated pools
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "use_dictionary": True,
                                   "write_statistics": True}


def _write_parquet(path: Path, table: pa.Table) -> None:
    """Parquet with :data:`PARQUET_OPTIONS` (deterministic bytes)."""
    pq.write_table(table, path, **PARQUET_OPTIONS)


def _download_record(row: Row, size: int) -> dict[str, Any]:
    """The parquet/json record img2dataset writes for one attempted sample."""
    ok = row.image is not None
    return {
        "uid": row.uid,
        "key": row.key,
        "caption": row.caption,
        "url": row.url,
        "status": "success" if ok else "failed_to_download",
        "error_message": None if ok else row.error_message,
        "width": size if ok else None,
        "height": size if ok else None,
        "original_width": row.original_size[0] if ok else None,
        "original_height": row.original_size[1] if ok else None,
        "sha256": hashlib.sha256(row.image).hexdigest() if row.image is not None else None,
    }


def _write_pool_shards(folder: Path, rows: Sequence[Row], shard_names: Sequence[str], settings: PoolSettings) -> None:
    """Render the images and write ``NNNNN.tar`` + ``NNNNN.parquet`` + img2dataset's
    ``NNNNN_stats.json`` (:mod:`dbprune_assets.core.pool.shard_stats`: every parquet
    row counted, failed downloads by error message) per shard."""
    size = settings.image_size
    _assign_layout(rows, settings, shard_names)
    _render_images(rows, size, settings.seed)
    per = settings.samples_per_shard
    for s_idx, shard in enumerate(shard_names):
        shard_rows = rows[s_idx * per : (s_idx + 1) * per]
        records = [_download_record(r, size) for r in shard_rows]
        _write_parquet(folder / f"{shard}.parquet", pa.Table.from_pylist(records, schema=_SHARD_SCHEMA))
        write_tar(
            folder / f"{shard}.tar",
            (
                (r.key, {"jpg": r.image, "txt": r.caption.encode(), "json": json.dumps(rec).encode()})
                for r, rec in zip(shard_rows, records)
                if r.image is not None
            ),
        )
        stats = shard_stats(((rec["status"], rec["error_message"]) for rec in records), start_time=POOL_MTIME)
        (folder / stats_name(shard)).write_bytes(stats_bytes(stats))


#: ``ground_truth.parquet``'s schema, for both generated pools (read by :func:`load_ground_truth`)
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("concept", pa.int32()),
        ("concept_name", pa.string()),
        ("variability", pa.float64()),
        ("dup_group", pa.int32()),
        ("dup_kind", pa.string()),
        ("dup_variant", pa.string()),
        ("mismatched", pa.bool_()),
        ("caption_concept", pa.int32()),
        ("planted_status", pa.string()),
    ]
)


def _write_ground_truth(path: Path, rows: Sequence[Row], concepts: Sequence[Concept]) -> None:
    records = [
        {
            "uid": r.uid,
            "shard": r.shard,
            "key": r.key,
            "concept": r.concept,
            "concept_name": concepts[r.concept].name,
            "variability": concepts[r.concept].variability,
            "dup_group": r.dup_group,
            "dup_kind": r.dup_kind,
            "dup_variant": r.variant,
            "mismatched": r.mismatched,
            "caption_concept": r.caption_concept,
            "planted_status": r.planted,
        }
        for r in rows
    ]
    _write_parquet(path, pa.Table.from_pylist(records, schema=GROUND_TRUTH_SCHEMA))


def _write_split(folder: Path, samples: Sequence[dict[str, bytes]], shard_size: int) -> None:
    """Write webdataset shards ``00000.tar``... and ``sizes.json`` (read by
    open_clip_train to count samples)."""
    folder.mkdir(parents=True)
    sizes: dict[str, int] = {}
    for s_idx, start in enumerate(range(0, len(samples), shard_size)):
        name = f"{s_idx:05d}.tar"
        chunk = samples[start : start + shard_size]
        sizes[name] = write_tar(folder / name, ((_key(s_idx, i, 5, 4), m) for i, m in enumerate(chunk)))
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")


def _clean_samples(concept_ids: Sequence[int], concepts: Sequence[Concept], size: int, rng: np.random.Generator) -> list[tuple[int, bytes, str]]:
    """(concept, jpeg, caption) renderings with correct captions."""
    out = []
    for c in progress(concept_ids, desc="sample pool: rendering splits", unit="image"):
        params = sample_params(concepts[c], rng, size)
        caption = make_caption(concepts[c].name, params, size, rng)
        out.append((c, encode_jpeg(render(params, size), params.quality), caption))
    return out


#: the sample pool's evaluation sets: folders under ``eval/`` in CLIP_benchmark's
#: webdataset layout (``clip_benchmark.datasets.builder.build_wds_dataset``)
EVAL_CLASSIFICATION = "shapes"
EVAL_RETRIEVAL = "shapes_retrieval"


def _write_wds_dataset(folder: Path, samples: Sequence[dict[str, bytes]], shard_size: int, dataset_type: str) -> None:
    """One dataset folder in CLIP_benchmark's webdataset layout: ``test/0.tar``,
    ``test/1.tar``, ... with ``test/nshards.txt``, and ``dataset_type.txt``."""
    (folder / "test").mkdir(parents=True)
    starts = range(0, len(samples), shard_size)
    for s_idx, start in enumerate(starts):
        chunk = samples[start : start + shard_size]
        write_tar(folder / "test" / f"{s_idx}.tar", ((f"s{start + i:07d}", m) for i, m in enumerate(chunk)))
    (folder / "test" / "nshards.txt").write_text(f"{len(starts)}\n")
    (folder / "dataset_type.txt").write_text(f"{dataset_type}\n")


def _retrieval_params(concept: Concept, rng: np.random.Generator, size: int) -> RenderParams:
    """A rendering of ``concept`` whose scene varies in every facet a caption
    names (grid cell, size, shade, tilt, background colour and texture), so
    that captions can single out their image as COCO captions do."""
    p = sample_params(concept, rng, size)
    s = float(size)
    radius = s * float(rng.choice((0.12, 0.18, 0.26))) * float(np.exp(rng.uniform(-0.08, 0.08)))
    lo, hi = radius * 0.7, s - radius * 0.7
    cx, cy = ((int(rng.integers(3)) + 0.5 + rng.uniform(-0.25, 0.25)) * s / 3 for _ in range(2))
    shade = float(rng.choice((0.7, 1.0, 1.2)))
    rgb = tuple(float(np.clip(c * shade, 0, 255)) for c in p.main.rgb)
    fg = np.asarray(rgb)
    names = [k for k, v in BACKGROUND_COLORS.items() if np.linalg.norm(np.asarray(v) - fg) > 110] or ["charcoal"]
    bg = tuple(float(c) for c in BACKGROUND_COLORS[names[int(rng.integers(len(names)))]])
    main = replace(p.main, cx=float(min(max(cx, lo), hi)), cy=float(min(max(cy, lo), hi)), radius=radius,
                   rotation=float(rng.uniform(-40, 40)), rgb=rgb)
    texture = ("none", "none", "gradient", "noise", "stripes", "checker")[int(rng.integers(6))]
    return replace(p, main=main, bg_rgb=bg, texture=texture, distractors=p.distractors[: int(rng.integers(4))])


def _write_eval_split(folder: Path, settings: PoolSettings, concepts: Sequence[Concept]) -> int:
    """``eval/``: two evaluation sets in CLIP_benchmark's webdataset layout
    (``eval_per_class`` images per concept each; returns the images written):

    * ``eval/shapes/``: zero-shot classification (``cls`` = concept id, with
      ``classnames.txt`` and ``zeroshot_classification_templates.txt``);
    * ``eval/shapes_retrieval/``: image-text retrieval (``dataset_type.txt`` =
      ``retrieval``), two captions per image that describe that image (size,
      shade, place, tilt, background, other shapes), not just its concept.
    """
    folder.mkdir(parents=True)
    rng = rng_stream(settings.seed, 3)
    ids = np.repeat(np.arange(len(concepts)), settings.eval_per_class)
    ids = ids[rng.permutation(len(ids))].tolist()
    cls_samples = [{"jpg": jpg, "cls": str(c).encode()} for c, jpg, _ in _clean_samples(ids, concepts, settings.image_size, rng)]
    cls_dir = folder / EVAL_CLASSIFICATION
    _write_wds_dataset(cls_dir, cls_samples, EVAL_SHARD_SIZE, "classification")
    (cls_dir / "classnames.txt").write_text("".join(f"{c.name}\n" for c in concepts))
    (cls_dir / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in EVAL_TEMPLATES))

    rng = rng_stream(settings.seed, 7)
    base = np.repeat(np.arange(len(concepts)), settings.eval_per_class)
    ids_r = base[rng.permutation(len(base))].tolist()
    size = settings.image_size
    ret_samples = []
    for c in progress(ids_r, desc="sample pool: rendering the retrieval set", unit="image"):
        params = _retrieval_params(concepts[c], rng, size)
        captions = describe_rendering(concepts[c].name, params, size, COLORS[concepts[c].color])
        ret_samples.append({"jpg": encode_jpeg(render(params, size), params.quality), "txt": "\n".join(captions).encode()})
    _write_wds_dataset(folder / EVAL_RETRIEVAL, ret_samples, EVAL_SHARD_SIZE, "retrieval")
    return len(cls_samples) + len(ret_samples)


def _write_reference_split(folder: Path, settings: PoolSettings, concepts: Sequence[Concept]) -> int:
    """``reference/``: clean, balanced captioned shards for the bootstrap encoder."""
    rng = rng_stream(settings.seed, 4)
    n, k = settings.reference_samples, len(concepts)
    counts = np.full(k, n // k)
    counts[rng.permutation(k)[: n % k]] += 1
    ids = np.repeat(np.arange(k), counts)
    ids = ids[rng.permutation(len(ids))].tolist()
    samples = []
    for c, jpg, cap in _clean_samples(ids, concepts, settings.image_size, rng):
        meta = {"caption": cap, "concept": c, "concept_name": concepts[c].name}
        samples.append({"jpg": jpg, "txt": cap.encode(), "json": json.dumps(meta).encode()})
    _write_split(folder, samples, REFERENCE_SHARD_SIZE)
    return len(samples)


def _pool_info(
    settings: PoolSettings,
    concepts: Sequence[Concept],
    rows: Sequence[Row],
    counts: dict[str, int],
    shard_names: Sequence[str],
    eval_n: int,
    ref_n: int,
) -> dict[str, Any]:
    per_concept = np.bincount([r.concept for r in rows], minlength=len(concepts))
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "settings": settings.model_dump(mode="json"),
        "rows": len(rows),
        "shards": list(shard_names),
        "planted_status_counts": counts,
        "duplicates": {
            "groups": len({r.dup_group for r in rows if r.dup_group >= 0}),
            "exact": sum(r.dup_kind == "exact" for r in rows),
            "near": sum(r.dup_kind == "near" for r in rows),
        },
        "mismatched": sum(r.mismatched for r in rows),
        "concepts": [
            {
                "id": c.id,
                "name": c.name,
                "shape": c.shape,
                "color": c.color,
                "variability": c.variability,
                "frequency": round(c.frequency, 6),
                "rows": int(per_concept[c.id]),
            }
            for c in concepts
        ],
        "eval": {"samples": eval_n, "classes": len(concepts), "per_class": settings.eval_per_class,
                 "datasets": [EVAL_CLASSIFICATION, EVAL_RETRIEVAL]},
        "reference": {"samples": ref_n},
    }
