"""The synthetic sample pool: a seeded, deterministic stand-in for a web crawl.

``write_sample_pool`` writes a pool in img2dataset's webdataset layout (the
format LAION and DataComp pools use) whose defects are *planted* and recorded in
``ground_truth.parquet``, so every stage of the method can be checked against
known answers:

* concepts are (shape, color) pairs rendered with PIL; each concept has a
  planted ``variability`` (how diverse its renderings are) spread evenly over
  [0, 1], and a long-tailed (Zipf) frequency assigned independently of it, so
  DBP's "keep more of complex concepts" can be measured without confounding;
* ~10% of rows are exact (same JPEG bytes) or near (re-encoded, re-noised or
  1-px shifted) duplicates of another row, in groups of 2-4 (SemDeDup);
* ~8% of captions belong to another concept (the CLIP-score filter);
* ~2% rows failed to download, ~0.5% have an undecodable image behind a
  "success" status and ~0.5% an empty caption (ingest).

Besides the pool shards the folder holds ``eval/`` (labelled zero-shot and
retrieval split) and ``reference/`` (clean split to train the bootstrap
encoder); neither is part of the pool.  The pool is a pure function of its
``PoolSettings``: the same settings give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dbprune_assets.core.atomic import atomic_path
from dbprune_assets.core.settings import PoolSettings

#: written into ``pool_info.json``; ``is_sample_pool`` looks for it
GENERATOR = "dbprune.sample_pool"
#: bump when the same settings would produce different files
GENERATOR_VERSION = 1

#: what ingest should find for each planted row (a subset of ingest's statuses)
PLANTED_STATUSES: tuple[str, ...] = ("ok", "failed_download", "undecodable", "empty_caption")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 60, 195),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (242, 242, 242),
}

# planted rates (shares of all pool rows)
FAILED_RATE = 0.02
UNDECODABLE_RATE = 0.005
EMPTY_CAPTION_RATE = 0.005
DUPLICATE_RATE = 0.10  # copies (not originals) of duplicate groups
MISMATCH_RATE = 0.08
EXACT_SHARE = 0.5  # of copies; the rest are near duplicates
ZIPF_EXPONENT = 1.0
NEAR_VARIANTS: tuple[str, ...] = ("requality", "noise", "shift")

EVAL_SHARD_SIZE = 1000
REFERENCE_SHARD_SIZE = 1000

# fixed tar header fields: the tars must not depend on the clock or the user
_TAR_MTIME = 946684800  # 2000-01-01
_TAR_MODE = 0o444
_SUPERSAMPLE = 2
_RING_INNER = 0.55
_BASE_GRAY = 64.0

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a_name}",
    "{name} on a {bg} background",
    "{a_size} {name}",
    "{a_name} {pos}",
    "a drawing of {a_name}",
    "{name} icon",
    "{a_size} {name} {pos} on a {bg} background",
    "clipart of {a_name}",
    "an image showing {a_name}",
    "{name}",
)

EVAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a {} shape.",
    "an image of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} on a plain background.",
    "a {} icon.",
)

_DOMAINS: tuple[str, ...] = (
    "cdn.shapestock.example",
    "img.clipartzone.example",
    "media.iconbazaar.example",
    "static.geoshop.example",
    "i.pixelboard.example",
    "images.craftyprints.example",
)

_ERRORS: tuple[str, ...] = (
    "HTTP Error 404: Not Found",
    "HTTP Error 403: Forbidden",
    "<urlopen error [Errno -2] Name or service not known>",
    "The read operation timed out",
    "HTTP Error 410: Gone",
    "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>",
)


# ---------------------------------------------------------------------------
# data types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """One visual concept: a colored shape with a planted variability and frequency."""

    id: int
    shape: str
    color: str
    variability: float
    frequency: float  # planted share of the pool's base samples (Zipf weight)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Blob:
    """A shape drawn on the canvas (the concept's shape or a distractor)."""

    shape: str
    cx: float
    cy: float
    radius: float
    rotation: float
    rgb: tuple[float, float, float]


@dataclass(frozen=True)
class RenderParams:
    """Everything needed to re-render one image exactly (duplicates re-use it)."""

    main: Blob
    distractors: tuple[Blob, ...]
    bg_rgb: tuple[float, float, float]
    texture: str  # none | gradient | noise | stripes | checker
    texture_amp: float
    texture_angle: float
    texture_freq: float
    texture_seed: int
    noise_sigma: float
    noise_seed: int
    quality: int


@dataclass
class _Row:
    """One planted parquet row of the pool (before it is written)."""

    concept: int
    params: RenderParams
    dup_group: int = -1
    dup_kind: str | None = None
    variant: str | None = None  # exact | requality | noise | shift (copies only)
    source: "_Row | None" = None  # the group's original (copies only)
    planted: str = "ok"
    mismatched: bool = False
    caption_concept: int = -1
    caption: str = ""
    # filled when laid out
    shard: str = ""
    key: str = ""
    uid: str = ""
    url: str = ""
    error_message: str | None = None
    original_size: tuple[int, int] = (0, 0)
    image: bytes | None = None


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


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def write_sample_pool(pool_dir: Path, settings: PoolSettings, tmp_root: Path | None = None) -> PoolSummary:
    """Write the sample pool for ``settings`` at ``pool_dir``, atomically.

    The whole folder is built under ``tmp_root`` (default: ``.tmp`` next to
    ``pool_dir``) and renamed into place at the end, so no reader ever sees a
    half pool; an existing folder is replaced.
    """
    start = time.perf_counter()
    pool_dir = Path(pool_dir)
    concepts = make_concepts(settings)
    rows = _plan_pool(settings, concepts)
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


def is_sample_pool(pool_dir: Path) -> bool:
    """True when ``pool_dir`` holds a pool written by this generator."""
    info = Path(pool_dir) / "pool_info.json"
    try:
        return json.loads(info.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def load_ground_truth(pool_dir: Path) -> pl.DataFrame:
    """The planted truth of a sample pool: one row per parquet row of every shard."""
    path = Path(pool_dir) / "ground_truth.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {pool_dir} is not a generated sample pool "
            "(write one with `dbprune sample-pool`); user pools have no ground truth"
        )
    return pl.read_parquet(path)


def make_concepts(settings: PoolSettings) -> list[Concept]:
    """The concept table: distinct (shape, color) pairs, variability and frequency.

    Pairs follow a Latin-square pattern so shapes and colors are used equally
    often (a concept differs from many others in both).  Variability is spread
    evenly over [0, 1]; Zipf frequencies are assigned by a permutation chosen
    among seeded candidates to have the least rank correlation with
    variability, so the two are not confounded.
    """
    n = settings.concepts
    rng = np.random.default_rng([settings.seed, 1])
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    pairs = [(shapes[i % 8], colors[(i + i // 8) % 8]) for i in range(n)]
    pairs = [pairs[i] for i in rng.permutation(n)]
    variability = np.linspace(0.0, 1.0, n)[rng.permutation(n)]
    weights = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    weights = weights / weights.sum()
    var_rank = np.argsort(np.argsort(variability))
    best, best_corr = None, math.inf
    for _ in range(64):
        perm = rng.permutation(n)  # concept i gets frequency rank perm[i]
        corr = abs(float(np.corrcoef(var_rank, perm)[0, 1]))
        if corr < best_corr:
            best, best_corr = perm, corr
    assert best is not None
    return [
        Concept(id=i, shape=s, color=c, variability=round(float(variability[i]), 6), frequency=float(weights[best[i]]))
        for i, (s, c) in enumerate(pairs)
    ]


# ---------------------------------------------------------------------------
# planning the pool rows
# ---------------------------------------------------------------------------


def _shard_names(n: int) -> list[str]:
    width = max(5, len(str(n - 1)))
    return [f"{i:0{width}d}" for i in range(n)]


def _key(shard_idx: int, index: int, shard_width: int, index_width: int) -> str:
    """img2dataset's key: zero-padded shard id followed by the zero-padded index."""
    return f"{shard_idx:0{shard_width}d}{index:0{index_width}d}"


def _planted_count(total: int, rate: float) -> int:
    """Rows for a planted rate: at least one, so small pools still exercise it."""
    return max(1, round(total * rate))


def _concept_counts(concepts: Sequence[Concept], total: int) -> np.ndarray:
    """Integer rows per concept following the Zipf weights, with a small floor.

    The floor (up to 15 rows) keeps every concept clusterable; the rest is
    split by largest remainder so the counts sum to ``total`` exactly.
    """
    n = len(concepts)
    floor = min(15, max(2, total // (4 * n)))
    if floor * n > total:
        floor = total // n
    w = np.array([c.frequency for c in concepts])
    spare = total - floor * n
    raw = w * spare
    counts = np.floor(raw).astype(int)
    order = sorted(range(n), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: spare - int(counts.sum())]:
        counts[i] += 1
    return counts + floor


def _plan_pool(settings: PoolSettings, concepts: Sequence[Concept]) -> list[_Row]:
    """Decide every pool row: concept, rendering, duplicate group, defects, caption."""
    rng = np.random.default_rng([settings.seed, 2])
    total = settings.shards * settings.samples_per_shard
    size = settings.image_size
    n_copies = min(round(total * DUPLICATE_RATE), total // 3)
    group_copies: list[int] = []
    while sum(group_copies) < n_copies:
        group_copies.append(min(int(rng.integers(1, 4)), n_copies - sum(group_copies)))
    n_base = total - n_copies

    concept_ids = np.repeat(np.arange(len(concepts)), _concept_counts(concepts, n_base))
    concept_ids = concept_ids[rng.permutation(n_base)]
    rows = [_Row(concept=int(c), params=sample_params(concepts[int(c)], rng, size)) for c in concept_ids]

    originals = rng.choice(n_base, size=len(group_copies), replace=False)
    for group, (orig, k) in enumerate(zip(originals.tolist(), group_copies)):
        rows[orig].dup_group, rows[orig].dup_kind = group, "original"
        for _ in range(k):
            rows.append(_make_copy(rows[orig], group, rng))

    rows = [rows[i] for i in rng.permutation(len(rows))]
    _plant_defects(rows, rng)
    _plant_captions(rows, concepts, size, rng)
    return rows


def _make_copy(original: _Row, group: int, rng: np.random.Generator) -> _Row:
    """A duplicate of ``original``: exact bytes, or a near variant of its rendering."""
    if rng.random() < EXACT_SHARE:
        kind, variant = "exact", "exact"
    else:
        kind, variant = "near", NEAR_VARIANTS[int(rng.integers(len(NEAR_VARIANTS)))]
    params = original.params
    if variant == "shift":
        dx, dy = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
        m = params.main
        params = _replace_params(params, main=Blob(m.shape, m.cx + dx, m.cy + dy, m.radius, m.rotation, m.rgb))
    elif variant == "noise":
        params = _replace_params(params, noise_seed=int(rng.integers(2**31)))
    elif variant == "requality":
        q = params.quality
        params = _replace_params(params, quality=q - 20 if q >= 80 else q + 12)
    return _Row(concept=original.concept, params=params, dup_group=group, dup_kind=kind, variant=variant, source=original)


def _replace_params(p: RenderParams, **changes: Any) -> RenderParams:
    return dataclasses.replace(p, **changes)


def _plant_defects(rows: list[_Row], rng: np.random.Generator) -> None:
    """Mark failed downloads, undecodable images and empty captions on rows
    outside duplicate groups (a duplicate must be a usable sample)."""
    total = len(rows)
    free = [i for i, r in enumerate(rows) if r.dup_group < 0]
    plan = [
        ("failed_download", _planted_count(total, FAILED_RATE)),
        ("undecodable", _planted_count(total, UNDECODABLE_RATE)),
        ("empty_caption", _planted_count(total, EMPTY_CAPTION_RATE)),
    ]
    chosen = rng.choice(len(free), size=min(len(free), sum(n for _, n in plan)), replace=False).tolist()
    for status, n in plan:
        for j in chosen[:n]:
            rows[free[j]].planted = status
        chosen = chosen[n:]


def _plant_captions(rows: list[_Row], concepts: Sequence[Concept], size: int, rng: np.random.Generator) -> None:
    """Write every row's caption; a share of clean, non-duplicate rows get a
    caption of a concept that differs in shape and color (a mismatch)."""
    total = len(rows)
    eligible = [i for i, r in enumerate(rows) if r.planted == "ok" and r.dup_group < 0]
    n_mis = min(len(eligible), _planted_count(total, MISMATCH_RATE))
    mismatched = set(np.asarray(eligible)[rng.choice(len(eligible), size=n_mis, replace=False)].tolist())
    for i, row in enumerate(rows):
        if row.planted == "empty_caption":
            row.caption_concept, row.caption = -1, ""
            continue
        cap = row.concept
        if i in mismatched:
            cap = _other_concept(concepts, row.concept, rng)
            row.mismatched = True
        row.caption_concept = cap
        row.caption = make_caption(concepts[cap].name, row.params, size, rng)


def _other_concept(concepts: Sequence[Concept], cid: int, rng: np.random.Generator) -> int:
    me = concepts[cid]
    pool = [c.id for c in concepts if c.shape != me.shape and c.color != me.color]
    pool = pool or [c.id for c in concepts if c.id != cid]
    return int(pool[int(rng.integers(len(pool)))])


# ---------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _describe(params: RenderParams, size: int) -> dict[str, str]:
    """Words for the rendering's size, position and background (alt-text detail)."""
    m = params.main
    rel = m.radius / size
    size_word = "small" if rel < 0.25 else ("large" if rel > 0.36 else "medium")
    third = size / 3
    col = "left" if m.cx < third else ("right" if m.cx > 2 * third else "")
    row = "top" if m.cy < third else ("bottom" if m.cy > 2 * third else "")
    pos = f"in the {row} {col}".replace("  ", " ").strip() if (row or col) else "in the center"
    if pos == "in the":
        pos = "in the center"
    lum = float(np.dot(params.bg_rgb, (0.299, 0.587, 0.114)))
    tone = "dark" if lum < 110 else "light"
    bg = {"none": "plain", "gradient": "gradient", "noise": "blotchy", "stripes": "striped", "checker": "checkered"}
    return {"size": size_word, "pos": pos, "bg": f"{tone} {bg[params.texture]}"}


def make_caption(name: str, params: RenderParams, size: int, rng: np.random.Generator) -> str:
    """A web-style alt text for concept ``name`` drawn from the caption templates.

    Some templates describe size, position and background, as real alt texts
    do; that gives a contrastive encoder a reason to tell renderings apart.
    """
    words = _describe(params, size)
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(
        name=name,
        a_name=f"{_article(name)} {name}",
        a_size=f"{_article(words['size'])} {words['size']}",
        pos=words["pos"],
        bg=words["bg"],
    )


# ---------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------

_UNIT_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),
    "triangle": np.array([(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]),
    "diamond": np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]),
    "hexagon": np.array([(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(0, 360, 60))]),
    "star": np.array(
        [((1.0 if i % 2 == 0 else 0.45) * math.cos(a), (1.0 if i % 2 == 0 else 0.45) * math.sin(a))
         for i, a in enumerate(np.deg2rad(np.arange(-90, 270, 36)))]
    ),
    "cross": np.array(
        [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
         (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
    ),
}


def sample_params(concept: Concept, rng: np.random.Generator, size: int) -> RenderParams:
    """Draw one rendering of ``concept``; every jitter scales with its variability.

    At variability 0 renderings still differ by a few pixels of position, ~8%
    of size, ~8 degrees of rotation, a slight shade and background change and
    pixel noise (similar, never duplicates); at 1 they vary in position, size,
    rotation, shade, background color and texture and carry distractor shapes.
    """
    v = concept.variability
    s = float(size)
    radius = float(np.clip(0.30 * s * math.exp(rng.uniform(-1, 1) * (0.08 + 0.45 * v)), 0.14 * s, 0.46 * s))
    span = (0.06 + 0.22 * v) * s
    lo, hi = radius * 0.7, s - radius * 0.7
    cx = float(np.clip(s / 2 + rng.uniform(-1, 1) * span, lo, hi))
    cy = float(np.clip(s / 2 + rng.uniform(-1, 1) * span, lo, hi))
    rotation = float(rng.uniform(-1, 1) * (8 + 172 * v))
    rgb = _jitter_color(COLORS[concept.color], rng, v)
    bg = _background_color(rgb, rng, v)
    texture = "none"
    if rng.random() < 0.9 * v:
        texture = ("gradient", "noise", "stripes", "checker")[int(rng.integers(4))]
    n_distractors = min(6, int(rng.poisson(3.5 * v)))
    distractors = tuple(_distractor(rng, s) for _ in range(n_distractors))
    return RenderParams(
        main=Blob(concept.shape, cx, cy, radius, rotation, rgb),
        distractors=distractors,
        bg_rgb=bg,
        texture=texture,
        texture_amp=float(15 + 45 * v * rng.random()),
        texture_angle=float(rng.uniform(0, math.pi)),
        texture_freq=float(rng.uniform(2, 6)),
        texture_seed=int(rng.integers(2**31)),
        noise_sigma=float(1.5 + 8 * v),
        noise_seed=int(rng.integers(2**31)),
        quality=int(rng.integers(80, 96)),
    )


def _jitter_color(base: tuple[int, int, int], rng: np.random.Generator, v: float) -> tuple[float, float, float]:
    shade = np.asarray(base, dtype=float) + rng.uniform(-1, 1, 3) * (10 + 45 * v)
    shade *= math.exp(rng.uniform(-1, 1) * (0.05 + 0.25 * v))
    return tuple(float(x) for x in np.clip(shade, 0, 255))  # type: ignore[return-value]


def _background_color(rgb: tuple[float, float, float], rng: np.random.Generator, v: float) -> tuple[float, float, float]:
    """Gray at low variability, drifting to random colors at high variability,
    always with enough contrast that the shape stays visible."""
    fg = np.asarray(rgb)
    bg = np.full(3, _BASE_GRAY)
    for _ in range(16):
        bg = (1 - v) * _BASE_GRAY + v * rng.uniform(0, 255, 3) + rng.uniform(-1, 1, 3) * (8 + 20 * v)
        bg = np.clip(bg, 0, 255)
        if np.linalg.norm(bg - fg) > 110:
            break
    else:
        bg = np.full(3, _BASE_GRAY)
    return tuple(float(x) for x in bg)  # type: ignore[return-value]


def _distractor(rng: np.random.Generator, s: float) -> Blob:
    color = list(COLORS.values())[int(rng.integers(len(COLORS)))]
    return Blob(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        cx=float(rng.uniform(0, s)),
        cy=float(rng.uniform(0, s)),
        radius=float(rng.uniform(0.05, 0.1) * s),
        rotation=float(rng.uniform(0, 360)),
        rgb=tuple(float(x) for x in color),  # type: ignore[arg-type]
    )


def _shape_mask(blob: Blob, size: int) -> np.ndarray:
    """Anti-aliased coverage mask (float32, 0..1) of one shape, drawn supersampled."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = blob.cx * ss, blob.cy * ss, blob.radius * ss
    if blob.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if blob.shape == "ring":
            ri = r * _RING_INNER
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        a = math.radians(blob.rotation)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = _UNIT_POLYGONS[blob.shape] @ rot.T * r + (cx, cy)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) * (1.0 / 255.0)


def _background(p: RenderParams, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = p.bg_rgb
    if p.texture == "none":
        return img
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    u = xx * math.cos(p.texture_angle) + yy * math.sin(p.texture_angle)
    if p.texture == "gradient":
        t = (u - 0.5) * 2.0
    elif p.texture == "stripes":
        t = np.sin(2 * math.pi * p.texture_freq * u)
    elif p.texture == "checker":
        f = p.texture_freq
        t = ((np.floor(xx * f) + np.floor(yy * f)) % 2) * 2.0 - 1.0
    else:  # smooth blotchy noise
        small = np.random.default_rng(p.texture_seed).integers(0, 256, (4, 4), dtype=np.uint8)
        t = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    img += (t * p.texture_amp)[..., None]
    return img


def render(p: RenderParams, size: int) -> np.ndarray:
    """Render ``p`` as an RGB uint8 array of shape (size, size, 3)."""
    img = _background(p, size)
    for blob in (*p.distractors, p.main):
        m = _shape_mask(blob, size)[..., None]
        img = img * (1.0 - m) + np.asarray(blob.rgb, dtype=np.float32) * m
    noise = np.random.default_rng(p.noise_seed).standard_normal((size, size, 3), dtype=np.float32)
    img += noise * p.noise_sigma
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG with fixed encoder settings (deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=int(quality), optimize=False, subsampling=2)
    return buf.getvalue()


