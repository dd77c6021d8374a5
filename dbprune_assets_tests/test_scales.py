"""``train.scale``: DataComp's per-scale training values, their precedence
against the profile and the file's own keys, and what gets saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dbprune_assets.core.models.scales import SCALED_KEYS, SCALES, deviations, get_scale
from dbprune_assets.core.settings import SettingsError, TrainSettings, build_settings, choose_settings

# Copied verbatim from DataComp's scale_configs.py, SCALE_CONFIGS:
# https://github.com/mlfoundations/datacomp/blob/4a8df1992566ef8334773f7152e1855b1f716162/scale_configs.py
# (commit 4a8df1992566ef8334773f7152e1855b1f716162; the file last changed in e3214a5, July 2023)
DATACOMP_SCALE_CONFIGS = {
    "debug": {
        "batch_size": 1024,
        "learning_rate": 1e-4,
        "train_num_samples": 128_000,
        "warmup": 500,
        "model": "ViT-B-32",
        "beta2": None,
    },
    "small": {
        "batch_size": 4096,
        "learning_rate": 5e-4,
        "train_num_samples": 12_800_000,
        "warmup": 500,
        "model": "ViT-B-32",
        "beta2": None,
    },
    "medium": {
        "batch_size": 4096,
        "learning_rate": 5e-4,
        "train_num_samples": 128_000_000,
        "warmup": 500,
        "model": "ViT-B-32",
        "beta2": None,
    },
    "large": {
        "batch_size": 8192,
        "learning_rate": 5e-4,
        "train_num_samples": 1_280_000_000,
        "warmup": 500,
        "model": "ViT-B-16",
        "beta2": None,
    },
    "xlarge": {
        "batch_size": 90112,
        "learning_rate": 1e-3,
        "train_num_samples": 12_800_000_000,
        "warmup": 10000,
        "model": "ViT-L-14",
        "beta2": 0.95,
    },
}
#: DataComp's beta2 None = open_clip_train's get_default_params for a "vit" model: beta2 0.98
OPEN_CLIP_VIT_BETA2 = 0.98


def _expected(cfg: dict) -> dict:
    """DataComp's keys under dbprune's names."""
    return {
        "model": cfg["model"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["learning_rate"],
        "samples_seen": cfg["train_num_samples"],
        "warmup": cfg["warmup"],
        "beta2": OPEN_CLIP_VIT_BETA2 if cfg["beta2"] is None else cfg["beta2"],
    }


def _train_values(train) -> dict:
    return {k: getattr(train, k) for k in SCALED_KEYS}


def test_table_is_datacomps() -> None:
    assert list(SCALES) == list(DATACOMP_SCALE_CONFIGS) == ["debug", "small", "medium", "large", "xlarge"]
    for name, cfg in DATACOMP_SCALE_CONFIGS.items():
        s = get_scale(name)
        assert {k: getattr(s, k) for k in cfg} == cfg, name  # every key DataComp sets, nothing more
    with pytest.raises(ValueError, match="unknown scale 'tiny'; allowed: debug, small, medium, large, xlarge"):
        get_scale("tiny")


@pytest.mark.parametrize("name", list(DATACOMP_SCALE_CONFIGS))
def test_train_scale_resolves_to_datacomps_values(name: str) -> None:
    for profile in ("paper", "sample"):  # the scale beats either profile's train values
        s = build_settings({"train": {"scale": name}}, profile)
        assert s.train.scale == name
        assert _train_values(s.train) == _expected(DATACOMP_SCALE_CONFIGS[name]), (profile, name)
    assert _train_values(TrainSettings(scale=name)) == _expected(DATACOMP_SCALE_CONFIGS[name])


def test_small_by_hand() -> None:
    t = build_settings({"train": {"scale": "small"}}).train
    assert (t.model, t.batch_size, t.lr, t.samples_seen, t.warmup, t.beta2) == ("ViT-B-32", 4096, 5e-4, 12_800_000, 500, 0.98)


def test_explicit_keys_beat_the_scale() -> None:
    t = build_settings({"train": {"scale": "small", "batch_size": 1024, "lr": 1e-3, "workers": 2}}).train
    assert (t.batch_size, t.lr, t.workers) == (1024, 1e-3, 2)
    assert (t.model, t.samples_seen, t.warmup, t.beta2) == ("ViT-B-32", 12_800_000, 500, 0.98)  # the rest: small
    assert deviations(t.model_dump()) == ["batch_size 1024 (DataComp small: 4096)", "lr 0.001 (DataComp small: 0.0005)"]
    assert deviations(build_settings({"train": {"scale": "small"}}).train.model_dump()) == []


def test_profiles_keep_their_scale() -> None:
    sample = build_settings({}, "sample").train  # the sample profile keeps its tiny training
    assert sample.scale is None and (sample.model, sample.samples_seen, sample.batch_size) == ("dbprune-tiny", 12800, 128)
    assert deviations(sample.model_dump()) == []
    paper = build_settings({}, "paper").train  # the paper's DataComp setting is DataComp-Medium
    assert paper.scale == "medium" and _train_values(paper) == _expected(DATACOMP_SCALE_CONFIGS["medium"])
    # a scale on the sample profile sets only the scaled keys: its precision, workers and seeds stay
    t = build_settings({"train": {"scale": "small"}}, "sample").train
    assert (t.precision, t.workers, t.train_seeds) == ("fp32", 1, (0, 1, 2))
    # without a scale, a file's train keys override the profile's as any setting does
    t = build_settings({"train": {"batch_size": 64}}, "sample").train
    assert (t.scale, t.model, t.batch_size) == (None, "dbprune-tiny", 64)
    # paper's medium stays named, and the change is a deviation from it
    t = build_settings({"train": {"batch_size": 2048}}, "paper").train
    assert (t.scale, t.batch_size) == ("medium", 2048) and deviations(t.model_dump()) == ["batch_size 2048 (DataComp medium: 4096)"]


def test_saved_settings_hold_the_resolved_values_and_reload_the_same(tmp_path: Path) -> None:
    s = build_settings({"train": {"scale": "large", "warmup": 100}}, "sample")
    saved = yaml.safe_load(s.to_yaml())["train"]
    assert saved["scale"] == "large"
    assert {k: saved[k] for k in SCALED_KEYS} == {**_expected(DATACOMP_SCALE_CONFIGS["large"]), "warmup": 100}
    (tmp_path / "config.yaml").write_text(s.to_yaml())
    again, _ = choose_settings(saved=tmp_path / "config.yaml", pool=tmp_path / "nopool")
    assert again == s and again.train.model_dump() == s.train.model_dump()


@pytest.mark.parametrize(
    ("train", "found"),
    [
        ({"scale": "tiny"}, ["train.scale", "'debug', 'small', 'medium', 'large' or 'xlarge'"]),
        ({"scale": 1}, ["train.scale"]),
        ({"scale": "small", "beta2": 1.0}, ["train.beta2", "0 < train.beta2 < 1"]),
    ],
)
def test_bad_scale_settings_name_the_setting(train: dict, found: list[str]) -> None:
    with pytest.raises(SettingsError) as err:
        build_settings({"train": train}, "sample")
    for text in found:
        assert text in str(err.value), str(err.value)
