"""Settings: profiles load, unknown keys and bad values fail naming the setting."""

from pathlib import Path

import pytest

from dbprune_assets.core.settings import STRATEGIES, SettingsError, build_settings, load_settings


def test_profiles_load_and_differ():
    paper = build_settings({}, profile="paper")
    sample = build_settings({}, profile="sample")
    assert paper.profile == "paper" and sample.profile == "sample"
    assert paper.dbp.k == 500 and paper.dbp.l == 20 and paper.dbp.tau == 0.1
    assert paper.semdedup.eps == 0.07 and paper.dbp.r == 0.0
    assert sample.dbp.k < paper.dbp.k
    assert sample.encoder.cluster_encoder.is_bootstrap
    assert sample.encoder.score == sample.encoder.cluster_encoder  # same model by default
    assert set(sample.selection.strategies) == set(STRATEGIES)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"dbp": {"k": 0}}, "dbp.k"),
        ({"dbp": {"tau": 0}}, "dbp.tau"),
        ({"dbp": {"keep_fraction": 1.5}}, "dbp.keep_fraction"),
        ({"dbp": {"keep_fraction": 0}}, "dbp.keep_fraction"),
        ({"dbp": {"keep_fraction": None}}, "exactly one of dbp.keep_fraction or dbp.target_size"),
        ({"selection": {"strategies": ["dbp", "magic"]}}, "unknown strategy"),
        ({"dbp": {"kk": 3}}, "dbp.kk: unknown setting"),
        ({"semdedup": {"eps": 1.5}}, "semdedup.eps"),
        ({"clip_filter": {"threshold": 0.2}}, "exactly one of clip_filter.threshold or clip_filter.fraction"),
        ({"compute": {"device": "tpu"}}, "compute.device"),
    ],
)
def test_bad_values_name_the_setting(override, fragment):
    with pytest.raises(SettingsError) as e:
        build_settings(override, profile="sample")
    assert fragment in str(e.value)


def test_unknown_strategy_lists_allowed():
    with pytest.raises(SettingsError) as e:
        build_settings({"selection": {"strategies": ["nope"]}})
    assert "allowed: dbp, ssp, random, clip_score, semdedup, full" in str(e.value)


def test_unknown_profile():
    with pytest.raises(SettingsError, match="allowed: paper, sample"):
        build_settings({"profile": "huge"})


def test_yaml_roundtrip(tmp_path: Path):
    s = build_settings({"dbp": {"k": 7, "keep_fraction": None, "target_size": 100}}, profile="sample")
    f = tmp_path / "c.yaml"
    f.write_text(s.to_yaml())
    again = load_settings(f)
    assert again == s
    assert again.dbp.target_size == 100 and again.dbp.keep_fraction is None


def test_load_settings_errors(tmp_path: Path):
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("profile: sample\ndbp:\n  tua: 0.2\n")
    with pytest.raises(SettingsError, match=r"typo.yaml.*\n.*dbp.tua: unknown setting"):
        load_settings(typo)


def test_changed_settings_lists_what_a_config_changes_against_the_saved_file(tmp_path: Path) -> None:
    """``--config`` replaces the saved settings; the run says what that changes."""
    from dbprune_assets.core.settings import changed_settings

    saved = tmp_path / "config.yaml"
    before = build_settings({"clip_filter": {"fraction": 0.5}}, profile="sample")
    saved.write_text(before.to_yaml())
    now = build_settings({"dbp": {"k": 16}}, profile="sample")  # fraction back to the profile's
    assert changed_settings(saved, now) == [
        f"clip_filter.fraction: 0.5 → {now.clip_filter.fraction!r}", f"dbp.k: {before.dbp.k!r} → 16"]
    assert changed_settings(saved, before) == []
    assert changed_settings(tmp_path / "none.yaml", now) == []
    (tmp_path / "bad.yaml").write_text("dbp: {k: [1, 2]}\n")
    assert changed_settings(tmp_path / "bad.yaml", now) == []
