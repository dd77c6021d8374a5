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

The sections and their defaults are in :mod:`.sections`; profiles, files, the
automatic choice and the error messages in :mod:`.loading`.
"""

from dbprune_assets.core.settings.loading import (DATACOMP_OVERRIDES, GENERATED_DATACOMP_OVERRIDES,
                                                  USER_POOL_OVERRIDES, auto_profile, build_settings, check_k,
                                                  changed_settings, choose_settings, load_settings, profile_dict,
                                                  read_settings_file)
from dbprune_assets.core.settings.sections import (AUTO, DBP_K, DEDUP_K, PROFILES, STRATEGIES, AutoK,
                                                   BootstrapSettings, ClipFilterSettings, Clusters, ComputeSettings,
                                                   DbpSettings, Device, DriftSettings, EmbeddingsSettings, EncoderSettings,
                                                   EncoderSpec, EvalSettings, ExportSettings, IngestSettings,
                                                   PartitionSettings, PipelineSettings, PoolSettings,
                                                   SelectionSettings, SemDedupSettings, SettingsError, TrainSettings)

__all__ = [
    "AUTO", "DATACOMP_OVERRIDES", "DBP_K", "DEDUP_K", "GENERATED_DATACOMP_OVERRIDES", "PROFILES", "STRATEGIES",
    "USER_POOL_OVERRIDES", "AutoK", "BootstrapSettings", "ClipFilterSettings", "Clusters", "ComputeSettings",
    "DbpSettings", "Device", "DriftSettings", "EmbeddingsSettings", "EncoderSettings", "EncoderSpec", "EvalSettings",
    "ExportSettings", "IngestSettings", "PartitionSettings", "PipelineSettings", "PoolSettings",
    "SelectionSettings", "SemDedupSettings", "SettingsError", "TrainSettings", "auto_profile", "build_settings",
    "changed_settings", "check_k", "choose_settings", "load_settings", "profile_dict", "read_settings_file",
]
