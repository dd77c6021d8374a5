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
  recognised by :func:`is_datacomp_pool`).

The story is the image pool's (:mod:`.concepts`, :mod:`.plan`): the same
concepts with the same planted ``variability`` and Zipf ``frequency`` (base
rows per concept are exactly :func:`~.concepts.concept_counts`), the same
duplicate and mismatch rates, exact and near duplicates in groups of 2-4
(near variants keep the image pool's names), and mismatched captions taken
from a concept that differs in shape and colour.  No failed downloads or
empty captions: a DataComp metadata shard lists samples, not download attempts.

Geometry, per model (b32 and l14 drawn independently, same story): orthonormal
directions ``g_img``, ``g_txt`` (a modality gap, ``g_img·g_txt = GAP_COSINE``),
one per shape, one per colour and one per concept; a concept's direction
``u_c`` shares :data:`ATTRIBUTE_SHARE` of its squared length with its shape's
and its colour's direction (so concepts that share an attribute are nearer
neighbours, and d_inter differs between clusters).  A sample is

    image = normalise(MODALITY_GAP·g_img + u_c + spread_c·z),  z ~ N(0, I/d)
    text  = normalise(MODALITY_GAP·g_txt + u_t + TEXT_NOISE[model]·w)

with ``t`` the caption's concept and ``spread_c`` linear in the concept's
variability (:data:`SPREAD_RANGE`): the mean within-concept image cosine is
about ``(1 + a²) / (1 + a² + spread_c²)``, from ~0.89 down to ~0.54.  A
correct pair scores ~0.3-0.6, a mismatched one ~0-0.2.  An exact duplicate
stores the very same image vector; a near one is ``normalise(x + ε·v)`` with
ε from :data:`NEAR_EPS` (cosine 0.985-0.997 to its original, above
SemDeDup's ``1 - 0.07/2``), while no two unrelated samples come near
``1 - 0.07``.  ``clip_*_similarity_score`` is the float32 cosine of the stored
float16 pair, computed as the pipeline computes it
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

from dbprune_assets.samplepool.captions import CAPTION_TEMPLATES
from dbprune_assets.samplepool.concepts import COLORS, SHAPES, Concept, concept_counts, make_concepts
from dbprune_assets.samplepool.plan import DUPLICATE_RATE, EXACT_SHARE, MISMATCH_RATE, NEAR_VARIANTS, _other_concept, _planted_count
from dbprune_assets.samplepool.writer import _DOMAINS, _GROUND_TRUTH_SCHEMA, _SLUG_WORDS


#: bump when the same settings would produce different files
DATACOMP_GENERATOR_VERSION = 1

#: the DataComp models whose embeddings the generator can write, in npz key order
MODELS: tuple[str, ...] = tuple(DATACOMP_MODELS)  # ("b32", "l14")

# geometry (see the module docstring)
MODALITY_GAP = 1.0
GAP_COSINE = 0.3
ATTRIBUTE_SHARE = 0.2  # of a concept direction's squared length, along its shape's and along its colour's
SPREAD_RANGE: tuple[float, float] = (0.5, 1.3)  # spread at variability 0 and 1
TEXT_NOISE: dict[str, float] = {"b32": 0.9, "l14": 0.8}  # l14 pairs align a little better, as in DataComp
NEAR_EPS: dict[str, float] = {"requality": 0.08, "noise": 0.12, "rescale": 0.16}
FACE_RATE = 0.03  # rows with one or two face boxes

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

# random streams (the image pool uses 1-6)
_PLAN_STREAM, _EMBED_STREAM, _DIRECTION_STREAM, _LAYOUT_STREAM = 20, 21, 22, 23
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_POSITIONS: tuple[str, ...] = (
    "in the center", "at the top", "at the bottom", "on the left", "on the right",
    "in the top left", "in the top right", "in the bottom left", "in the bottom right",
)
_TEXTURES: tuple[str, ...] = ("plain", "gradient", "blotchy", "striped", "checkered")


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


def spread(concept: Concept) -> float:
    """The planted spread of a concept's image embeddings (noise scale, linear in variability)."""
    lo, hi = SPREAD_RANGE
    return lo + (hi - lo) * concept.variability


def expected_within_cosine(concept: Concept) -> float:
    """The mean image cosine of two distinct samples of ``concept`` the geometry plants
    (``(1 + a²) / (1 + a² + spread²)``; duplicates excluded)."""
    a2 = MODALITY_GAP**2
    return (1 + a2) / (1 + a2 + spread(concept) ** 2)


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
        gt_writer = pq.ParquetWriter(tmp / "ground_truth.parquet", _GROUND_TRUTH_SCHEMA, **_PARQUET_OPTIONS)
        try:
            for shard in gen.shards():
                pq.write_table(shard.table, tmp / f"{shard.stem}.parquet", **_PARQUET_OPTIONS)
                _write_npz(tmp / f"{shard.stem}.npz", {f"{m}_{part}": shard.emb[m][part] for m in models
                                                        for part in ("img", "txt")})
                gt_writer.write_table(shard.truth)
        finally:
            gt_writer.close()
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

_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "use_dictionary": True,
                                    "write_statistics": True}


