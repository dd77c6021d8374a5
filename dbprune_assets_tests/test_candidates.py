"""Candidates = dedup survivors passing the CLIP filter, written per shard."""

from pathlib import Path

import polars as pl
import pytest

from dbprune_assets.core.method.candidates import select_candidates


def _meta(tmp: Path, shard: str, rows: list[int], scores: list[float]) -> Path:
    p = tmp / f"meta-{shard}.parquet"
    pl.DataFrame({"uid": [f"{shard}-{r}" for r in rows], "shard": [shard] * len(rows), "key": [str(r) for r in rows],
                  "row": rows, "clip_score": scores}, schema_overrides={"clip_score": pl.Float32}).write_parquet(p)
    return p


@pytest.fixture()
def pool(tmp_path: Path):
    # shard a: parquet rows 0, 2, 3, 5 are ok (rows 1 and 4 failed ingest); emb rows 0..3
    metas = {"a": _meta(tmp_path, "a", [0, 2, 3, 5], [0.9, 0.1, 0.5, 0.7]),
             "b": _meta(tmp_path, "b", [0, 1, 2], [0.8, 0.3, 0.6]),
             "c": _meta(tmp_path, "c", [0], [0.2])}
    dups = tmp_path / "dups.parquet"
    pl.DataFrame({"uid": ["a-5", "b-0"], "shard": ["a", "b"], "duplicate_of": ["a-0", "a-0"],
                  "similarity": [0.99, 0.98]}).write_parquet(dups)
    return metas, dups


def test_fraction_rule(tmp_path: Path, pool):
    metas, dups = pool
    out = tmp_path / "cand"
    # survivors: a-0 .9, a-2 .1, a-3 .5, b-1 .3, b-2 .6, c-0 .2 (6); top 0.5 -> ceil(3) -> >= 0.5
    s = select_candidates(metas, [dups], out, tmp_path / "tmp", threshold=None, fraction=0.5)
    assert (s.ok, s.duplicates, s.survivors, s.candidates) == (8, 2, 6, 3)
    assert s.threshold == pytest.approx(0.5)
    a = pl.read_parquet(out / "a.parquet")
    assert a["uid"].to_list() == ["a-0", "a-3"]
    assert a["row"].to_list() == [0, 3]  # parquet rows
    assert a["emb_row"].to_list() == [0, 2]  # rows of the embedding arrays
    assert pl.read_parquet(out / "b.parquet")["uid"].to_list() == ["b-2"]
    c = pl.read_parquet(out / "c.parquet")  # nothing survives: an empty, typed file
    assert c.height == 0 and c.columns == ["uid", "shard", "row", "emb_row", "clip_score"]
    assert s.per_shard == {"a": 2, "b": 1, "c": 0}


def test_absolute_threshold_keeps_ties(tmp_path: Path, pool):
    metas, dups = pool
    s = select_candidates(metas, [dups], tmp_path / "cand", tmp_path / "tmp", threshold=0.3, fraction=None)
    kept = sorted(pl.concat([pl.read_parquet(p) for p in (tmp_path / "cand").glob("*.parquet")])["uid"].to_list())
    assert kept == ["a-0", "a-3", "b-1", "b-2"] and s.threshold == pytest.approx(0.3)


def test_rerun_replaces_files(tmp_path: Path, pool):
    metas, dups = pool
    out = tmp_path / "cand"
    select_candidates(metas, [dups], out, tmp_path / "tmp", threshold=None, fraction=1.0)
    assert pl.read_parquet(out / "a.parquet").height == 3
    select_candidates(metas, [dups], out, tmp_path / "tmp", threshold=0.85, fraction=None)
    assert pl.read_parquet(out / "a.parquet")["uid"].to_list() == ["a-0"]
    assert not list((tmp_path / "tmp").glob("candidates-*"))
