"""Precomputed embedding sources on hand-made files: alignment, dtype, every bad input."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.sources import (
    SourceError,
    bad_rows,
    check_dim,
    clip_retrieval_parts,
    clip_scores,
    link,
    read_clip_retrieval,
    read_datacomp,
)


def _unit(rng, n, d, dtype=np.float16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _datacomp(tmp_path, n=4, keys=("b32_img", "b32_txt", "l14_img", "l14_txt"), rows=None):
    rng = np.random.default_rng(0)
    uids = [f"{i:032x}" for i in range(n)]
    pl.DataFrame({"uid": uids, "text": [f"caption {i}" for i in range(n)]}).write_parquet(tmp_path / "0000.parquet")
    arrays = {k: _unit(rng, rows or n, 512 if k.startswith("b32") else 768) for k in keys}
    np.savez(tmp_path / "0000.npz", **arrays)
    return uids, arrays


def test_datacomp_rows_keep_their_dtype_and_order(tmp_path):
    uids, arrays = _datacomp(tmp_path)
    rows = read_datacomp(tmp_path / "0000.parquet", "b32")
    assert list(rows.ids) == uids
    assert rows.img.dtype == np.float16 and rows.dim == 512
    np.testing.assert_array_equal(rows.txt, arrays["b32_txt"])


@pytest.mark.parametrize("case, words", [
    ("no_npz", ["0000.npz is missing", "download_upstream"]),
    ("no_key", ["has no ['l14_img', 'l14_txt']", "embeddings.model"]),
    ("rows", ["4 metadata rows but 3 image", "rows aligned"]),
])
def test_datacomp_errors_name_file_values_and_fix(tmp_path, case, words):
    if case == "no_npz":
        _datacomp(tmp_path)
        (tmp_path / "0000.npz").unlink()
    elif case == "no_key":
        _datacomp(tmp_path, keys=("b32_img", "b32_txt"))
    else:
        _datacomp(tmp_path, rows=3)
    with pytest.raises(SourceError) as err:
        read_datacomp(tmp_path / "0000.parquet", "l14")
    for w in words:
        assert w in str(err.value)


def test_clip_retrieval_parts_in_numeric_order_and_key_from_image_path(tmp_path):
    rng = np.random.default_rng(1)
    for sub in ("img_emb", "text_emb", "metadata"):
        (tmp_path / sub).mkdir()
    for part in (0, 2, 10):
        np.save(tmp_path / "img_emb" / f"img_emb_{part}.npy", _unit(rng, 2, 8))
        np.save(tmp_path / "text_emb" / f"text_emb_{part}.npy", _unit(rng, 2, 8))
        pl.DataFrame({"image_path": [f"/x/{part:05d}/{part:05d}{i:04d}.jpg" for i in range(2)]}).write_parquet(
            tmp_path / "metadata" / f"metadata_{part}.parquet")
    assert clip_retrieval_parts(tmp_path) == ["0", "2", "10"]
    rows = read_clip_retrieval(tmp_path, "10")
    assert list(rows.ids) == ["000100000", "000100001"]
    (tmp_path / "text_emb" / "text_emb_2.npy").unlink()
    with pytest.raises(SourceError, match="text_emb_2.npy is missing"):
        read_clip_retrieval(tmp_path, "2")


def test_bad_rows_flags_nan_inf_and_zero_norm_in_either_modality():
    img = np.eye(5, 4, dtype=np.float16)
    txt = np.eye(5, 4, dtype=np.float16)
    img[1, 0] = np.nan
    txt[2, 0] = np.inf
    img[3] = 0
    txt[4] = 0  # row 4 of eye(5, 4) is zero in img already; zero text too
    assert bad_rows(img, txt).tolist() == [False, True, True, True, True]


def test_clip_scores_are_cosines_of_the_stored_pair():
    img = np.array([[3.0, 4.0], [1.0, 0.0]], np.float16)
    txt = np.array([[3.0, 4.0], [0.0, 2.0]], np.float16)
    np.testing.assert_allclose(clip_scores(img, txt), [1.0, 0.0], atol=1e-6)


def test_link_finds_rows_marks_missing_and_refuses_duplicates():
    assert link(np.array(["c", "a", "z"]), np.array(["a", "b", "c"]), "f").tolist() == [2, 0, -1]
    assert link(np.array(["a"]), np.array([], dtype=object), "f").tolist() == [-1]
    with pytest.raises(SourceError, match="'b' appears 2 times"):
        link(np.array(["a"]), np.array(["b", "a", "b"]), "f.npz")


def test_dimension_change_between_shards_is_an_error():
    assert check_dim(512, None, "a") == 512
    with pytest.raises(SourceError, match="768-d but earlier shards were 512-d"):
        check_dim(768, 512, "b.npz")
