"""DataComp's training scales, so a subset dbprune trains is comparable with
that scale's leaderboard.

``train.scale: debug | small | medium | large | xlarge`` sets the training
hyper-parameters DataComp fixes per scale, copied from DataComp's
``scale_configs.py`` (``SCALE_CONFIGS``, read by ``get_scale_config``):

https://github.com/mlfoundations/datacomp/blob/4a8df1992566ef8334773f7152e1855b1f716162/scale_configs.py

(the file last changed in e3214a53607e2fbf55684683d12c3aff9f445e9b, July 2023).
DataComp's ``train.py`` passes them to open_clip_train as ``--model``,
``--batch-size`` (global batch / GPUs), ``--lr``, ``--train-num-samples``
(over all its checkpoints), ``--warmup`` and, when not ``None``, ``--beta2``.
Those six keys are all of a scale's config: weight decay, beta1, eps, the
precision and the number of GPUs are not set per scale (DataComp leaves
``--wd`` at open_clip_train's 0.2 and betas/eps at its ViT defaults
0.9 / 0.98 / 1e-6).  ``beta2: None`` means open_clip_train's default, 0.98 for
the ViTs every scale trains, so it resolves to 0.98 here (dbprune passes the
betas explicitly: open_clip_train picks its defaults from the model *name*,
which a ``local-dir:`` path lacks).  ``debug`` is DataComp's own (a 128k-sample
smoke scale), not a dbprune invention.

Mapping to :class:`~dbprune_assets.core.settings.TrainSettings`:
``model`` -> ``model``, ``batch_size`` -> ``batch_size`` (global),
``learning_rate`` -> ``lr``, ``train_num_samples`` -> ``samples_seen``,
``warmup`` -> ``warmup`` (steps), ``beta2`` -> ``beta2``.

Precedence (lowest first): the profile's ``train`` values, then the scale's,
then the keys the settings file itself sets in its ``train`` section.  So
``train: {scale: small, batch_size: 1024}`` is small with a 1024 batch, and a
profile's own ``train.model`` never hides the scale a file asks for.  The
resolved values are what the settings hold, save to ``config.yaml`` and
fingerprint; a training run notes every value that differs from its scale's.
No torch here: imported by the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

#: DataComp's scale_configs.py, at the commit this table was copied from
DATACOMP_SCALE_CONFIGS_URL = (
    "https://github.com/mlfoundations/datacomp/blob/4a8df1992566ef8334773f7152e1855b1f716162/scale_configs.py"
)

ScaleName = Literal["debug", "small", "medium", "large", "xlarge"]
SCALE_NAMES: tuple[str, ...] = ("debug", "small", "medium", "large", "xlarge")

#: open_clip_train's AdamW beta2 for a ViT (``get_default_params``): DataComp's ``beta2: None``
OPEN_CLIP_VIT_BETA2 = 0.98


@dataclass(frozen=True)
class Scale:
    """One row of DataComp's ``SCALE_CONFIGS``, with DataComp's key names."""

    name: str
    model: str
    batch_size: int  # global batch
    learning_rate: float
    train_num_samples: int  # samples seen over the whole run
    warmup: int  # steps
    beta2: float | None  # None: open_clip_train's default (0.98 for a ViT)

    def train_values(self) -> dict[str, Any]:
        """The :class:`TrainSettings` fields this scale sets, by their dbprune names."""
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "lr": self.learning_rate,
            "samples_seen": self.train_num_samples,
            "warmup": self.warmup,
            "beta2": OPEN_CLIP_VIT_BETA2 if self.beta2 is None else self.beta2,
        }


# copied from DataComp's scale_configs.py (URL above); "debug" is DataComp's too
SCALES: dict[str, Scale] = {
    "debug": Scale("debug", "ViT-B-32", 1024, 1e-4, 128_000, 500, None),
    "small": Scale("small", "ViT-B-32", 4096, 5e-4, 12_800_000, 500, None),
    "medium": Scale("medium", "ViT-B-32", 4096, 5e-4, 128_000_000, 500, None),
    "large": Scale("large", "ViT-B-16", 8192, 5e-4, 1_280_000_000, 500, None),
    "xlarge": Scale("xlarge", "ViT-L-14", 90112, 1e-3, 12_800_000_000, 10000, 0.95),
}

#: the TrainSettings fields a scale sets
SCALED_KEYS: tuple[str, ...] = ("model", "batch_size", "lr", "samples_seen", "warmup", "beta2")


def get_scale(name: str) -> Scale:
    """DataComp's scale ``name``; ValueError naming the allowed ones."""
    if name not in SCALES:
        raise ValueError(f"train.scale: unknown scale {name!r}; allowed: {', '.join(SCALE_NAMES)} (DataComp's)")
    return SCALES[name]


def resolve_train(section: Any) -> Any:
    """A ``train`` settings mapping with its ``scale`` filled in: every scaled
    key the mapping lacks gets the scale's value; keys it has win.  Anything
    but a mapping naming a known scale is returned unchanged (validation then
    reports it)."""
    if not isinstance(section, Mapping):
        return section
    name = section.get("scale")
    if not isinstance(name, str) or name not in SCALES:
        return section
    return {**SCALES[name].train_values(), **section}


def layer_scale(profile: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The profile's settings with the scaled ``train`` keys removed when
    ``overrides`` (the settings file) names a ``train.scale``: the scale a
    file asks for beats the profile's values; the file's own keys still beat
    the scale (:func:`resolve_train`)."""
    out = dict(profile)
    train = overrides.get("train")
    if isinstance(train, Mapping) and train.get("scale") is not None and isinstance(out.get("train"), Mapping):
        out["train"] = {k: v for k, v in out["train"].items() if k not in SCALED_KEYS}
    return out


def deviations(values: Mapping[str, Any]) -> list[str]:
    """What ``values`` (a resolved train section, or TrainSettings' dump) sets
    differently from its scale, as ``"batch_size 1024 (DataComp small: 4096)"``;
    empty without a scale."""
    name = values.get("scale")
    if name is None:
        return []
    ref = get_scale(str(name)).train_values()
    return [f"{k} {values[k]!r} (DataComp {name}: {ref[k]!r})" for k in SCALED_KEYS if k in values and values[k] != ref[k]]
