"""The generated DataComp-format pool: the sample pool's story as DataComp
metadata shards, with CLIP embeddings synthesised directly (no images, no
encoder), so tests and the demo need no download and no training.

Layout, as DataComp's ``download_upstream.py`` leaves its metadata folder
(flat, one ``<stem>.parquet`` + ``<stem>.npz`` per shard, the stem 32 hex digits):

* parquet columns ``uid`` (32 lowercase hex), ``url``, ``text``,
  ``original_width`` / ``original_height`` (int64), ``clip_b32_similarity_score``
  / ``clip_l14_similarity_score`` (float32), ``face_bboxes`` (a list of
  ``[x0, y0, x1, y1]`` boxes, relative coordinates, float64) and ``sha256``;
* npz keys ``b32_img``, ``b32_txt`` (512-d), ``l14_img``, ``l14_txt`` (768-d),
  rows aligned with the parquet, L2-normalised, float16, stored uncompressed
  (``np.savez``'s format, written with fixed zip timestamps so the bytes are
  a pure function of the settings);
* beside them ``ground_truth.parquet`` (the image pool's schema, read by
  :func:`~.writer.load_ground_truth`; ``key`` is null: DataComp rows have
  none) and ``pool_info.json`` (``generator`` :data:`DATACOMP_GENERATOR`,
  recognised by :func:`is_datacomp_pool`);
* ``targets/image_embeddings.npz``: ``eval_per_class`` image embeddings of
  each concept (the evaluation classes), the target set of the
  ``datacomp_image`` strategy (the role ImageNet-1k plays in DataComp).

The story is the image pool's (:mod:`.concepts`, :mod:`.plan`): the same
concepts with the same planted ``variability`` and Zipf ``frequency`` (base
rows per concept are exactly :func:`~.concepts.concept_counts`), the same
duplicate and mismatch rates, exact and near duplicates in groups of 2-4
(near variants keep the image pool's names), and mismatched captions taken
from a concept that differs in shape and colour.  No failed downloads or
empty captions: a DataComp metadata shard lists samples, not download attempts.

Embeddings (:mod:`.geometry`), per model: a modality gap, one direction per
shape, colour and concept, and image vectors spread around their concept's
direction by its variability; a near duplicate is its original nudged
within SemDeDup's ``eps / 2``.  ``clip_*_similarity_score`` is the float32
cosine of the stored float16 pair, computed as the pipeline computes it
(:func:`dbprune_assets.core.pool.sources.clip_scores`), so the column and a
recomputation agree exactly.

Memory is bounded by one shard: shards are planned one after another from
per-shard random streams; what crosses a shard boundary is the
concept-count vector and the copies a shard's originals send to the next
shard (cross-shard duplicates, at most a sixth of a shard); the ground truth
is written shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dbprune_assets.core.store.atomic import atomic_path
from dbprune_assets.core.pool.poolkind import DATACOMP_GENERATOR, is_datacomp_pool  # noqa: F401  (re-exported)
from dbprune_assets.core.settings import PoolSettings
from dbprune_assets.core.pool.sources import DATACOMP_MODELS, clip_scores

from dbprune_assets.samplepool.captions import drawn_caption
from dbprune_assets.samplepool.concepts import Concept, concept_counts, make_concepts, rng_stream
from dbprune_assets.samplepool.geometry import (  # noqa: F401  (expected_within_cosine re-exported)
    ATTRIBUTE_SHARE, GAP_COSINE, MODALITY_GAP, NEAR_EPS, SPREAD_RANGE, TEXT_NOISE, Directions,
    expected_within_cosine, near_copy, spread,
)
from dbprune_assets.samplepool.plan import DUPLICATE_RATE, MISMATCH_RATE, draw_copy_kind, other_concept, planted_count
from dbprune_assets.samplepool.webmeta import random_faces, random_original_size, random_url
from dbprune_assets.samplepool.writer import GROUND_TRUTH_SCHEMA, PARQUET_OPTIONS


#: bump when the same settings would produce different files
DATACOMP_GENERATOR_VERSION = 1

#: the DataComp models whose embeddings the generator can write, in npz key order
MODELS: tuple[str, ...] = tuple(DATACOMP_MODELS)  # ("b32", "l14")

#: the parquet schema of a DataComp metadata shard
DATACOMP_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("clip_b32_similarity_score", pa.float32()),
        ("clip_l14_similarity_score", pa.float32()),
        ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
        ("sha256", pa.string()),
    ]
)

# random streams (the image pool uses 1-7)
_PLAN_STREAM, _EMBED_STREAM, _DIRECTION_STREAM, _LAYOUT_STREAM, _TARGET_STREAM = 20, 21, 22, 23, 24
#: the target images datacomp_image reads (``core/strategies/targets.py``): ``eval_per_class``
#: images of every concept (the evaluation classes), per model ``<model>_img``
TARGETS_FILE = Path("targets") / "image_embeddings.npz"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class DataCompPoolSummary:
    """What :func:`write_datacomp_pool` wrote."""

    pool_dir: Path
    shards: tuple[str, ...]  # stems, in the order they were generated
    samples: int
    models: tuple[str, ...]
    duplicates: int  # copies (exact + near), originals excluded
    exact: int
    near: int
    groups: int
    mismatched: int
    seconds: float = field(default=0.0, compare=False)

    def __str__(self) -> str:
        return (
            f"{self.samples} rows in {len(self.shards)} DataComp shards (parquet + npz: {', '.join(self.models)}); "
            f"{self.duplicates} planted duplicates ({self.exact} exact, {self.near} near) in {self.groups} groups, "
            f"{self.mismatched} mismatched captions; {self.seconds:.1f} s -> {self.pool_dir}"
        )


def write_datacomp_pool(out: Path, settings: PoolSettings, models: Sequence[str] = MODELS,
                        tmp_root: Path | None = None) -> DataCompPoolSummary:
    """Write the DataComp-format pool for ``settings`` at ``out``, atomically.

    Uses ``shards``, ``samples_per_shard``, ``concepts`` and ``seed`` of the
    settings (the image settings do not apply).  ``models`` chooses which
    embedding pairs the npz files hold; both similarity columns are always
    filled, as in DataComp.  The folder is built under ``tmp_root`` (default:
    ``.tmp`` next to ``out``) and renamed into place; an existing folder is
    replaced.  The same settings and models give byte-identical files.
    """
    start = time.perf_counter()
    models = _check_models(models)
    out = Path(out)
    concepts = make_concepts(settings)
    gen = _Generator(settings, concepts)
    with atomic_path(out, tmp_root if tmp_root is not None else out.parent / ".tmp") as tmp:
        tmp.mkdir(parents=True)
        gt_writer = pq.ParquetWriter(tmp / "ground_truth.parquet", GROUND_TRUTH_SCHEMA, **PARQUET_OPTIONS)
        try:
            for shard in gen.shards():
                pq.write_table(shard.table, tmp / f"{shard.stem}.parquet", **PARQUET_OPTIONS)
                _write_npz(tmp / f"{shard.stem}.npz", {f"{m}_{part}": shard.emb[m][part] for m in models
                                                        for part in ("img", "txt")})
                gt_writer.write_table(shard.truth)
        finally:
            gt_writer.close()
        (tmp / TARGETS_FILE).parent.mkdir()
        _write_npz(tmp / TARGETS_FILE, gen.targets(models))
        (tmp / "pool_info.json").write_text(json.dumps(gen.pool_info(models), indent=2, sort_keys=True) + "\n")
    return DataCompPoolSummary(
        pool_dir=out,
        shards=tuple(gen.stems),
        samples=gen.rows,
        models=models,
        duplicates=gen.exact + gen.near,
        exact=gen.exact,
        near=gen.near,
        groups=gen.groups,
        mismatched=gen.mismatched,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------


def _check_models(models: Iterable[str]) -> tuple[str, ...]:
    if isinstance(models, str):
        models = (models,)
    chosen = tuple(models)
    bad = [m for m in chosen if m not in DATACOMP_MODELS]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"models={chosen!r}: choose one or more of {list(MODELS)}, each once "
                         f"({'unknown ' + repr(bad) if bad else 'empty or repeated'})")
    return tuple(m for m in MODELS if m in chosen)  # npz key order as DataComp's


def _hex(seed: int, what: str, index: int) -> str:
    """32 lowercase hex digits, a pure function of (seed, what, index)."""
    return hashlib.blake2b(f"{seed}/{what}/{index}".encode(), digest_size=16, person=b"dbprune-datacomp").hexdigest()


def _image_sha(seed: int, uid: str) -> str:
    """The sha256 of the (never written) image of row ``uid``."""
    return hashlib.sha256(f"image/{seed}/{uid}".encode()).hexdigest()


def _split(total: int, parts: int) -> list[int]:
    """``total`` dealt over ``parts`` as evenly as possible, the first parts one more."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


