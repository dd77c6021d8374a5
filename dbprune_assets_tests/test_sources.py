"""Precomputed embedding sources on hand-made files: alignment, dtype, every bad input."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.pool.sources.readers import (
    SourceError,
    bad_rows,
    check_dim,
    clip_retrieval_id,
    clip_retrieval_id_sql,
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


def _cr_part(folder, part, rng, image_paths, uids=None, rows=None):
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(exist_ok=True)
    np.save(folder / "img_emb" / f"img_emb_{part}.npy", _unit(rng, rows or len(image_paths), 8))
    np.save(folder / "text_emb" / f"text_emb_{part}.npy", _unit(rng, len(image_paths), 8))
    cols = {"image_path": image_paths, "caption": ["c"] * len(image_paths), **({"uid": uids} if uids else {})}
    pl.DataFrame(cols).write_parquet(folder / "metadata" / f"metadata_{part}.parquet")


def test_clip_retrieval_parts_in_numeric_order_as_the_files_spell_them(tmp_path):
    """clip-retrieval zero-pads N to the digits of its partition count (img_emb_007.npy)."""
    rng = np.random.default_rng(1)
    for part in ("000", "002", "010"):
        _cr_part(tmp_path, part, rng, [f"{part}{i}" for i in range(2)])
    assert clip_retrieval_parts(tmp_path) == ["000", "002", "010"]
    (tmp_path / "metadata" / "metadata_002.parquet").unlink()
    with pytest.raises(SourceError, match=r"metadata/metadata_002.parquet is missing: .*or remove part 002's"):
        clip_retrieval_parts(tmp_path)
    np.save(tmp_path / "text_emb" / "text_emb_011.npy", _unit(rng, 1, 8))  # a part without its image file
    (tmp_path / "metadata" / "metadata_002.parquet").touch()
    with pytest.raises(SourceError, match=r"img_emb/img_emb_011.npy is missing"):
        clip_retrieval_parts(tmp_path)
    with pytest.raises(SourceError, match=r"has no img_emb/img_emb_N.npy: point embeddings.path"):
        clip_retrieval_parts(tmp_path / "nothing")


def test_clip_retrieval_ids_are_the_webdataset_key_or_the_uid(tmp_path):
    """Webdataset input: image_path is the sample's __key__, kept as is; a folder
    of files: the image's path, whose stem is the key; a uid column wins."""
    rng = np.random.default_rng(2)
    _cr_part(tmp_path, "0", rng, ["000010000", "000010001"])
    _cr_part(tmp_path, "1", rng, ["/data/x/00001/000010002.jpg", "y/000010003.webp"])
    _cr_part(tmp_path, "2", rng, ["000010004", "000010005"], uids=["a" * 32, "b" * 32])
    assert list(read_clip_retrieval(tmp_path, "0").ids) == ["000010000", "000010001"]
    assert list(read_clip_retrieval(tmp_path, "1").ids) == ["000010002", "000010003"]
    rows = read_clip_retrieval(tmp_path, "2")
    assert list(rows.ids) == ["a" * 32, "b" * 32] and rows.img.dtype == np.float16 and rows.dim == 8
    assert [clip_retrieval_id(v) for v in ("a/b", "x.y/abc", "x/a.b.jpg", None)] == ["a/b", "x.y/abc", "a.b", None]
    import duckdb

    for v in ("000010000", "/data/x/00001/000010002.jpg", "a/b", "x.y/abc", "x/a.b.jpg"):
        sql = duckdb.execute(f"SELECT {clip_retrieval_id_sql('v')} FROM (SELECT ?::VARCHAR AS v)", [v]).fetchone()
        assert sql == (clip_retrieval_id(v),)


def test_clip_retrieval_part_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(3)
    _cr_part(tmp_path, "3", rng, ["k0", "k1"], rows=3)
    with pytest.raises(SourceError, match=r"2 metadata rows but 3 image and 2 text embedding rows"):
        read_clip_retrieval(tmp_path, "3")
    (tmp_path / "text_emb" / "text_emb_3.npy").unlink()
    with pytest.raises(SourceError, match=r"text_emb/text_emb_3.npy is missing"):
        read_clip_retrieval(tmp_path, "3")
    _cr_part(tmp_path, "4", rng, ["k0", None])
    with pytest.raises(SourceError, match=r"metadata_4.parquet: row 1 has no image_path"):
        read_clip_retrieval(tmp_path, "4")
    pl.DataFrame({"caption": ["x", "y"]}).write_parquet(tmp_path / "metadata" / "metadata_4.parquet")
    with pytest.raises(SourceError, match=r"metadata_4.parquet has neither uid nor image_path"):
        read_clip_retrieval(tmp_path, "4")


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


def test_clip_scores_keep_the_bits_of_numpys_norm():
    """The scores decide the CLIP filter's quantile: a faster formula must give the same bits."""
    rng = np.random.default_rng(3)
    img, txt = _unit(rng, 257, 64), _unit(rng, 257, 64)
    img[5] = 0  # a zero row stays zero
    x, y = img.astype(np.float32), txt.astype(np.float32)
    nx, ny = np.linalg.norm(x, axis=1, keepdims=True), np.linalg.norm(y, axis=1, keepdims=True)
    want = np.einsum("ij,ij->i", x / np.where(nx > 0, nx, 1.0), y / np.where(ny > 0, ny, 1.0)).astype(np.float32)
    assert clip_scores(img, txt).tobytes() == want.tobytes()
