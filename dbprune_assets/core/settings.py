"""Pipeline settings: one YAML file, validated before any run starts.

A settings file names a ``profile`` (``paper`` or ``sample``) and overrides any
field of it; unknown keys, out-of-range values and values of the wrong type
(``k: true``, ``k: "5"``: every field is strict) are errors that name the
setting and what it allows.  A file without ``profile:`` gets the same
automatic choice as no file (:func:`choose_settings`).  Every knob of the
pipeline lives here with a documented default; nothing needs a code edit.

The cluster counts ``semdedup.dedup_k`` and ``dbp.k`` also accept ``auto``
(:class:`AutoK`): the paper's mean cluster size, clamped, resolved once the
number of samples is known.  See ``docs/design.md``, "Settings".
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.models.scales import ScaleName, layer_scale, resolve_train

STRATEGIES: tuple[str, ...] = ("dbp", "ssp", "random", "clip_score", "semdedup", "full")
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

    source: Literal["compute", "datacomp", "clip_retrieval"] = Field(
        "compute", description="compute: the encoder embeds the pool's images; datacomp: the pool is DataComp "
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


class SelectionSettings(_Section):
    strategies: tuple[str, ...] = Field(STRATEGIES, strict=False, description=f"strategies to materialise, of {', '.join(STRATEGIES)}")
    seed: int = Field(0, description="seed of the random baseline")

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in v if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategy {bad}; allowed: {', '.join(STRATEGIES)}")
        if not v:
            raise ValueError(f"at least one strategy; allowed: {', '.join(STRATEGIES)}")
        return v


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
    export: ExportSettings = ExportSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def profile_dict(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise SettingsError(f"profile: unknown profile {name!r}; allowed: {', '.join(PROFILES)}")
    text = resources.files("dbprune_assets").joinpath("profiles", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid pipeline settings in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see the README's settings table)"
        elif e["type"] in _RANGE_ERRORS and (allowed := _allowed_range(e["loc"])):
            msg = f"{msg} (got {got!r}; allowed: {allowed})"
        elif e["type"] in ("clusters_type", "clusters_range"):
            msg = f"{msg} (got {got!r}; allowed: {loc} > 0, or auto)"
        elif e["type"] in _TYPE_ERRORS:
            allowed = _allowed_range(e["loc"])
            msg = (f"expected {_TYPE_ERRORS[e['type']]}, got {got!r} ({type(got).__name__})"
                   + (f"; allowed: {allowed}" if allowed else ""))
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
#: strict type errors: what the field takes, as YAML writes it
_TYPE_ERRORS = {
    "int_type": "a whole number (YAML 5, not 5.0, true or \"5\")",
    "float_type": "a number (YAML 0.5 or 1, not true or \"0.5\")",
    "bool_type": "true or false",
    "string_type": "a string",
}


def _allowed_range(loc: tuple[Any, ...]) -> str | None:
    """``0 < dbp.keep_fraction ≤ 1``: the bounds declared on the field at ``loc``."""
    import typing

    model: Any = PipelineSettings
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return None
        info = fields[part]
        args = typing.get_args(info.annotation) or (info.annotation,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if info is None:
        return None
    lo = hi = None
    for m in info.metadata:
        for attr, op in (("gt", "<"), ("ge", "≤")):
            if getattr(m, attr, None) is not None:
                lo = (getattr(m, attr), op)
        for attr, op in (("lt", "<"), ("le", "≤")):
            if getattr(m, attr, None) is not None:
                hi = (getattr(m, attr), op)
    name = ".".join(map(str, loc))
    if lo and hi:
        text = f"{lo[0]} {lo[1]} {name} {hi[1]} {hi[0]}"
    elif lo:
        text = f"{name} {'>' if lo[1] == '<' else '≥'} {lo[0]}"
    elif hi:
        text = f"{name} {hi[1]} {hi[0]}"
    else:
        return None
    return text + (", or null" if type(None) in typing.get_args(info.annotation) else "")


def build_settings(overrides: dict[str, Any] | None = None, profile: str | None = None, source: str = "settings") -> PipelineSettings:
    """Profile defaults overlaid with ``overrides``; raises SettingsError.  The
    profile is the one ``overrides`` names, else ``profile``, else ``paper``
    (:func:`choose_settings` makes the automatic choice instead)."""
    overrides = dict(overrides or {})
    name = overrides.pop("profile", None) or profile or "paper"
    data = _deep_merge(layer_scale(profile_dict(str(name)), overrides), overrides)  # train.scale beats the profile
    data["profile"] = name
    try:
        return PipelineSettings.model_validate(data)
    except ValidationError as err:
        raise SettingsError(_format_validation_error(err, source)) from None


def read_settings_file(path: Path) -> dict[str, Any]:
    """The mapping of a settings YAML; SettingsError when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SettingsError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of settings at the top level")
    return data