#: a planned copy: (base row of its original, group, kind, variant)
_CopyPlan = tuple[int, int, str, str]


@dataclass
class _Copy:
    """A planted copy on its way into a shard (its original may be in the shard before)."""

    concept: int
    group: int
    kind: str  # exact | near
    variant: str  # exact | requality | noise | rescale
    img: dict[str, np.ndarray]  # model -> float32 image vector
    size: tuple[int, int]
    sha256: str
    faces: list[list[float]]


@dataclass
class _BaseRows:
    """A shard's base rows (every row that is not a copy), in planning order;
    the image metadata and vectors are filled once the rows have uids."""

    concept: np.ndarray  # concept id
    group: np.ndarray  # duplicate group of an original, -1 elsewhere
    caption: np.ndarray  # the caption's concept (another concept where mismatched)
    mismatched: np.ndarray  # indices of the rows with a mismatched caption
    sizes: list[tuple[int, int]] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    faces: list[list[list[float]]] = field(default_factory=list)
    img: dict[str, np.ndarray] = field(default_factory=dict)  # model -> float32 image vectors


@dataclass
class _ShardRows:
    """A shard's rows.  Rows are "assembled" as base rows, this shard's own
    copies, then the copies sent by the shard before; ``order[position]`` is
    the assembled index of the row at a shard position.  The lists are in
    assembled order, the arrays in shard order."""

    order: np.ndarray
    concept: np.ndarray
    caption: np.ndarray
    group: np.ndarray
    mismatched: np.ndarray  # bool
    img: dict[str, np.ndarray]  # model -> float16 image vectors
    kinds: list[str | None]  # original | exact | near | None
    variants: list[str | None]
    sizes: list[tuple[int, int]]
    sha256: list[str]  # "" for a row whose image is its own (hashed from its uid)
    faces: list[list[list[float]]]

    @classmethod
    def assemble(cls, base: _BaseRows, copies: Sequence[_Copy], order: np.ndarray) -> _ShardRows:
        def in_shard_order(base_column: np.ndarray, copy_column: list[int]) -> np.ndarray:
            return np.concatenate([base_column, copy_column]).astype(np.int64)[order]

        def images(m: str) -> np.ndarray:
            copied = np.array([c.img[m] for c in copies], dtype=np.float32).reshape(-1, DATACOMP_MODELS[m])
            return np.concatenate([base.img[m], copied])[order].astype(np.float16)

        mismatched = np.zeros(len(order), dtype=bool)
        mismatched[base.mismatched] = True
        return cls(
            order=order,
            concept=in_shard_order(base.concept, [c.concept for c in copies]),
            caption=in_shard_order(base.caption, [c.concept for c in copies]),
            group=in_shard_order(base.group, [c.group for c in copies]),
            mismatched=mismatched[order],
            img={m: images(m) for m in MODELS},
            kinds=[("original" if g >= 0 else None) for g in base.group.tolist()] + [c.kind for c in copies],
            variants=[None] * len(base.concept) + [c.variant for c in copies],
            sizes=base.sizes + [c.size for c in copies],
            sha256=base.sha256 + [c.sha256 for c in copies],
            faces=base.faces + [c.faces for c in copies],
        )


