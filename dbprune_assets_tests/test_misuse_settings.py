"""Issue 10, defect 4: settings that look valid but are not.

Strict types (``k: true`` is not 1), a settings file without ``profile:``
chosen as if there were no file (and saved with the profile used), and
``auto`` cluster counts that scale with the pool, with explicit ones checked
against the pool before the expensive steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.settings import (
    AUTO,
    DBP_K,
    DEDUP_K,
    SettingsError,
    build_settings,
    check_k,
    choose_settings,
    load_settings,
)
from dbprune_assets.samplepool import GENERATOR

from .conftest import run_cli

# ---------------------------------------------------------------------------
# strict types


@pytest.mark.parametrize("override, fragments", [
    ({"dbp": {"k": True}}, ["dbp.k", "got True", "allowed: dbp.k > 0, or auto"]),
    ({"dbp": {"k": "5"}}, ["dbp.k", "got '5'", "allowed: dbp.k > 0, or auto"]),
    ({"dbp": {"k": "AUTO"}}, ["dbp.k", "got 'AUTO'", "or auto"]),
    ({"dbp": {"k": 2.0}}, ["dbp.k", "got 2.0"]),
    ({"semdedup": {"dedup_k": True}}, ["semdedup.dedup_k", "got True", "allowed: semdedup.dedup_k > 0, or auto"]),
    ({"semdedup": {"dedup_k": 0}}, ["semdedup.dedup_k", "got 0", "allowed: semdedup.dedup_k > 0, or auto"]),
    ({"dbp": {"l": True}}, ["dbp.l", "expected a whole number", "got True (bool)", "allowed: dbp.l > 0"]),
    ({"dbp": {"niter": 10.0}}, ["dbp.niter", "expected a whole number", "got 10.0 (float)"]),
    ({"compute": {"batch_size": "256"}}, ["compute.batch_size", "expected a whole number", "got '256' (str)"]),
    ({"dbp": {"tau": True}}, ["dbp.tau", "expected a number", "got True (bool)", "allowed: dbp.tau > 0"]),
    ({"dbp": {"keep_fraction": "0.5"}}, ["dbp.keep_fraction", "expected a number", "0 < dbp.keep_fraction ≤ 1"]),
    ({"train": {"train_seeds": [0, True]}}, ["train.train_seeds.1", "expected a whole number"]),
    ({"eval": {"zeroshot": 5}}, ["eval.zeroshot", "expected a string", "got 5 (int)"]),
    ({"clip_filter": {"fraction": 2}},
     ["clip_filter.fraction: the value is out of range (got 2; allowed: 0 < clip_filter.fraction ≤ 1, or null)"]),
    ({"clip_filter": {"fraction": 0.5, "threshold": 0.2}},
     ["clip_filter: set exactly one of clip_filter.threshold or clip_filter.fraction"]),
])
def test_wrong_types_are_refused_naming_the_setting(override, fragments):
    with pytest.raises(SettingsError) as e:
        build_settings(override, profile="sample")
    for fragment in fragments:
        assert fragment in str(e.value)
    assert "Value error" not in str(e.value) and "Input should be" not in str(e.value)  # pydantic's words


def test_k_true_in_a_yaml_file_is_refused(tmp_path: Path):
    f = tmp_path / "bool.yaml"
    f.write_text("profile: sample\ndbp:\n  k: true\n")
    with pytest.raises(SettingsError, match=r"bool.yaml:\n  dbp.k: expected a whole number or auto \(got True"):
        load_settings(f)


def test_plain_yaml_values_still_read(tmp_path: Path):
    f = tmp_path / "ok.yaml"
    f.write_text("profile: sample\ndbp:\n  tau: 1\n  k: auto\nsemdedup:\n  dedup_k: auto\n"
                 "selection:\n  strategies: [dbp, full]\ntrain:\n  train_seeds: [3, 4]\n")
    s = load_settings(f)
    assert s.dbp.tau == 1.0 and isinstance(s.dbp.tau, float)
    assert s.dbp.k == AUTO and s.semdedup.dedup_k == AUTO
    assert s.selection.strategies == ("dbp", "full") and s.train.train_seeds == (3, 4)
    saved = tmp_path / "saved.yaml"
    saved.write_text(s.to_yaml())
    assert load_settings(saved) == s  # auto survives the saved config


# ---------------------------------------------------------------------------
# auto k


@pytest.mark.parametrize("n, k", [
    (0, 1), (10, 1), (100, 2), (590, 8), (3000, 8), (1_000_000, 114),
    (440_000_000, 50_000), (2_000_000_000, 50_000),
])
def test_auto_dedup_k(n, k):
    assert DEDUP_K.resolve(n) == k
    assert DEDUP_K.per_cluster == 8_800  # 440M / 50,000


@pytest.mark.parametrize("n, k", [
    (290, 5), (2000, 20), (5_000_000, 20), (38_000_000, 68), (100_000_000, 179),
    (280_000_000, 500), (2_000_000_000, 500),
])
def test_auto_dbp_k(n, k):
    assert DBP_K.resolve(n) == k
    assert DBP_K.per_cluster == 560_000  # 280M / 500


def test_auto_k_is_monotone_and_keeps_clusters_populated():
    for rule in (DEDUP_K, DBP_K):
        ns = np.unique(np.geomspace(50, 5e9, 400).astype(np.int64))
        ks = [rule.resolve(int(n)) for n in ns]
        assert ks == sorted(ks) and ks[-1] == rule.paper_k
        assert all(n / k >= rule.min_members for n, k in zip(ns, ks))


def test_explicit_k_checked_against_the_pool():
    paper = build_settings({}, profile="paper")
    with pytest.raises(SettingsError) as e:
        check_k(paper, 590)
    msg = str(e.value)
    for fragment in ("semdedup.dedup_k", "50000", "590 ok samples", "semdedup.dedup_k: auto (here 8"):
        assert fragment in msg
    big_dbp = build_settings({"semdedup": {"dedup_k": "auto"}, "dbp": {"k": 1000}}, profile="paper")
    with pytest.raises(SettingsError, match=r"dbp.k: 1000 clusters exceeds the candidates this pool can have: .*at "
                                            r"most 295 here \(clip_filter.fraction 0.5 of its 590 ok samples.*dbp.k: auto"):
        check_k(big_dbp, 590)
    # the candidates are at most the CLIP filter's fraction of the ok samples: 0.3 * 590 = 177
    by_fraction = build_settings({"semdedup": {"dedup_k": "auto"}, "dbp": {"k": 200}, "clip_filter": {"fraction": 0.3}},
                                 profile="paper")
    with pytest.raises(SettingsError, match=r"dbp.k: 200 clusters exceeds .* at most 177 here .*well below 177"):
        check_k(by_fraction, 590)
    check_k(by_fraction.model_copy(update={"dbp": by_fraction.dbp.model_copy(update={"k": 177})}), 590)
    check_k(build_settings({"semdedup": {"dedup_k": "auto"}, "dbp": {"k": "auto"}}, profile="paper"), 590)
    check_k(paper, 440_000_000)
    sample = build_settings({}, profile="sample")  # explicit values kept, and they fit the sample pool
    assert (sample.semdedup.dedup_k, sample.dbp.k) == (16, 32)
    check_k(sample, 2900)
    assert sample.dbp.clusters(2000) == 32
    assert paper.dbp.clusters(2000) == 500  # an explicit k at most n stays as written
    with pytest.raises(SettingsError, match=r"dbp.k: 500 clusters exceeds the 300 candidates"):
        paper.dbp.clusters(300)


def _fake_embeddings(layout: Layout, shard: str, n: int, d: int = 16) -> None:
    import polars as pl

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    layout.img_emb(shard).parent.mkdir(parents=True, exist_ok=True)
    np.save(layout.img_emb(shard), x.astype(np.float16))
    layout.emb_metadata(shard).parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"uid": [f"{shard}{i:05d}" for i in range(n)], "shard": [shard] * n,
                  "row": np.arange(n, dtype=np.int32)}).write_parquet(layout.emb_metadata(shard))


def test_fit_centroids_resolves_auto_and_refuses_a_k_above_the_rows(tmp_path: Path):
    from dbprune_assets.core.method import embstore

    layout = Layout(tmp_path / "home", tmp_path / "pool")
    for shard in ("00000", "00001"):
        _fake_embeddings(layout, shard, 295)
    auto = build_settings({"semdedup": {"dedup_k": "auto", "niter": 5}}, profile="paper").semdedup
    fit = embstore.fit_centroids(layout, ["00000", "00001"], "dedup_centroids", None, auto.clusters, auto.niter,
                                 auto.sample_size, auto.seed, False, 1, "test")
    assert (fit.k, fit.seen) == (DEDUP_K.resolve(590), 590) == (8, 590)
    paper = build_settings({}, profile="paper").semdedup
    with pytest.raises(SettingsError, match=r"semdedup.dedup_k: 50000 clusters exceeds the 590 ok samples"):
        embstore.fit_centroids(layout, ["00000", "00001"], "dedup_centroids", None, paper.clusters, 5,
                               paper.sample_size, 0, False, 1, "test")


# ---------------------------------------------------------------------------
# a settings file without `profile:`


@pytest.fixture()
def pools(tmp_path: Path) -> dict[str, Path]:
    """A (fake) generated sample pool, a user pool and a pool not written yet."""
    sample, user = tmp_path / "sample_pool", tmp_path / "user_pool"
    sample.mkdir()
    (sample / "pool_info.json").write_text(json.dumps({"generator": GENERATOR}))
    user.mkdir()
    (user / "00000.parquet").write_bytes(b"")
    return {"sample": sample, "user": user, "none": tmp_path / "absent"}


def test_no_profile_file_is_chosen_as_without_a_file(pools: dict[str, Path], tmp_path: Path):
    f = tmp_path / "noprofile.yaml"
    f.write_text("dbp:\n  tau: 0.2\n")
    for kind, profile in (("sample", "sample"), ("none", "sample"), ("user", "paper")):
        plain, why_plain = choose_settings(pool=pools[kind])
        with_file, why = choose_settings(f, pool=pools[kind])
        assert plain.profile == with_file.profile == profile, kind
        assert with_file == plain.model_copy(update={"dbp": plain.dbp.model_copy(update={"tau": 0.2})})
        assert why.startswith(f"profile {profile}, chosen automatically as without settings ({f} names no profile)")
        assert why_plain.startswith(f"profile {profile}, chosen automatically: ")
        assert load_settings(f, pool=pools[kind]) == with_file
    user, why = choose_settings(f, pool=pools["user"])
    assert (user.semdedup.dedup_k, user.dbp.k) == (AUTO, AUTO)
    assert "your own pool" in why and "auto" in why
    assert "generated sample pool" in choose_settings(f, pool=pools["sample"])[1]


def test_no_profile_file_follows_dbprune_pool(pools: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    f = tmp_path / "noprofile.yaml"
    f.write_text("dbp:\n  k: 64\n")
    monkeypatch.setenv("DBPRUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DBPRUNE_POOL", str(pools["sample"]))
    assert load_settings(f).profile == "sample"
    monkeypatch.setenv("DBPRUNE_POOL", str(pools["user"]))
    s = load_settings(f)  # a user pool: paper, auto dedup_k, the file's own k
    assert (s.profile, s.semdedup.dedup_k, s.dbp.k) == ("paper", AUTO, 64)


def test_named_profile_wins_and_saved_config_keeps_the_choice(pools: dict[str, Path], tmp_path: Path):
    named = tmp_path / "named.yaml"
    named.write_text("profile: paper\n")
    s, why = choose_settings(named, pool=pools["sample"])
    assert (s.profile, s.semdedup.dedup_k, s.dbp.k) == ("paper", 50000, 500)  # the paper's values as is
    assert why == f"profile paper, as {named} names it"
    assert choose_settings(None, "paper", pool=pools["user"])[0].dbp.k == 500
    assert choose_settings(None, "sample", pool=pools["user"])[1] == "profile sample, as --profile asks"

    f = tmp_path / "noprofile.yaml"
    f.write_text("dbp:\n  tau: 0.3\n")
    chosen, _ = choose_settings(f, pool=pools["user"])
    saved = tmp_path / "home" / "config.yaml"  # what `dbprune run` saves
    saved.parent.mkdir()
    saved.write_text(chosen.to_yaml())
    assert yaml.safe_load(saved.read_text())["profile"] == "paper"
    # a later run (no --config) reads the saved file: same settings, even if the pool now looks different
    again, why = choose_settings(pool=pools["sample"], saved=saved)
    assert again == chosen and why == f"profile paper, as {saved} (saved by an earlier run) names it"


def test_current_settings_of_a_user_pool_home(pools: dict[str, Path], tmp_path: Path):
    from dbprune_assets.defs.common import current_settings

    s = current_settings(Layout(tmp_path / "home", pools["user"]))
    assert (s.profile, s.semdedup.dedup_k, s.dbp.k) == ("paper", AUTO, AUTO)
    assert current_settings(Layout(tmp_path / "home", pools["sample"])).profile == "sample"


# ---------------------------------------------------------------------------
# the whole graph on a small user pool, no settings


@pytest.mark.slow
def test_user_pool_without_settings_passes_dedup_centroids(tmp_path: Path):
    """600 rows of real img2dataset-layout shards, not marked as the sample pool:
    ``dbprune run`` with no settings picks paper with auto k and passes
    dedup_centroids (it failed there with ``k=50000 exceeds the 590 samples``)."""
    from dbprune_assets.core.store.layout import UNPARTITIONED
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.core.store.state import read_state
    from dbprune_assets.samplepool import write_sample_pool

    pool, home = tmp_path / "pool", tmp_path / "home"
    write_sample_pool(pool, PoolSettings(shards=2, samples_per_shard=300, concepts=6, image_size=32,
                                         reference_samples=0, eval_per_class=1))
    for extra in ("pool_info.json", "ground_truth.parquet", "eval", "reference"):
        p = pool / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool), "DBPRUNE_PROGRESS": "0"}
    out = run_cli("run", "--select", "*dedup_centroids", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    saved = yaml.safe_load((home / "config.yaml").read_text())
    assert saved["profile"] == "paper"
    assert (saved["semdedup"]["dedup_k"], saved["dbp"]["k"]) == (AUTO, AUTO)
    layout = Layout(home, pool)
    ok = sum(read_state(layout, "raw_metadata", s).summary["status"]["ok"] for s in ("00000", "00001"))
    assert 500 < ok <= 600
    st = read_state(layout, "dedup_centroids", UNPARTITIONED)
    assert st is not None
    assert st.summary["k"] == DEDUP_K.resolve(ok) and st.summary["k_setting"] == AUTO


@pytest.mark.slow
def test_explicit_k_above_a_user_pool_stops_before_the_encoder(tmp_path: Path):
    """An explicit dbp.k larger than the pool is refused once the pool is
    ingested, before the encoder trains or a shard is embedded; the run says
    which profile it chose and why."""
    from dbprune_assets.core.store.layout import UNPARTITIONED
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.core.store.state import read_state
    from dbprune_assets.samplepool import write_sample_pool

    pool, home = tmp_path / "pool", tmp_path / "home"
    write_sample_pool(pool, PoolSettings(shards=2, samples_per_shard=60, concepts=4, image_size=32,
                                         reference_samples=0, eval_per_class=1))
    for extra in ("pool_info.json", "ground_truth.parquet", "eval", "reference"):
        p = pool / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    config = tmp_path / "k.yaml"
    config.write_text("dbp:\n  k: 5000\n")
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool), "DBPRUNE_PROGRESS": "0"}
    out = run_cli("run", "--config", str(config), env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"dbprune: profile paper, chosen automatically as without settings ({config} names no profile)" in out.stdout
    assert "dbp.k: 5000 clusters exceeds the" in out.stdout and "dbp.k: auto" in out.stdout
    layout = Layout(home, pool)
    assert all(read_state(layout, "raw_metadata", s) is not None for s in ("00000", "00001"))
    assert read_state(layout, "encoder", UNPARTITIONED) is None  # nothing was trained
    emb = home / "embeddings" / "img_emb"
    assert not emb.exists() or not any(emb.iterdir())  # nor embedded


def test_eval_folders_are_checked_before_any_run(tmp_path: Path):
    """A wrong evaluation folder is refused up front, naming it, not after training."""
    from dbprune_assets.cli import preflight

    (tmp_path / "old_layout").mkdir()
    (tmp_path / "old_layout" / "templates.txt").write_text("a photo of a {}.\n")
    layout = Layout(tmp_path / "home", tmp_path / "pool")
    for folder, fragment in ((tmp_path / "absent", "no such folder"), (tmp_path / "old_layout", "old_layout")):
        s = build_settings({"eval": {"datasets": [str(folder)]}}, profile="sample")
        with pytest.raises(SettingsError, match="eval.datasets: ") as info:
            preflight(layout, s)
        assert fragment in str(info.value) and str(folder) in str(info.value)


def test_an_unknown_embedding_source_is_refused_before_any_run(tmp_path: Path):
    """``dbprune run --config`` with a source nobody registered stops up front, naming the setting."""
    config = tmp_path / "s.yaml"
    config.write_text("profile: sample\nembeddings: {source: parquet_only}\n")
    out = run_cli("run", "--config", str(config), env={"DBPRUNE_HOME": str(tmp_path / "home")})
    assert out.returncode == 2, out.stderr
    assert "embeddings.source: 'parquet_only' is no embedding source; allowed: compute, datacomp, clip_retrieval" \
        in out.stderr
    assert not (tmp_path / "home" / "dagster").exists()  # no run was started


def test_a_huge_bad_value_makes_a_one_line_error(tmp_path: Path):
    config = tmp_path / "big.yaml"
    config.write_text("dbp:\n  k: " + "x" * 5_000_000 + "\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    text = str(info.value)
    assert len(text) < 1000 and "dbp.k" in text and "(5,000,002 characters)" in text, text[:2000]


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines[:-1]) + "\ndbp: {k: *i}\n")
    assert len(config.read_bytes()) < 1000  # about the size of the file that ran to 3 GB
    with pytest.raises(SettingsError, match="more than 64 aliases"):
        load_settings(config)
    few = tmp_path / "few.yaml"  # a few aliases are fine
    few.write_text("profile: sample\ndefaults: &d {niter: 10}\n")
    with pytest.raises(SettingsError, match="defaults: unknown setting"):
        load_settings(few)
