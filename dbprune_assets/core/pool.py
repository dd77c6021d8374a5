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
  re-scaled) duplicates of another row, in groups of 2-4 (SemDeDup);
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
import functools
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
ZIPF_EXPONENT = 0.8
NEAR_VARIANTS: tuple[str, ...] = ("requality", "noise", "rescale")
NEAR_NOISE_SIGMA = 2.0  # extra pixel noise of a "noise" near duplicate

EVAL_SHARD_SIZE = 1000
REFERENCE_SHARD_SIZE = 1000

# fixed tar header fields: the tars must not depend on the clock or the user
_TAR_MTIME = 946684800  # 2000-01-01
_TAR_MODE = 0o444
_SUPERSAMPLE = 2
_RING_INNER = 0.55
_BASE_GRAY = 64.0
_NOISE_BANK_SEED = 20240117

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
    variant: str | None = None  # exact | requality | noise | rescale (copies only)
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

    def __str__(self) -> str:
        statuses = ", ".join(f"{k} {v}" for k, v in self.status_counts.items())
        return (
            f"{self.samples} rows in {len(self.shards)} shards ({statuses}); {self.duplicates} planted duplicates, "
            f"{self.mismatched} mismatched captions; eval {self.eval_samples}, reference {self.reference_samples} "
            f"samples; {self.seconds:.1f} s -> {self.pool_dir}"
        )


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
    evenly over [0, 1]; Zipf frequencies are dealt round-robin over three
    interleaved variability strata, so the two are not confounded.
    """
    n = settings.concepts
    rng = _stream(settings.seed, 1)
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    pairs = [(shapes[i % 8], colors[(i + i // 8) % 8]) for i in range(n)]
    pairs = [pairs[i] for i in rng.permutation(n)]
    variability = np.linspace(0.0, 1.0, n)[rng.permutation(n)]
    weights = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    weights = weights / weights.sum()
    # frequency ranks dealt round-robin over three interleaved variability strata
    # (variability ranks 0, 3, 6, ...; 1, 4, 7, ...; 2, 5, 8, ...), each shuffled:
    # a random assignment in which every three consecutive frequency ranks take
    # one concept of each stratum, so frequency and variability are not confounded
    order = np.argsort(variability)  # concept ids by variability
    var_rank = np.argsort(order)
    best, best_corr = None, math.inf
    for _ in range(64):  # of 64 seeded deals, the one least rank-correlated with variability
        strata = [list(order[i::3]) for i in range(3)] if n >= 3 else [list(order)]
        for st in strata:
            rng.shuffle(st)
        dealt: list[int] = []
        while any(strata):
            for st in strata:
                if st:
                    dealt.append(int(st.pop()))
        ranks = np.empty(n, dtype=int)
        ranks[np.asarray(dealt)] = np.arange(n)  # concept i gets frequency rank ranks[i]
        corr = abs(float(np.corrcoef(var_rank, ranks)[0, 1]))
        if corr < best_corr:
            best, best_corr = ranks, corr
    assert best is not None
    return [
        Concept(id=i, shape=s, color=c, variability=round(float(variability[i]), 6), frequency=float(weights[best[i]]))
        for i, (s, c) in enumerate(pairs)
    ]


# ---------------------------------------------------------------------------
# planning the pool rows
# ---------------------------------------------------------------------------


def _stream(seed: int, stream: int) -> np.random.Generator:
    """An independent random stream per part of the pool (concepts, rows,
    layout, images, eval, reference), so changing one part's size leaves the
    others unchanged.  Any integer seed works, negative ones included."""
    return np.random.default_rng([seed % 2**64, stream])


def _shard_names(n: int) -> list[str]:
    width = max(5, len(str(n - 1)))
    return [f"{i:0{width}d}" for i in range(n)]


def _key(shard_idx: int, index: int, shard_width: int, index_width: int) -> str:
    """img2dataset's key: zero-padded shard id followed by the zero-padded index."""
    return f"{shard_idx:0{shard_width}d}{index:0{index_width}d}"


def _planted_count(total: int, rate: float) -> int:
    """Rows for a planted rate: at least one, so small pools still exercise it."""
    return max(1, round(total * rate))