def _check_models(models: Iterable[str]) -> tuple[str, ...]:
    if isinstance(models, str):
        models = (models,)
    chosen = tuple(models)
    bad = [m for m in chosen if m not in DATACOMP_MODELS]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"models={chosen!r}: choose one or more of {list(MODELS)}, each once "
                         f"({'unknown ' + repr(bad) if bad else 'empty or repeated'})")
    return tuple(m for m in MODELS if m in chosen)  # npz key order as DataComp's


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, *stream])


def _hex(seed: int, what: str, index: int) -> str:
    """32 lowercase hex digits, a pure function of (seed, what, index)."""
    return hashlib.blake2b(f"{seed}/{what}/{index}".encode(), digest_size=16, person=b"dbprune-datacomp").hexdigest()


def _split(total: int, parts: int) -> list[int]:
    """``total`` dealt over ``parts`` as evenly as possible, the first parts one more."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Isotropic Gaussian noise of expected squared norm 1 per row, float32."""
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))


class _Directions:
    """One model's planted directions: modality gap, shape, colour and concept directions."""

    def __init__(self, seed: int, model_idx: int, dim: int, concepts: Sequence[Concept]) -> None:
        rng = _rng(seed, _DIRECTION_STREAM, model_idx)
        shapes, colors = list(SHAPES), list(COLORS)
        need = 2 + len(shapes) + len(colors) + len(concepts)
        q, _ = np.linalg.qr(rng.standard_normal((dim, need)))
        q = q.T.astype(np.float32)  # orthonormal rows
        self.g_img = q[0]
        self.g_txt = (GAP_COSINE * q[0] + np.sqrt(1 - GAP_COSINE**2) * q[1]).astype(np.float32)
        shape_dir = {s: q[2 + i] for i, s in enumerate(shapes)}
        color_dir = {c: q[2 + len(shapes) + i] for i, c in enumerate(colors)}
        own = q[2 + len(shapes) + len(colors):]
        w_attr, w_own = np.sqrt(ATTRIBUTE_SHARE), np.sqrt(1 - 2 * ATTRIBUTE_SHARE)
        self.concept = np.stack([w_attr * shape_dir[c.shape] + w_attr * color_dir[c.color] + w_own * own[c.id]
                                 for c in concepts]).astype(np.float32)  # unit rows


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
        self.mismatch_per_shard = _split(_planted_count(total, MISMATCH_RATE), shards)
        n_base = total - sum(self.copies_per_shard)
        self.left = concept_counts(concepts, n_base).astype(np.int64)  # base rows per concept still to deal
        self.spread = np.array([spread(c) for c in concepts], dtype=np.float32)
        self.dirs = {m: _Directions(settings.seed, i, DATACOMP_MODELS[m], concepts) for i, m in enumerate(MODELS)}
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

    # -- one shard -------------------------------------------------------
    def _shard(self, s: int) -> _Shard:
        n, seed = self.s.samples_per_shard, self.s.seed
        rng = _rng(seed, _PLAN_STREAM, s)
        lay = _rng(seed, _LAYOUT_STREAM, s)
        stem = _hex(seed, "shard", s)
        self.stems.append(stem)
        carried_in, self._carried = self._carried, []
        c_s = self.copies_per_shard[s]
        carry_out = self.copies_per_shard[s + 1] // 2 if s + 1 < self.s.shards else 0
        made = c_s - len(carried_in) + carry_out  # copies of this shard's originals
        n_base = n - c_s
        uids = [_hex(seed, "uid", s * n + i) for i in range(n)]

        # base rows: concepts dealt from what is left of the exact Zipf counts
        counts = rng.multivariate_hypergeometric(self.left, n_base) if n_base else np.zeros_like(self.left)
        self.left -= counts
        base_concept = np.repeat(np.arange(len(self.concepts)), counts)[rng.permutation(n_base)]

        # duplicate groups: 1-3 copies each, originals among this shard's base rows
        sizes: list[int] = []
        while sum(sizes) < made:
            sizes.append(min(int(rng.integers(1, 4)), made - sum(sizes)))
        originals = rng.choice(n_base, size=len(sizes), replace=False) if sizes else np.zeros(0, dtype=np.int64)
        copy_plan: list[tuple[int, int, str, str]] = []  # (base index, group, kind, variant)
        base_group = np.full(n_base, -1, dtype=np.int64)
        for orig, k in zip(originals.tolist(), sizes):
            group = self.groups
            self.groups += 1
            base_group[orig] = group
            for _ in range(k):
                if rng.random() < EXACT_SHARE:
                    copy_plan.append((orig, group, "exact", "exact"))
                else:
                    copy_plan.append((orig, group, "near", NEAR_VARIANTS[int(rng.integers(len(NEAR_VARIANTS)))]))
        copy_plan = [copy_plan[i] for i in rng.permutation(len(copy_plan))]

        # mismatched captions: on base rows outside duplicate groups
        eligible = np.flatnonzero(base_group < 0)
        n_mis = min(len(eligible), self.mismatch_per_shard[s])
        mis = np.sort(eligible[rng.choice(len(eligible), size=n_mis, replace=False)]) if n_mis else eligible[:0]
        base_caption = base_concept.copy()
        for j in mis.tolist():
            base_caption[j] = _other_concept(self.concepts, int(base_concept[j]), rng)

        # row order: base rows, this shard's own copies, copies from the shard before; shuffled
        order = rng.permutation(n)  # order[position] = assembled index
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)

        # what an image "is": size, hash, faces (copies inherit their original's)
        base_size = [self._size(lay) for _ in range(n_base)]
        base_sha = [hashlib.sha256(f"image/{seed}/{uids[pos[j]]}".encode()).hexdigest() for j in range(n_base)]
        base_faces = [self._faces(lay) for _ in range(n_base)]

        # image embeddings of base rows, then of the copies
        emb_rng = {m: _rng(seed, _EMBED_STREAM, i, s) for i, m in enumerate(MODELS)}
        base_img = {}
        for m in MODELS:
            d = self.dirs[m]
            z = _noise(emb_rng[m], (n_base, DATACOMP_MODELS[m]))
            x = MODALITY_GAP * d.g_img + d.concept[base_concept] + self.spread[base_concept, None] * z
            base_img[m] = _unit(x)
        copies: list[_Copy] = []
        for j, group, kind, variant in copy_plan:
            img = {}
            for m in MODELS:
                x = base_img[m][j]
                if kind == "near":
                    v = _noise(emb_rng[m], (DATACOMP_MODELS[m],))
                    x = _unit(x + NEAR_EPS[variant] * v)
                img[m] = x.copy()
            w, h = base_size[j]
            size = (w * 3 // 4, h * 3 // 4) if variant == "rescale" else (w, h)
            copies.append(_Copy(int(base_concept[j]), group, kind, variant, img, size,
                                base_sha[j] if kind == "exact" else "", base_faces[j]))
        local, self._carried = copies[: len(copies) - carry_out], copies[len(copies) - carry_out:]
        assembled = local + carried_in
        assert n_base + len(assembled) == n, (n_base, len(assembled), n)

        # rows in shard order
        concept = np.concatenate([base_concept, [c.concept for c in assembled]]).astype(np.int64)[order]
        caption = np.concatenate([base_caption, [c.concept for c in assembled]]).astype(np.int64)[order]
        group = np.concatenate([base_group, [c.group for c in assembled]]).astype(np.int64)[order]
        kinds = [("original" if g >= 0 else None) for g in base_group.tolist()] + [c.kind for c in assembled]
        variants = [None] * n_base + [c.variant for c in assembled]
        sizes_all = base_size + [c.size for c in assembled]
        sha_all = base_sha + [c.sha256 for c in assembled]
        faces_all = base_faces + [c.faces for c in assembled]
        mismatched = np.zeros(n, dtype=bool)
        mismatched[mis] = True
        mismatched = mismatched[order]

        emb: dict[str, dict[str, np.ndarray]] = {}
        scores: dict[str, np.ndarray] = {}
        for m in MODELS:
            d = self.dirs[m]
            copied = np.array([c.img[m] for c in assembled], dtype=np.float32).reshape(-1, DATACOMP_MODELS[m])
            img = np.concatenate([base_img[m], copied])[order].astype(np.float16)
            w = _noise(emb_rng[m], (n, DATACOMP_MODELS[m]))
            txt = _unit(MODALITY_GAP * d.g_txt + d.concept[caption] + TEXT_NOISE[m] * w).astype(np.float16)
            emb[m] = {"img": img, "txt": txt}
            scores[m] = clip_scores(img, txt)

        records = []
        truth = []
        for i in range(n):
            a = int(order[i])
            uid = uids[i]
            sha = sha_all[a] or hashlib.sha256(f"image/{seed}/{uid}".encode()).hexdigest()
            records.append({
                "uid": uid,
                "url": self._url(lay),
                "text": self._caption(int(caption[i]), lay),
                "original_width": sizes_all[a][0],
                "original_height": sizes_all[a][1],
                "clip_b32_similarity_score": float(scores["b32"][i]),
                "clip_l14_similarity_score": float(scores["l14"][i]),
                "face_bboxes": faces_all[a],
                "sha256": sha,
            })
            c = self.concepts[int(concept[i])]
            truth.append({
                "uid": uid, "shard": stem, "key": None, "concept": c.id, "concept_name": c.name,
                "variability": c.variability, "dup_group": int(group[i]), "dup_kind": kinds[a],
                "dup_variant": variants[a], "mismatched": bool(mismatched[i]), "caption_concept": int(caption[i]),
                "planted_status": "ok",
            })
        self.rows_per_concept += np.bincount(concept, minlength=len(self.concepts))
        self.exact += sum(k == "exact" for k in kinds)
        self.near += sum(k == "near" for k in kinds)
        self.mismatched += int(mismatched.sum())
        return _Shard(stem, pa.Table.from_pylist(records, schema=DATACOMP_SCHEMA),
                      pa.Table.from_pylist(truth, schema=_GROUND_TRUTH_SCHEMA), emb)

    # -- per-row metadata --------------------------------------------------
    @staticmethod
    def _size(rng: np.random.Generator) -> tuple[int, int]:
        side = int(rng.integers(180, 1200))
        return side, int(side * rng.uniform(0.6, 1.6))

    @staticmethod
    def _faces(rng: np.random.Generator) -> list[list[float]]:
        if rng.random() >= FACE_RATE:
            return []
        boxes = []
        for _ in range(int(rng.integers(1, 3))):
            x0, y0 = rng.uniform(0.0, 0.7, size=2)
            w, h = rng.uniform(0.05, 0.3, size=2)
            boxes.append([round(float(x0), 6), round(float(y0), 6), round(float(x0 + w), 6), round(float(y0 + h), 6)])
        return boxes

    @staticmethod
    def _url(rng: np.random.Generator) -> str:
        slug = _SLUG_WORDS[int(rng.integers(len(_SLUG_WORDS)))]
        domain = _DOMAINS[int(rng.integers(len(_DOMAINS)))]
        return f"https://{domain}/{int(rng.integers(10, 99))}/{slug}-{int(rng.integers(10**5, 10**6))}.jpg"

    def _caption(self, concept: int, rng: np.random.Generator) -> str:
        """An alt text for ``concept`` from the image pool's caption templates (size,
        position and background words drawn, as there is no rendering to describe)."""
        name = self.concepts[concept].name
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        size = ("small", "medium", "large")[int(rng.integers(3))]
        bg = f"{('dark', 'light')[int(rng.integers(2))]} {_TEXTURES[int(rng.integers(len(_TEXTURES)))]}"
        return template.format(name=name, a_name=f"{_article(name)} {name}", a_size=f"{_article(size)} {size}",
                               pos=_POSITIONS[int(rng.integers(len(_POSITIONS)))], bg=bg)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


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
