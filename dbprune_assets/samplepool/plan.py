"""Planning the pool's rows: concept, rendering, duplicate groups, planted
defects and captions (nothing is rendered or written here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dbprune_assets.core.settings import PoolSettings

from dbprune_assets.samplepool.captions import make_caption
from dbprune_assets.samplepool.concepts import Concept, concept_counts, rng_stream
from dbprune_assets.samplepool.render import RenderParams, sample_params

# planted rates (shares of all pool rows)
FAILED_RATE = 0.02
UNDECODABLE_RATE = 0.005
EMPTY_CAPTION_RATE = 0.005
DUPLICATE_RATE = 0.10  # copies (not originals) of duplicate groups
MISMATCH_RATE = 0.08
EXACT_SHARE = 0.5  # of copies; the rest are near duplicates
NEAR_VARIANTS: tuple[str, ...] = ("requality", "noise", "rescale")


@dataclass
class Row:
    """One planted parquet row of the pool (before it is written)."""

    concept: int
    params: RenderParams
    dup_group: int = -1
    dup_kind: str | None = None
    variant: str | None = None  # exact | requality | noise | rescale (copies only)
    source: "Row | None" = None  # the group's original (copies only)
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


def planted_count(total: int, rate: float) -> int:
    """Rows for a planted rate: at least one, so small pools still exercise it."""
    return max(1, round(total * rate))


def plan_pool(settings: PoolSettings, concepts: Sequence[Concept]) -> list[Row]:
    """Decide every pool row: concept, rendering, duplicate group, defects, caption."""
    rng = rng_stream(settings.seed, 2)
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
    rows = [Row(concept=int(c), params=sample_params(concepts[int(c)], rng, size)) for c in concept_ids]

    originals = rng.choice(n_base, size=len(group_copies), replace=False)
    for group, (orig, k) in enumerate(zip(originals.tolist(), group_copies)):
        rows[orig].dup_group, rows[orig].dup_kind = group, "original"
        for _ in range(k):
            rows.append(_make_copy(rows[orig], group, rng))

    rows = [rows[i] for i in rng.permutation(len(rows))]
    _plant_defects(rows, rng)
    _plant_captions(rows, concepts, size, rng)
    return rows


def _make_copy(original: Row, group: int, rng: np.random.Generator) -> Row:
    """A duplicate of ``original``: exact bytes, or a near variant of its rendering."""
    kind, variant = draw_copy_kind(rng)
    params = original.params
    if variant == "noise":  # the seed of the extra noise, added to the original's pixels
        params = _replace_params(params, noise_seed=int(rng.integers(2**31)))
    elif variant == "requality":
        params = _replace_params(params, quality=params.quality - 10)
    return Row(concept=original.concept, params=params, dup_group=group, dup_kind=kind, variant=variant, source=original)


def draw_copy_kind(rng: np.random.Generator) -> tuple[str, str]:
    """(kind, variant) of a planted copy: ("exact", "exact") for a share
    :data:`EXACT_SHARE`, else ("near", one of :data:`NEAR_VARIANTS`)."""
    if rng.random() < EXACT_SHARE:
        return "exact", "exact"
    return "near", NEAR_VARIANTS[int(rng.integers(len(NEAR_VARIANTS)))]


def _replace_params(p: RenderParams, **changes: Any) -> RenderParams:
    return dataclasses.replace(p, **changes)


def _plant_defects(rows: list[Row], rng: np.random.Generator) -> None:
    """Mark failed downloads, undecodable images and empty captions on rows
    outside duplicate groups (a duplicate must be a usable sample)."""
    total = len(rows)
    free = [i for i, r in enumerate(rows) if r.dup_group < 0]
    plan = [
        ("failed_download", planted_count(total, FAILED_RATE)),
        ("undecodable", planted_count(total, UNDECODABLE_RATE)),
        ("empty_caption", planted_count(total, EMPTY_CAPTION_RATE)),
    ]
    chosen = rng.choice(len(free), size=min(len(free), sum(n for _, n in plan)), replace=False).tolist()
    for status, n in plan:
        for j in chosen[:n]:
            rows[free[j]].planted = status
        chosen = chosen[n:]


def _plant_captions(rows: list[Row], concepts: Sequence[Concept], size: int, rng: np.random.Generator) -> None:
    """Write every row's caption; a share of clean, non-duplicate rows get a
    caption of a concept that differs in shape and color (a mismatch)."""
    total = len(rows)
    eligible = [i for i, r in enumerate(rows) if r.planted == "ok" and r.dup_group < 0]
    n_mis = min(len(eligible), planted_count(total, MISMATCH_RATE))
    mismatched = set(np.asarray(eligible)[rng.choice(len(eligible), size=n_mis, replace=False)].tolist())
    for i, row in enumerate(rows):
        if row.planted == "empty_caption":
            row.caption_concept, row.caption = -1, ""
            continue
        cap = row.concept
        if i in mismatched:
            cap = other_concept(concepts, row.concept, rng)
            row.mismatched = True
        row.caption_concept = cap
        row.caption = make_caption(concepts[cap].name, row.params, size, rng)


def other_concept(concepts: Sequence[Concept], cid: int, rng: np.random.Generator) -> int:
    """A concept for a mismatched caption of concept ``cid``: one that differs in
    shape and colour (any other concept where there is none)."""
    me = concepts[cid]
    pool = [c.id for c in concepts if c.shape != me.shape and c.color != me.color]
    pool = pool or [c.id for c in concepts if c.id != cid]
    return int(pool[int(rng.integers(len(pool)))])
