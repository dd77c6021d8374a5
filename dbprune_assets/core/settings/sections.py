"""The settings sections: one pydantic model per section of the YAML file,
strict, with every knob's default, bounds and description, and
:class:`PipelineSettings` holding them all.

The cluster counts ``semdedup.dedup_k`` and ``dbp.k`` also accept ``auto``
(:class:`AutoK`): the paper's mean cluster size, clamped, resolved once the
number of samples is known.  Reading files, profiles and the automatic choice
are in :mod:`~dbprune_assets.core.settings.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dbprune_assets.core.models.scales import ScaleName, resolve_train
from dbprune_assets.core.strategies import registry

#: the built-in strategies, in table order (``selection.strategies`` is
#: checked against :func:`~dbprune_assets.core.strategies.registry.names`,
#: which also holds strategies registered later)
STRATEGIES: tuple[str, ...] = registry.BUILTIN_NAMES
PROFILES: tuple[str, ...] = ("paper", "sample")
Device = Literal["auto", "cpu", "cuda"]


class SettingsError(ValueError):
    """A pipeline setting is invalid; the message names it and what is allowed."""


AUTO = "auto"


@dataclass(frozen=True)
class AutoK:
    """The rule behind ``auto`` for a cluster count: the paper's mean cluster
    size (``paper_n / paper_k`` samples per cluster), at least ``floor``
    clusters, at most the paper's ``paper_k``, and never so many that a
    cluster averages fewer than ``min_members`` members."""

    setting: str  # the dotted setting, for messages
    what: str  # what is clustered, for messages
    paper_k: int
    paper_n: int  # samples the paper clustered into paper_k clusters
    floor: int
    min_members: int = 50

    @property
    def per_cluster(self) -> int:
        return self.paper_n // self.paper_k

    def resolve(self, n: int) -> int:
        """``auto`` for ``n`` samples: ``min(paper_k, max(floor, round(n / per_cluster)), n // min_members)``,
        at least 1."""
        k = max(self.floor, round(n / self.per_cluster))
        return max(1, min(k, self.paper_k, n // self.min_members))

    def clusters(self, value: int | str, n: int, what: str | None = None) -> int:
        """The cluster count for ``n`` samples: ``auto`` resolved, an explicit
        value checked against ``n`` (more clusters than samples is an error
        naming the setting, the pool size and the ``auto`` value)."""
        if value == AUTO:
            return self.resolve(n)
        k = int(value)
        if k > n:
            raise SettingsError(
                f"{self.setting}: {k} clusters exceeds the {n} {what or self.what} of this pool; "
                f"set {self.setting}: auto (here {self.resolve(n)}, scaled to the pool) or at most {n}"
            )
        return k


#: SemDeDup: 50,000 clusters on LAION-440M, about 8,800 samples per cluster
DEDUP_K = AutoK("semdedup.dedup_k", "ok samples", paper_k=50_000, paper_n=440_000_000, floor=8)
#: DBP: 500 clusters on LAION-DeDup-280M, about 560,000 candidates per cluster
#: (the paper's 100 on DataComp-Medium's candidates is the same order)
DBP_K = AutoK("dbp.k", "candidates", paper_k=500, paper_n=280_000_000, floor=20)


def _cluster_count(value: Any) -> int | str:
    """A strict positive int, or ``auto``."""
    if value == AUTO and isinstance(value, str):
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("clusters_type", "expected a whole number or auto")
    if value <= 0:
        raise PydanticCustomError("clusters_range", "the number of clusters must be positive")
    return value


#: a cluster count: a positive int or ``"auto"``
Clusters = Annotated[int | Literal["auto"], PlainValidator(_cluster_count)]


def _level_ks(value: Any) -> tuple[int, ...] | str:
    """``auto``, or a non-empty list of positive whole numbers (a tuple)."""
    if value == AUTO and isinstance(value, str):
        return AUTO
    if not isinstance(value, (list, tuple)) or not value:
        raise PydanticCustomError("levels_type", "expected auto or a list of cluster counts, e.g. [100, 10]")
    return tuple(_cluster_count(v) for v in value)  # type: ignore[misc]


#: the cluster counts of the levels above the first: a list of positive ints or ``"auto"``
LevelKs = Annotated[tuple[int, ...] | Literal["auto"], PlainValidator(_level_ks)]


class _Section(BaseModel):
    # strict: YAML `true` or "5" is not an int (1 for a float is fine); tuples
    # are read from YAML lists (their items stay strict)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def _exactly_one(self, section: str, a: str, b: str) -> None:
        """The two settings ``a`` and ``b`` are alternatives: one set, the other null."""
        if (getattr(self, a) is None) == (getattr(self, b) is None):
            raise ValueError(f"set exactly one of {section}.{a} or {section}.{b} (the other null)")


class PoolSettings(_Section):
    """The synthetic sample pool (written when ``$DBPRUNE_POOL`` is absent)."""

    shards: int = Field(6, gt=0, description="number of pool shards")
    samples_per_shard: int = Field(500, gt=0, description="parquet rows per shard (failed rows included)")
    concepts: int = Field(24, ge=2, le=64, description="number of visual concepts")
    image_size: int = Field(48, ge=16, description="side of the rendered JPEGs, pixels")
    reference_samples: int = Field(6000, ge=0, description="size of the clean reference split for the bootstrap encoder")
    eval_per_class: int = Field(20, ge=1, description="labelled eval images per concept")
    seed: int = Field(0, description="generator seed; the pool is a pure function of its settings")


class EncoderSpec(_Section):
    """One encoder: an open_clip architecture with a pretrained tag, an
    ``hf-hub:`` id, a local checkpoint, or ``bootstrap``."""

    model: str = Field("bootstrap", description="open_clip model name, 'hf-hub:ORG/REPO', or 'bootstrap'")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (e.g. 'laion2b_s34b_b79k') or a local checkpoint path")

    @property
    def is_bootstrap(self) -> bool:
        return self.model == "bootstrap"


class BootstrapSettings(_Section):
    """The offline encoder: a small CLIP trained with open_clip_train on the
    reference split (or, for a user pool without one, on the pool itself)."""

    model: str = Field("dbprune-tiny", description="open_clip architecture to train")
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(20, ge=0)
    workers: int = Field(1, ge=0)
    seed: int = Field(0)


class EncoderSettings(_Section):
    cluster_encoder: EncoderSpec = EncoderSpec()
    score_encoder: EncoderSpec | None = Field(None, description="defaults to the cluster encoder")
    bootstrap: BootstrapSettings = BootstrapSettings()

    @property
    def score(self) -> EncoderSpec:
        return self.score_encoder or self.cluster_encoder


class EmbeddingsSettings(_Section):
    """Where the embeddings come from (docs/design.md, "Pools, embedding sources and scale")."""

    source: str = Field(
        "compute", description="a registered embedding source (core/pool/sources/registry.py, which checks the name before any run "
                           "starts: the sources read these settings, so the settings do not import them); built in: compute: the encoder embeds the pool's images; datacomp: the pool is DataComp "
                               "metadata (<stem>.parquet + <stem>.npz per shard), its stored embeddings are used "
                               "and no encoder is trained or loaded; clip_retrieval: the pool is img2dataset "
                               "output embedded by clip-retrieval's inference, whose stored embeddings are used "
                               "(linked by uid, or by key when its metadata has no uid column); no encoder")
    path: str | None = Field(None, description="datacomp: the folder holding <shard>.parquet + <shard>.npz for each "
                                               "pool shard; clip_retrieval: clip-retrieval's output folder, the one "
                                               "holding img_emb/, text_emb/ and metadata/ (default: the pool itself)")
    model: Literal["l14", "b32"] = Field("l14", description="datacomp: which stored embeddings (npz key prefix)")

    def folder(self, pool: Path) -> Path:
        """Where the precomputed files are (DataComp's per shard, or clip-retrieval's output folder)."""
        return Path(self.path).expanduser() if self.path else pool

    @property
    def precomputed(self) -> bool:
        return self.source != "compute"


class PartitionSettings(_Section):
    """How the pool maps to Dagster partitions and runs (``core/pool/shardgroups.py``);
    execution only: no result depends on them."""

    shards_per_partition: Clusters = Field(
        AUTO, description="shards per partition of the per-shard assets; auto: 1, except that pools of more than "
                          "256 shards of under 10,000 rows get groups of a power of two shards reaching 10,000 rows, "
                          "and pools of more than 10,000 shards the least groups that keep 10,000 partitions "
                          "(groups are named <first>..<last>)")
    per_run: int = Field(1000, gt=0, description="partitions per Dagster run: a group's out-of-date partitions run "
                                                 "in batches of this many (many runs spread over Celery workers)")


class ComputeSettings(_Section):
    device: Device = Field("auto", description="auto: cuda when present, else cpu")
    batch_size: int = Field(256, gt=0, description="embedding batch size")
    workers: int = Field(1, ge=0, description="image decoding worker processes (0 = in the main process)")
    threads: int = Field(0, ge=0, description="torch/faiss CPU threads (0 = the cores left after the decode workers)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on cuda, fp32 on cpu")
    tile: int = Field(4096, gt=0, description="SemDeDup column tile size")
    parallel_shards: Clusters = Field(
        AUTO, description="shards a per-shard step (ingest, stored embeddings, assignments) works on at once, in "
                          "threads; auto: the cores this process may use (threads are shared among them)")


class IngestSettings(_Section):
    verify_images: Literal["decode", "header", "none"] = Field(
        "decode", description="how ingest checks images: full decode, header only, or not at all"
    )


class SemDedupSettings(_Section):
    dedup_k: Clusters = Field(50000, description="SemDeDup k-means clusters, or auto (DEDUP_K: scaled to the ok samples)")
    eps: float = Field(0.07, gt=0, lt=1, description="duplicate when cosine similarity > 1 - eps")
    niter: int = Field(100, gt=0)
    sample_size: int = Field(2_000_000, gt=0, description="k-means training sample (bounded, uniform over the pool)")
    seed: int = 0

    def clusters(self, n_ok: int) -> int:
        """``dedup_k`` for ``n_ok`` ok samples (``auto`` resolved, an explicit value checked)."""
        return DEDUP_K.clusters(self.dedup_k, n_ok)


class ClipFilterSettings(_Section):
    threshold: float | None = Field(None, ge=-1, le=1, description="keep clip_score >= threshold")
    fraction: float | None = Field(0.5, gt=0, le=1, description="keep the top fraction (DataComp --fraction)")

    @model_validator(mode="after")
    def _one_rule(self) -> "ClipFilterSettings":
        self._exactly_one("clip_filter", "threshold", "fraction")
        return self


class DbpSettings(_Section):
    k: Clusters = Field(500, description="DBP k-means clusters, or auto (DBP_K: scaled to the candidates)")
    l: int = Field(20, gt=0, description="nearest other centroids for d_inter (capped at k-1)")
    tau: float = Field(0.1, gt=0, description="softmax temperature")
    keep_fraction: float | None = Field(0.25, gt=0, le=1, description="M = floor(keep_fraction * |candidates|)")
    target_size: int | None = Field(None, gt=0, description="absolute M (instead of keep_fraction)")
    r: float = Field(0.0, ge=0, description="cluster-balance ratio; lb_j = max(0, min(m, |C_j|-1)), m = floor(r*M/k), m = 1 when r = 0")
    niter: int = Field(100, gt=0)
    sample_size: int = Field(2_000_000, gt=0, description="k-means training sample (bounded, uniform over candidates)")
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> "DbpSettings":
        self._exactly_one("dbp", "keep_fraction", "target_size")
        return self

    def clusters(self, n_candidates: int) -> int:
        """``k`` for ``n_candidates`` candidates (``auto`` resolved, an explicit value checked)."""
        return DBP_K.clusters(self.k, n_candidates)


class DriftSettings(_Section):
    """The drift alarm over the shards added since a k-means fit (``core/method/drift.py``)."""

    factor: float = Field(3.0, gt=1, description="alarm when the added samples' share beyond the fit's 99th-percentile "
                                                 "distance exceeds factor x the fit's own share (about 1%)")
    min_samples: int = Field(1000, gt=0, description="added samples needed before the alarm may fire")


class SelectionSettings(_Section):
    strategies: tuple[str, ...] = Field(STRATEGIES, strict=False, description=f"strategies to materialise, of {', '.join(STRATEGIES)}")
    seed: int = Field(0, description="seed of the random baseline")

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        allowed = registry.names()  # at validation time: strategies registered after import count
        bad = [s for s in v if s not in allowed]
        if bad:
            raise ValueError(f"unknown strategy {bad}; allowed: {', '.join(allowed)}")
        if not v:
            raise ValueError(f"at least one strategy; allowed: {', '.join(allowed)}")
        return v


class NegClipSettings(_Section):
    """negCLIPLoss (Wang et al., NeurIPS 2024): the in-batch normalisation of the CLIP score."""

    batch_size: int = Field(32768, ge=2, description="the batch a pair is normalised within (the paper's 32,768; "
                                                     "capped at the pool)")
    batches: int = Field(10, gt=0, description="random batches averaged per pair (the paper's K = 10)")
    temperature: float = Field(0.01, gt=0, description="CLIP's temperature (OpenAI CLIP's learned 0.01, the paper's)")


class BalancedKmeansSettings(_Section):
    """Hierarchical k-means with balanced sampling (Vo et al., 2024).  Level 1
    is SemDeDup's k-means; each level above clusters the centroids of the one below."""

    levels: Clusters = Field(AUTO, description="levels of the hierarchy, SemDeDup's clusters included, or auto "
                                               "(a level per tenfold fewer clusters, at most 4)")
    k: LevelKs = Field(
        AUTO, description="clusters of each level above the first, bottom up, or auto (a tenth of "
                                        "the level below)")
    resampling_steps: int = Field(10, ge=0, description="resampling steps per level above the first (the paper's 10)")
    pick: Literal["closest", "random"] = Field(
        "closest", description="which members a leaf keeps: closest to its centroid (the paper's web-image "
                               "setting) or random (seeded)")
    seed: int = 0


class StrategiesSettings(_Section):
    """The strategies' own inputs (``core/strategies/``)."""

    target_embeddings: str | None = Field(
        None, description="datacomp_image's targets: a .npy/.npz file or a folder of them holding image embeddings "
                          "(DataComp uses ImageNet-1k's training images); default: the pool's targets/ file, else "
                          "the evaluation sets' images embedded by the encoder")
    ground_truth: str | None = Field(
        None, description="a ground-truth parquet in the sample pool's schema (uid, shard, concept, variability, "
                          "dup_group, mismatched, ...); default: the pool's ground_truth.parquet when present")
    negclip: NegClipSettings = NegClipSettings()
    balanced_kmeans: BalancedKmeansSettings = BalancedKmeansSettings()


class ExportSettings(_Section):
    shard_size: int = Field(10000, gt=0, description="samples per exported tar")
    seed: int = Field(0, description="shuffle seed of the exported shards")


class TrainSettings(_Section):
    """Per-strategy training.  ``scale`` (DataComp's ``debug``, ``small``,
    ``medium``, ``large``, ``xlarge``) sets ``model``, ``batch_size``, ``lr``,
    ``samples_seen``, ``warmup`` and ``beta2`` to DataComp's values for that
    scale (:mod:`~dbprune_assets.core.models.scales`); those keys, when the settings
    file also sets them, win over the scale, and the scale wins over the
    profile's.  The resolved values are what the settings hold and save."""

    scale: ScaleName | None = Field(
        None, description="DataComp scale (debug, small, medium, large, xlarge): sets model, batch_size, lr, "
                          "samples_seen, warmup and beta2 to DataComp's values; keys set beside it win")
    model: str = Field("ViT-B-32", description="open_clip architecture trained per strategy")
    samples_seen: int = Field(128_000_000, gt=0, description="equal for every strategy: steps x global batch")
    batch_size: int = Field(4096, gt=0, description="global batch")
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(500, ge=0, description="warmup steps")
    beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2 (open_clip_train --beta2); 0.98 = open_clip's ViT default")
    precision: str = Field("amp_bf16")
    workers: int = Field(4, ge=0)
    train_seeds: tuple[int, ...] = Field((0,), min_length=1, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _scale_defaults(cls, data: Any) -> Any:
        return resolve_train(data)


class EvalSettings(_Section):
    """Evaluation sets in CLIP_benchmark's webdataset layout (``core/models/evaluate.py``)."""

    datasets: tuple[str, ...] | None = Field(
        None, min_length=1, strict=False,
        description="evaluation dataset folders in CLIP_benchmark's webdataset layout (test/nshards.txt, "
                    "test/0.tar, ...), or folders holding such folders (a local copy of DataComp's eval sets); "
                    "each one's task is read from it (default: the sample pool's eval/)")
    zeroshot: str | None = Field(None, description="old setting, still read: one more folder for eval.datasets")
    retrieval: str | None = Field(None, description="old setting, still read: one more folder for eval.datasets")
    batch_size: int = Field(256, gt=0)
    bootstrap_samples: int = Field(1000, gt=0, description="bootstrap resamples for confidence intervals")


class PipelineSettings(_Section):
    profile: Literal["paper", "sample"] = "paper"
    pool: PoolSettings = PoolSettings()
    ingest: IngestSettings = IngestSettings()
    encoder: EncoderSettings = EncoderSettings()
    embeddings: EmbeddingsSettings = EmbeddingsSettings()
    partitions: PartitionSettings = PartitionSettings()
    compute: ComputeSettings = ComputeSettings()
    semdedup: SemDedupSettings = SemDedupSettings()
    clip_filter: ClipFilterSettings = ClipFilterSettings()
    dbp: DbpSettings = DbpSettings()
    selection: SelectionSettings = SelectionSettings()
    strategies: StrategiesSettings = StrategiesSettings()
    export: ExportSettings = ExportSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    refit: Literal["auto", "always", "never"] = Field(
        "auto", description="once clusters exist, added shards are assigned to them: always refits when the pool "
                            "changes, never keeps the fits, auto refits when the drift alarm fires (core/method/fitrecord.py)")
    centroids_from: str | None = Field(None, description="another home whose SemDeDup and DBP fits this home uses "
                                                          "(dbprune run --centroids-from HOME)")
    drift: DriftSettings = DriftSettings()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