#: what a user pool gets on top of ``paper`` when no profile is named
USER_POOL_OVERRIDES: dict[str, Any] = {"semdedup": {"dedup_k": AUTO}, "dbp": {"k": AUTO}}


def auto_profile(pool: Path) -> tuple[str, dict[str, Any], str]:
    """The profile that fits ``pool``, the overrides that come with it, and why:
    ``sample`` for the generated sample pool (or no pool yet: it is generated),
    else ``paper`` with ``auto`` cluster counts (the paper's k assume 10^8 samples)."""
    from dbprune_assets.core.pool.poolkind import is_datacomp_pool, is_sample_pool, looks_like_datacomp

    if not pool.exists():
        return "sample", {}, f"there is no pool at {pool} yet, so the sample pool is generated there"
    if is_sample_pool(pool):
        return "sample", {}, f"{pool} is the generated sample pool"
    if is_datacomp_pool(pool):
        return "sample", GENERATED_DATACOMP_OVERRIDES, (
            f"{pool} is the generated DataComp-format pool: the sample profile with its stored embeddings "
            "(embeddings.source: datacomp) and the paper's SemDeDup eps (its vectors are CLIP-like, not the "
            "bootstrap encoder's)")
    if looks_like_datacomp(pool):
        return "paper", _deep_merge(USER_POOL_OVERRIDES, DATACOMP_OVERRIDES), (
            f"{pool} is your own DataComp metadata pool (<stem>.parquet + <stem>.npz, no images): the paper's "
            "values, with semdedup.dedup_k and dbp.k auto and embeddings.source: datacomp")
    return "paper", USER_POOL_OVERRIDES, (f"{pool} is your own pool: the paper's values, with semdedup.dedup_k "
                                          "and dbp.k auto (scaled to the pool's size)")


#: what a pool of DataComp metadata shards gets when no profile is named
DATACOMP_OVERRIDES: dict[str, Any] = {"embeddings": {"source": "datacomp"}}
#: the generated DataComp-format pool (samplepool/datacomp.py plants near copies at cosine > 1 - 0.07/2)
GENERATED_DATACOMP_OVERRIDES: dict[str, Any] = {**DATACOMP_OVERRIDES, "semdedup": {"eps": 0.07}}


def choose_settings(config: Path | None = None, profile: str | None = None, pool: Path | None = None,
                    saved: Path | None = None) -> tuple[PipelineSettings, str]:
    """The settings of a run, and a line saying which profile they use and why.

    The settings file is ``config`` (``--config``); else, unless a ``profile``
    (``--profile``) is asked for, ``saved`` (the home's ``config.yaml`` of an
    earlier run) where it exists; else none.  The profile is the one the file
    names, else ``profile``, else the automatic choice for ``pool`` (default:
    ``$DBPRUNE_POOL`` as :meth:`~.layout.Layout.from_env` finds it; see
    :func:`auto_profile`), the file's values overriding it.  The settings
    record the profile used, so saving them keeps the choice for later runs.
    """
    origin = ""
    if config is None and profile is None and saved is not None and saved.is_file():
        config, origin = saved, " (saved by an earlier run)"
    data = read_settings_file(config) if config is not None else {}
    source = str(config) if config is not None else "settings"
    named = data.pop("profile", None)
    if named:
        return build_settings(data, str(named), source), f"profile {named}, as {config}{origin} names it"
    if profile:
        return build_settings(data, profile, source), f"profile {profile}, as --profile asks"
    name, extra, why = auto_profile(Path(pool) if pool is not None else Layout.from_env().pool)
    settings = build_settings(_deep_merge(extra, data), name, source)
    unnamed = f" as without settings ({config} names no profile)" if config is not None else ""
    return settings, f"profile {name}, chosen automatically{unnamed}: {why}"


def load_settings(path: Path | None, profile: str | None = None, pool: Path | None = None) -> PipelineSettings:
    """Read a settings YAML (a profile name plus overrides); without a profile
    named (in the file or as ``profile``), the automatic choice for ``pool``
    (:func:`choose_settings`)."""
    return choose_settings(path, profile, pool)[0]


def check_k(settings: PipelineSettings, n_ok: int) -> None:
    """Check the cluster counts against the pool as soon as its ``n_ok`` ok
    samples are counted (after ingest, before embeddings and training): an
    explicit ``semdedup.dedup_k`` or ``dbp.k`` above it raises SettingsError
    naming the setting, the value and the pool size, and suggesting ``auto``.
    (``dbp.k`` is checked exactly against the candidates when ``centroids`` fits.)"""
    settings.semdedup.clusters(n_ok)
    if settings.dbp.k != AUTO:
        DBP_K.clusters(settings.dbp.k, n_ok, "ok samples (the candidates are fewer)")