def concept_counts(concepts: Sequence[Concept], total: int) -> np.ndarray:
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
    rng = _stream(settings.seed, 2)
    total = settings.shards * settings.samples_per_shard
    size = settings.image_size
    n_copies = min(round(total * DUPLICATE_RATE), total // 3)
    group_copies: list[int] = []
    left = n_copies
    while left > 0:
        group_copies.append(min(int(rng.integers(1, 4)), left))
        left -= group_copies[-1]
    n_base = total - n_copies

    concept_ids = np.repeat(np.arange(len(concepts)), concept_counts(concepts, n_base))
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
    if variant == "noise":  # the seed of the extra noise, added to the original's pixels
        params = _replace_params(params, noise_seed=int(rng.integers(2**31)))
    elif variant == "requality":
        params = _replace_params(params, quality=params.quality - 10)
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
    if row and col:
        pos = f"in the {row} {col}"
    elif row or col:
        pos = f"at the {row}" if row else f"on the {col}"
    else:
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


def _regular(n: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> tuple[tuple[float, float], ...]:
    step = 360.0 / n
    return tuple(
        (radii[i % len(radii)] * math.cos(math.radians(start_deg + i * step)),
         radii[i % len(radii)] * math.sin(math.radians(start_deg + i * step)))
        for i in range(n)
    )


#: unit-radius outlines of the polygon shapes (circle and ring are ellipses)
_UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": _regular(3, -90),
    "diamond": ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)),
    "hexagon": _regular(6, 0),
    "star": _regular(10, -90, (1.0, 0.45)),
    "cross": (
        (-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
        (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3),
    ),
}


def _clamp(x: float, lo: float, hi: float) -> float:
    return float(min(max(x, lo), hi))


#: how much the scene around every concept's shape varies (same for all concepts)
SCENE_VARIABILITY = 0.2


def sample_params(concept: Concept, rng: np.random.Generator, size: int) -> RenderParams:
    """Draw one rendering of ``concept``; every jitter scales with its variability.

    At variability 0 renderings still differ by a few pixels of position, ~12%
    of size, ~12 degrees of rotation, a slight shade and background change and
    pixel noise (similar, never duplicates); at 1 they vary in position, size,
    rotation, shade, background color and texture and carry distractor shapes.
    """
    v = concept.variability
    g = math.sqrt(v)  # geometric spread grows fast at first, so every step of v shows
    s = float(size)
    radius = _clamp(0.30 * s * math.exp(rng.uniform(-1, 1) * (0.08 + 0.55 * g)), 0.13 * s, 0.46 * s)
    span = (0.05 + 0.30 * g) * s
    lo, hi = radius * 0.7, s - radius * 0.7
    cx = _clamp(s / 2 + rng.uniform(-1, 1) * span, lo, hi)
    cy = _clamp(s / 2 + rng.uniform(-1, 1) * span, lo, hi)
    # rotation and shade vary only a little, whatever the variability: turned far
    # enough a square is a diamond, and shaded far enough orange is red; a varied
    # concept should be spread out, not confused with its neighbours
    rotation = float(rng.uniform(-1, 1) * (10 + 30 * v))
    rgb = _jitter_color(COLORS[concept.color], rng, 0.15)
    # the scene around the shape (background, texture, clutter) is drawn from one
    # distribution for every concept: variability lives in the concept itself
    # (its geometry and shade), so a varied concept is spread out in embedding
    # space without drifting towards every other varied concept
    bg = _background_color(rgb, rng, SCENE_VARIABILITY)
    texture = "none"
    if rng.random() < 0.9 * SCENE_VARIABILITY:
        texture = ("gradient", "noise", "stripes", "checker")[int(rng.integers(4))]
    n_distractors = min(6, int(rng.poisson(3.5 * SCENE_VARIABILITY)))
    distractors = tuple(_distractor(rng, s) for _ in range(n_distractors))
    return RenderParams(
        main=Blob(concept.shape, cx, cy, radius, rotation, rgb),
        distractors=distractors,
        bg_rgb=bg,
        texture=texture,
        texture_amp=float(15 + 45 * SCENE_VARIABILITY * rng.random()),
        texture_angle=float(rng.uniform(0, math.pi)),
        texture_freq=float(rng.uniform(2, 6)),
        texture_seed=int(rng.integers(2**31)),
        noise_sigma=float(1.5 + 8 * SCENE_VARIABILITY),
        noise_seed=int(rng.integers(2**31)),
        quality=int(rng.integers(80, 96)),
    )