@dataclass
class _Shard:
    stem: str
    table: pa.Table
    truth: pa.Table
    emb: dict[str, dict[str, np.ndarray]]  # model -> {"img", "txt"} float16


class _Generator:
    """Plans and synthesises the pool shard by shard (state between shards:
    concept counts left, the next group id, copies sent to the next shard)."""

    def __init__(self, settings: PoolSettings, concepts: Sequence[Concept]) -> None:
        self.s = settings
        self.concepts = concepts
        n, shards = settings.samples_per_shard, settings.shards
        total = n * shards
        self.rows = total
        n_copies = min(round(total * DUPLICATE_RATE), total // 3)  # as the image pool plans them
        self.copies_per_shard = [min(c, n // 3) for c in _split(n_copies, shards)]
        self.mismatch_per_shard = _split(planted_count(total, MISMATCH_RATE), shards)
        n_base = total - sum(self.copies_per_shard)
        self.left = concept_counts(concepts, n_base).astype(np.int64)  # base rows per concept still to deal
        self.dirs = {m: Directions(rng_stream(settings.seed, _DIRECTION_STREAM, i), m, DATACOMP_MODELS[m], concepts)
                     for i, m in enumerate(MODELS)}
        self.stems: list[str] = []
        self.rows_per_concept = np.zeros(len(concepts), dtype=np.int64)
        self.exact = self.near = self.groups = self.mismatched = 0
        self._carried: list[_Copy] = []

    # -- the pool --------------------------------------------------------
    def shards(self) -> Iterable[_Shard]:
        for s in range(self.s.shards):
            yield self._shard(s)

    def pool_info(self, models: Sequence[str]) -> dict[str, Any]:
        return {
            "generator": DATACOMP_GENERATOR,
            "generator_version": DATACOMP_GENERATOR_VERSION,
            "format": "datacomp",
            "settings": self.s.model_dump(mode="json"),
            "settings_used": ["shards", "samples_per_shard", "concepts", "seed"],
            "models": list(models),
            "rows": self.rows,
            "shards": list(self.stems),
            "duplicates": {"groups": self.groups, "exact": self.exact, "near": self.near},
            "mismatched": self.mismatched,
            "geometry": {
                "modality_gap": MODALITY_GAP, "gap_cosine": GAP_COSINE, "attribute_share": ATTRIBUTE_SHARE,
                "spread_range": list(SPREAD_RANGE), "text_noise": TEXT_NOISE, "near_eps": NEAR_EPS,
            },
            "concepts": [
                {
                    "id": c.id, "name": c.name, "shape": c.shape, "color": c.color,
                    "variability": c.variability, "spread": round(spread(c), 6),
                    "frequency": round(c.frequency, 6), "rows": int(self.rows_per_concept[c.id]),
                }
                for c in self.concepts
            ],
        }

    def targets(self, models: Sequence[str]) -> dict[str, np.ndarray]:
        """``eval_per_class`` target image embeddings per concept (float16), per model."""
        concept = np.repeat(np.arange(len(self.concepts)), self.s.eval_per_class)
        return {f"{m}_img": self.dirs[m].images(concept, rng_stream(self.s.seed, _TARGET_STREAM, i)).astype(np.float16)
                for i, m in enumerate(MODELS) if m in models}

    # -- one shard -------------------------------------------------------
    def _shard(self, s: int) -> _Shard:
        """Plan and synthesise shard ``s``; each random stream is drawn in a fixed order."""
        n, seed = self.s.samples_per_shard, self.s.seed
        plan = rng_stream(seed, _PLAN_STREAM, s)  # concepts, duplicate groups, mismatches, row order
        lay = rng_stream(seed, _LAYOUT_STREAM, s)  # sizes and faces of base rows, then urls and captions
        emb_rng = {m: rng_stream(seed, _EMBED_STREAM, i, s) for i, m in enumerate(MODELS)}
        stem = _hex(seed, "shard", s)
        self.stems.append(stem)
        uids = [_hex(seed, "uid", s * n + i) for i in range(n)]
        carried_in, self._carried = self._carried, []
        c_s = self.copies_per_shard[s]
        carry_out = self.copies_per_shard[s + 1] // 2 if s + 1 < self.s.shards else 0
        n_base = n - c_s
        base, copy_plan = self._plan_base_rows(s, plan, n_base, made=c_s - len(carried_in) + carry_out)

        order = plan.permutation(n)  # order[position] = assembled index
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        self._describe_images(base, lay, [uids[p] for p in pos[:n_base]])
        base.img = {m: self.dirs[m].images(base.concept, emb_rng[m]) for m in MODELS}
        copies = self._make_copies(base, copy_plan, emb_rng)
        local, self._carried = copies[: len(copies) - carry_out], copies[len(copies) - carry_out:]
        rows = _ShardRows.assemble(base, local + carried_in, order)
        assert len(rows.kinds) == n, (n_base, len(local + carried_in), n)

        emb = {m: {"img": rows.img[m], "txt": self.dirs[m].texts(rows.caption, emb_rng[m]).astype(np.float16)}
               for m in MODELS}
        scores = {m: clip_scores(emb[m]["img"], emb[m]["txt"]) for m in MODELS}
        table, truth = self._tables(stem, uids, rows, scores, lay)
        self._count(rows)
        return _Shard(stem, table, truth, emb)

    def _plan_base_rows(self, s: int, rng: np.random.Generator, n_base: int,
                        made: int) -> tuple[_BaseRows, list[_CopyPlan]]:
        """The base rows' concepts, the duplicate groups among them (``made``
        copies of this shard's originals, shuffled) and the mismatched captions."""
        concept = self._deal_concepts(rng, n_base)
        group, copy_plan = self._plan_groups(rng, n_base, made)
        mismatched, caption = self._plan_mismatches(rng, s, concept, group)
        return _BaseRows(concept, group, caption, mismatched), copy_plan

    def _deal_concepts(self, rng: np.random.Generator, n_base: int) -> np.ndarray:
        """Concepts of ``n_base`` rows, dealt from what is left of the exact Zipf counts."""
        counts = rng.multivariate_hypergeometric(self.left, n_base) if n_base else np.zeros_like(self.left)
        self.left -= counts
        return np.repeat(np.arange(len(self.concepts)), counts)[rng.permutation(n_base)]

    def _plan_groups(self, rng: np.random.Generator, n_base: int, made: int) -> tuple[np.ndarray, list[_CopyPlan]]:
        """Duplicate groups of 1-3 copies each, originals among the base rows:
        each base row's group (-1: none) and the copies, shuffled."""
        sizes: list[int] = []
        while sum(sizes) < made:
            sizes.append(min(int(rng.integers(1, 4)), made - sum(sizes)))
        originals = rng.choice(n_base, size=len(sizes), replace=False) if sizes else np.zeros(0, dtype=np.int64)
        copy_plan: list[_CopyPlan] = []
        base_group = np.full(n_base, -1, dtype=np.int64)
        for orig, k in zip(originals.tolist(), sizes):
            group = self.groups
            self.groups += 1
            base_group[orig] = group
            for _ in range(k):
                copy_plan.append((orig, group, *draw_copy_kind(rng)))
        return base_group, [copy_plan[i] for i in rng.permutation(len(copy_plan))]

    def _plan_mismatches(self, rng: np.random.Generator, s: int, concept: np.ndarray,
                         group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mismatched captions, on base rows outside duplicate groups: their
        (sorted) indices and every base row's caption concept."""
        eligible = np.flatnonzero(group < 0)
        n_mis = min(len(eligible), self.mismatch_per_shard[s])
        mis = np.sort(eligible[rng.choice(len(eligible), size=n_mis, replace=False)]) if n_mis else eligible[:0]
        caption = concept.copy()
        for j in mis.tolist():
            caption[j] = other_concept(self.concepts, int(concept[j]), rng)
        return mis, caption

    def _describe_images(self, base: _BaseRows, lay: np.random.Generator, uids: Sequence[str]) -> None:
        """What a base row's image "is" (copies inherit it): original size, sha256, faces."""
        base.sizes = [random_original_size(lay) for _ in uids]
        base.sha256 = [_image_sha(self.s.seed, uid) for uid in uids]
        base.faces = [random_faces(lay) for _ in uids]

    @staticmethod
    def _make_copies(base: _BaseRows, copy_plan: Sequence[_CopyPlan],
                     emb_rng: dict[str, np.random.Generator]) -> list[_Copy]:
        """The planned copies: an exact one keeps its original's vector and hash,
        a near one gets a nudged vector (and a rescaled one a smaller size)."""
        copies: list[_Copy] = []
        for j, group, kind, variant in copy_plan:
            img = {}
            for m in MODELS:
                x = base.img[m][j]
                img[m] = (near_copy(x, variant, emb_rng[m]) if kind == "near" else x).copy()
            w, h = base.sizes[j]
            size = (w * 3 // 4, h * 3 // 4) if variant == "rescale" else (w, h)
            copies.append(_Copy(int(base.concept[j]), group, kind, variant, img, size,
                                base.sha256[j] if kind == "exact" else "", base.faces[j]))
        return copies

    def _tables(self, stem: str, uids: Sequence[str], rows: _ShardRows, scores: dict[str, np.ndarray],
                lay: np.random.Generator) -> tuple[pa.Table, pa.Table]:
        """The shard's DataComp metadata table and its ground truth, in shard order."""
        records, truth = [], []
        for i, uid in enumerate(uids):
            a = int(rows.order[i])
            records.append({
                "uid": uid,
                "url": random_url(lay),
                "text": drawn_caption(self.concepts[int(rows.caption[i])].name, lay),
                "original_width": rows.sizes[a][0],
                "original_height": rows.sizes[a][1],
                "clip_b32_similarity_score": float(scores["b32"][i]),
                "clip_l14_similarity_score": float(scores["l14"][i]),
                "face_bboxes": rows.faces[a],
                "sha256": rows.sha256[a] or _image_sha(self.s.seed, uid),
            })
            c = self.concepts[int(rows.concept[i])]
            truth.append({
                "uid": uid, "shard": stem, "key": None, "concept": c.id, "concept_name": c.name,
                "variability": c.variability, "dup_group": int(rows.group[i]), "dup_kind": rows.kinds[a],
                "dup_variant": rows.variants[a], "mismatched": bool(rows.mismatched[i]),
                "caption_concept": int(rows.caption[i]), "planted_status": "ok",
            })
        return (pa.Table.from_pylist(records, schema=DATACOMP_SCHEMA),
                pa.Table.from_pylist(truth, schema=GROUND_TRUTH_SCHEMA))

    def _count(self, rows: _ShardRows) -> None:
        """Add a shard's rows to the pool's totals (pool_info and the summary)."""
        self.rows_per_concept += np.bincount(rows.concept, minlength=len(self.concepts))
        self.exact += sum(k == "exact" for k in rows.kinds)
        self.near += sum(k == "near" for k in rows.kinds)
        self.mismatched += int(rows.mismatched.sum())


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez``'s format (uncompressed zip of ``KEY.npy``) with fixed entry
    timestamps, so equal arrays give equal bytes (``np.savez`` stamps the clock)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
