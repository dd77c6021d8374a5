"""Reading settings: profiles, settings files, the automatic profile choice,
and validation errors as messages that name the setting and what it allows."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dbprune_assets.core.models.scales import layer_scale
from dbprune_assets.core.settings.sections import AUTO, PROFILES, PipelineSettings, SettingsError
from dbprune_assets.core.store.layout import Layout


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
        elif e["type"] == "value_error":  # a check of ours: its own words, without pydantic's "Value error, "
            msg = str(msg).removeprefix("Value error, ")
        elif e["type"] in _RANGE_ERRORS and (allowed := _allowed_range(e["loc"])):
            msg = f"the value is out of range (got {shown(got)}; allowed: {allowed})"
        elif e["type"] in ("clusters_type", "clusters_range"):
            msg = f"{msg} (got {shown(got)}; allowed: {loc} > 0, or auto)"
        elif e["type"] in _TYPE_ERRORS:
            allowed = _allowed_range(e["loc"])
            msg = (f"expected {_TYPE_ERRORS[e['type']]}, got {shown(got)} ({type(got).__name__})"
                   + (f"; allowed: {allowed}" if allowed else ""))
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


#: how much of a bad value an error echoes
SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARS` with its full length said:
    a 50 MB string in a settings file makes a one-line error, not a 50 MB one."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) < 100 else f"<{type(value).__name__}>"
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS - 20]}… ({len(text):,} characters)"


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


#: YAML aliases (``*name``) a settings file may use: a few are handy, thousands are a
#: "billion laughs" file that expands to gigabytes once its values are validated
MAX_ALIASES = 64


class SettingsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses more than :data:`MAX_ALIASES` aliases."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name), the last at line {mark.line + 1}: "
                                     "refused, since aliases of aliases expand exponentially; write the values out")
        return super().compose_node(parent, index)


def read_settings_file(path: Path) -> dict[str, Any]:
    """The mapping of a settings YAML; SettingsError when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"--config {path}: no such file")
    try:
        data = yaml.load(path.read_text(), Loader=SettingsLoader) or {}
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


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_settings(saved: Path, now: PipelineSettings) -> list[str]:
    """``setting: before → now`` for each setting of ``now`` that differs from
    the ``saved`` settings file (an earlier run's ``config.yaml``); none when
    there is no such file or it no longer reads (it is replaced anyway)."""
    if not Path(saved).is_file():
        return []
    try:
        before = _flat(load_settings(Path(saved)).model_dump(mode="json"))
    except Exception:  # an older dbprune's file, or one edited by hand: nothing to compare with
        return []
    after = _flat(now.model_dump(mode="json"))
    return [f"{key}: {shown(before.get(key))} → {shown(value)}" for key, value in after.items()
            if before.get(key) != value]


def check_k(settings: PipelineSettings, n_ok: int) -> None:
    """Check the cluster counts against the pool as soon as its ``n_ok`` ok
    samples are counted (after ingest, before embeddings and training): an
    explicit ``semdedup.dedup_k`` or ``dbp.k`` above it raises SettingsError
    naming the setting, the value and the pool size, and suggesting ``auto``.
    ``dbp.k`` clusters the candidates, not known yet: it is checked here
    against the most there can be (the CLIP filter's ``fraction`` of the ok
    samples; SemDeDup keeps fewer), and exactly when ``centroids`` fits."""
    settings.semdedup.clusters(n_ok)
    if settings.dbp.k != AUTO:
        fraction = settings.clip_filter.fraction
        most = n_ok if fraction is None else min(n_ok, math.ceil(fraction * n_ok))
        if int(settings.dbp.k) > most:
            cap = f"clip_filter.fraction {fraction:g} of its {n_ok} ok samples" if fraction is not None else \
                f"its {n_ok} ok samples"
            raise SettingsError(
                f"dbp.k: {settings.dbp.k} clusters exceeds the candidates this pool can have: DBP clusters the samples "
                f"SemDeDup and the CLIP filter keep, at most {most} here ({cap}; SemDeDup removes more); set dbp.k: "
                f"auto (scaled to the candidates once they are known) or well below {most}")