def _jitter_color(base: tuple[int, int, int], rng: np.random.Generator, v: float) -> tuple[float, float, float]:
    shade = np.asarray(base, dtype=float) + rng.uniform(-1, 1, 3) * (12 + 43 * v)
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


def _shape_mask(blob: Blob, size: int) -> Image.Image:
    """Anti-aliased coverage mask (mode "L") of one shape, drawn supersampled."""
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
        ca, sa = math.cos(math.radians(blob.rotation)), math.sin(math.radians(blob.rotation))
        draw.polygon([(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _UNIT_POLYGONS[blob.shape]], fill=255)
    return canvas.reduce(ss)


def _rgb_int(rgb: Sequence[float]) -> tuple[int, int, int]:
    return (int(round(rgb[0])), int(round(rgb[1])), int(round(rgb[2])))


def _background(p: RenderParams, size: int) -> Image.Image:
    """The canvas before shapes: a flat color, or a flat color plus a texture."""
    if p.texture == "none":
        return Image.new("RGB", (size, size), _rgb_int(p.bg_rgb))
    yy, xx = _grid(size)
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
    img = np.asarray(p.bg_rgb, dtype=np.float32) + (t * p.texture_amp)[..., None]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def render(p: RenderParams, size: int) -> np.ndarray:
    """Render ``p`` as an RGB uint8 array of shape (size, size, 3)."""
    img = _background(p, size)
    for blob in (*p.distractors, p.main):
        img.paste(_rgb_int(blob.rgb), None, _shape_mask(blob, size))
    out = np.asarray(img, dtype=np.float32) + _noise(p.noise_seed, size) * p.noise_sigma
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed run of standard normal values; an image's noise is a window of it."""
    return np.random.default_rng(_NOISE_BANK_SEED).standard_normal(size * size * 3 * 64, dtype=np.float32)


def _noise(seed: int, size: int) -> np.ndarray:
    """Pixel noise for ``seed``: a window of the bank at a seed-chosen offset
    (windows at different offsets are pixel-wise independent draws)."""
    bank = _noise_bank(size)
    n = size * size * 3
    start = seed % (bank.size - n)
    return bank[start : start + n].reshape(size, size, 3)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return yy, xx


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG with fixed encoder settings (deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=int(quality), optimize=False, subsampling=2)
    return buf.getvalue()


class _ImageMaker:
    """Renders rows to JPEG bytes; copies are derived from their original's
    rendering, which is cached until the pool is written."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._originals: dict[int, tuple[np.ndarray, bytes]] = {}

    def original(self, row: _Row) -> tuple[np.ndarray, bytes]:
        """Pixels and JPEG bytes of a duplicate group's original (cached)."""
        if id(row) not in self._originals:
            pixels = render(row.params, self.size)
            self._originals[id(row)] = (pixels, encode_jpeg(pixels, row.params.quality))
        return self._originals[id(row)]

    def __call__(self, row: _Row) -> bytes:
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
            noisy = pixels.astype(np.float32) + _noise(row.params.noise_seed, self.size) * NEAR_NOISE_SIGMA
            return encode_jpeg(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), row.params.quality)
        if row.variant == "rescale":  # re-uploaded at 3/4 of the size, shown at the original size
            small = self.size * 3 // 4
            img = Image.fromarray(pixels).resize((small, small), Image.BILINEAR).resize((self.size, self.size),
                                                                                          Image.BILINEAR)
            return encode_jpeg(np.asarray(img), row.params.quality)
        raise ValueError(f"unknown near-duplicate variant {row.variant!r}")


def _corrupt(data: bytes, variant: int, rng: np.random.Generator) -> bytes:
    """Undecodable bytes: a JPEG cut in half (even variant) or random garbage
    with a JPEG signature (odd), as broken downloads look."""
    if variant % 2 == 0:
        return data[: max(16, len(data) * 2 // 5)]
    return b"\xff\xd8\xff\xe0" + rng.bytes(max(64, len(data) // 2))


# ---------------------------------------------------------------------------
# laying out and writing the pool
# ---------------------------------------------------------------------------


def _assign_layout(rows: Sequence[_Row], settings: PoolSettings, shard_names: Sequence[str]) -> None:
    """Give every row its shard, img2dataset key, DataComp uid, url and the
    metadata a download would have produced."""
    rng = _stream(settings.seed, 5)
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
        slug = _SLUG_WORDS[int(rng.integers(len(_SLUG_WORDS)))]
        domain = _DOMAINS[int(rng.integers(len(_DOMAINS)))]
        row.url = f"https://{domain}/{int(rng.integers(10, 99))}/{slug}-{int(rng.integers(10**5, 10**6))}.jpg"
        side = int(rng.integers(180, 1200))
        row.original_size = (side, int(side * rng.uniform(0.6, 1.6)))
        if row.planted == "failed_download":
            row.error_message = _ERRORS[int(rng.integers(len(_ERRORS)))]


_SLUG_WORDS: tuple[str, ...] = ("shape", "icon", "clipart", "vector", "sticker", "badge", "logo", "symbol", "pattern")


def _render_images(rows: Sequence[_Row], size: int, seed: int) -> None:
    """Fill ``row.image`` for every row that was 'downloaded'."""
    rng = _stream(seed, 6)
    maker = _ImageMaker(size)
    n_undecodable = 0
    for row in rows:
        if row.planted == "failed_download":
            continue
        row.image = maker(row)
        if row.planted == "undecodable":
            row.image = _corrupt(row.image, n_undecodable, rng)
            n_undecodable += 1


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write webdataset samples (key, {ext: bytes}) to ``path`` with fixed
    header fields; members of a sample in sorted extension order, as
    webdataset's TarWriter does.  Returns the number of samples."""
    n = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext in sorted(members):
                tf.addfile(*_tar_member(f"{key}.{ext}", members[ext]))
            n += 1
    return n


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


def _write_parquet(path: Path, table: pa.Table) -> None:
    """Parquet with fixed writer settings (deterministic bytes)."""
    pq.write_table(table, path, compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True)


def _download_record(row: _Row, size: int) -> dict[str, Any]:
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


def _write_pool_shards(folder: Path, rows: Sequence[_Row], shard_names: Sequence[str], settings: PoolSettings) -> None:
    """Render the images and write ``NNNNN.tar`` + ``NNNNN.parquet`` per shard."""
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


_GROUND_TRUTH_SCHEMA = pa.schema(
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


def _write_ground_truth(path: Path, rows: Sequence[_Row], concepts: Sequence[Concept]) -> None:
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
    _write_parquet(path, pa.Table.from_pylist(records, schema=_GROUND_TRUTH_SCHEMA))


# ---------------------------------------------------------------------------
# eval and reference splits
# ---------------------------------------------------------------------------


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
    for c in concept_ids:
        params = sample_params(concepts[c], rng, size)
        caption = make_caption(concepts[c].name, params, size, rng)
        out.append((c, encode_jpeg(render(params, size), params.quality), caption))
    return out


def _write_eval_split(folder: Path, settings: PoolSettings, concepts: Sequence[Concept]) -> int:
    """``eval/``: classnames, templates and labelled, captioned shards."""
    rng = _stream(settings.seed, 3)
    ids = np.repeat(np.arange(len(concepts)), settings.eval_per_class)
    ids = ids[rng.permutation(len(ids))].tolist()
    samples = [
        {"jpg": jpg, "cls": str(c).encode(), "txt": cap.encode()}
        for c, jpg, cap in _clean_samples(ids, concepts, settings.image_size, rng)
    ]
    _write_split(folder, samples, EVAL_SHARD_SIZE)
    (folder / "classnames.txt").write_text("".join(f"{c.name}\n" for c in concepts))
    (folder / "templates.txt").write_text("".join(f"{t}\n" for t in EVAL_TEMPLATES))
    return len(samples)


def _write_reference_split(folder: Path, settings: PoolSettings, concepts: Sequence[Concept]) -> int:
    """``reference/``: clean, balanced captioned shards for the bootstrap encoder."""
    rng = _stream(settings.seed, 4)
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
    rows: Sequence[_Row],
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
        "eval": {"samples": eval_n, "classes": len(concepts), "per_class": settings.eval_per_class},
        "reference": {"samples": ref_n},
    }
