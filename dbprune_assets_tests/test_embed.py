"""embed_shard: shapes, dtype, norms, row alignment, worker invariance,
clip_score, a separate score encoder, atomicity and error reporting."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pl = pytest.importorskip("polars")

from PIL import Image, ImageDraw  # noqa: E402

from dbprune_assets.core.models import encoders as E  # noqa: E402
from dbprune_assets.core.models.model_dir import save_local_dir  # noqa: E402
from dbprune_assets.core.models.embed import (  # noqa: E402
    METADATA_COLUMNS,
    EmbedError,
    embed_shard,
    encode_images,
    encode_texts,
)
from dbprune_assets.core.settings import ComputeSettings, EncoderSpec  # noqa: E402

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 225), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square")
N = 37  # not a multiple of the batch size


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    color = list(COLORS.values())[i % len(COLORS)]
    im = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 80, 3)))
    x, y = (int(v) for v in rng.integers(4, 28, 2))
    draw = ImageDraw.Draw(im)
    (draw.ellipse if (i // len(COLORS)) % 2 == 0 else draw.rectangle)([x, y, x + 16, y + 16], fill=color)
    return im


def _caption(i: int) -> str:
    return f"a {list(COLORS)[i % len(COLORS)]} {SHAPES[(i // len(COLORS)) % 2]}"


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decoded(i: int) -> Image.Image:
    """Sample i as stored in the tar (after JPEG encoding)."""
    return Image.open(io.BytesIO(_jpeg(_image(i)))).convert("RGB")


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A tiny webdataset tar (KEY.jpg / KEY.txt / KEY.json) and its rows in a
    *different* order than the tar (parquet order is what outputs follow)."""
    root = tmp_path_factory.mktemp("shard")
    members = []
    for i in range(N):
        key = f"{i:09d}"
        members += [(f"{key}.jpg", _jpeg(_image(i))), (f"{key}.txt", _caption(i).encode()), (f"{key}.json", b"{}")]
    tar = root / "00000.tar"
    _write_tar(tar, members)
    order = np.random.default_rng(0).permutation(N)
    rows = pl.DataFrame(
        {
            "uid": [f"{i:032x}" for i in order],
            "key": [f"{i:09d}" for i in order],
            "caption": [_caption(int(i)) for i in order],
            "row": [int(i) for i in order],
        }
    )
    return tar, rows, order


def _tiny_encoder(root: Path, seed: int) -> E.LoadedEncoder:
    E.register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model("dbprune-tiny")
    out = save_local_dir(root / f"enc{seed}", model, E.model_config("dbprune-tiny"), tmp_root=root / ".tmp")
    return E.load_encoder(EncoderSpec(model=f"local-dir:{out}"), "cpu")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return _tiny_encoder(tmp_path_factory.mktemp("enc"), 0)


def _run(tmp: Path, tar: Path, rows, enc, score=None, workers=0, batch_size=8, tag="a"):
    out = tmp / tag
    paths = (out / "img_emb" / "00000.npy", out / "text_emb" / "00000.npy", out / "metadata" / "00000.parquet")
    stats = embed_shard(
        tar, rows, enc, score, *paths, ComputeSettings(device="cpu", batch_size=batch_size, workers=workers, threads=1),
        tmp / ".tmp",
    )
    img, txt = np.load(paths[0]), np.load(paths[1])
    meta = pl.read_parquet(paths[2])
    return stats, img, txt, meta, paths


def test_outputs_shapes_norms_alignment(tmp_path, shard, encoder):
    tar, rows, order = shard
    stats, img, txt, meta, _ = _run(tmp_path, tar, rows, encoder)
    d = encoder.embed_dim
    assert img.shape == (N, d) and txt.shape == (N, d)
    assert img.dtype == np.float16 and txt.dtype == np.float16
    for a in (img, txt):
        assert np.allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1.0, atol=1e-2)
    assert meta.columns == list(METADATA_COLUMNS)
    assert meta.schema["clip_score"] == pl.Float32
    assert meta["uid"].to_list() == rows["uid"].to_list()
    assert meta["key"].to_list() == rows["key"].to_list()
    assert meta["row"].to_list() == rows["row"].to_list()  # the parquet row, carried over
    assert set(meta["shard"].to_list()) == {"00000"}
    assert stats.n == N and stats.device == "cpu" and stats.precision == "fp32" and stats.images_per_s > 0
    # rows follow `rows`, not the tar: embed a few images directly and compare
    picks = [0, 5, N - 1]
    direct_i = encode_images(encoder.model, encoder.preprocess, [_decoded(int(order[p])) for p in picks], batch_size=2)
    direct_t = encode_texts(encoder.model, encoder.tokenizer, [_caption(int(order[p])) for p in picks], batch_size=2)
    assert np.allclose(img[picks].astype(np.float32), direct_i, atol=2e-3)
    assert np.allclose(txt[picks].astype(np.float32), direct_t, atol=2e-3)
    # images of different samples are told apart (not all rows the same)
    assert np.abs(img[0].astype(np.float32) - img[1].astype(np.float32)).max() > 1e-3
    # clip_score = cos(image, text) of the stored (same) encoder's embeddings
    dots = (img.astype(np.float32) * txt.astype(np.float32)).sum(1)
    assert np.allclose(meta["clip_score"].to_numpy(), dots, atol=1e-2)
    # atomic: no temp files left behind
    assert not any((tmp_path / ".tmp").iterdir())


def test_worker_count_does_not_change_results(tmp_path, shard, encoder):
    tar, rows, _ = shard
    _, i0, t0, m0, _ = _run(tmp_path, tar, rows, encoder, workers=0, tag="w0")
    st2, i2, t2, m2, _ = _run(tmp_path, tar, rows, encoder, workers=2, tag="w2")
    assert st2.workers == 2
    assert np.array_equal(i0, i2) and np.array_equal(t0, t2)
    assert m0.equals(m2)


def test_separate_score_encoder(tmp_path, shard, encoder):
    tar, rows, order = shard
    scorer = _tiny_encoder(tmp_path, 1)
    _, img, txt, meta, _ = _run(tmp_path, tar, rows, encoder, score=scorer, workers=1)
    _, img_same, _, meta_same, _ = _run(tmp_path, tar, rows, encoder, tag="same")
    assert np.array_equal(img, img_same)  # clustering embeddings come from the cluster encoder
    si = encode_images(scorer.model, scorer.preprocess, [_decoded(int(i)) for i in order])
    st = encode_texts(scorer.model, scorer.tokenizer, [_caption(int(i)) for i in order])
    assert np.allclose(meta["clip_score"].to_numpy(), (si * st).sum(1), atol=1e-3)
    assert not np.allclose(meta["clip_score"].to_numpy(), meta_same["clip_score"].to_numpy(), atol=1e-3)


def test_empty_rows(tmp_path, shard, encoder):
    tar, rows, _ = shard
    stats, img, txt, meta, _ = _run(tmp_path, tar, rows.head(0), encoder)
    assert stats.n == 0 and img.shape == (0, encoder.embed_dim) and txt.dtype == np.float16
    assert meta.height == 0 and meta.columns == list(METADATA_COLUMNS)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_member_raises_naming_key(tmp_path, encoder, workers):
    members, keys = [], []
    for i in range(12):
        key = f"{i:09d}"
        data = _jpeg(_image(i))
        if i == 9:
            data = data[: len(data) // 3]  # truncated JPEG behind a "success" status
        members += [(f"{key}.jpg", data), (f"{key}.txt", _caption(i).encode())]
        keys.append(key)
    tar = tmp_path / "00042.tar"
    _write_tar(tar, members)
    rows = pl.DataFrame({"uid": keys, "key": keys, "caption": [_caption(i) for i in range(12)]})
    out = tmp_path / "out"
    with pytest.raises(EmbedError, match=r"shard 00042: key 000000009: cannot decode image"):
        _run(tmp_path, tar, rows, encoder, workers=workers, batch_size=4, tag="bad")
    assert not (tmp_path / "bad" / "metadata" / "00000.parquet").exists()
    assert not any((tmp_path / ".tmp").iterdir())
    assert not out.exists()


def test_missing_key_raises_naming_key(tmp_path, shard, encoder):
    tar, rows, _ = shard
    bad = pl.concat([rows, pl.DataFrame({"uid": ["f" * 32], "key": ["999999999"], "caption": ["x"], "row": [99]})])
    with pytest.raises(EmbedError, match=r"shard 00000: key 999999999: not in the tar"):
        _run(tmp_path, tar, bad, encoder)
    with pytest.raises(EmbedError, match=r"shard nope: tar .* does not exist"):
        _run(tmp_path, tmp_path / "nope.tar", rows, encoder)


def test_rerun_replaces_outputs(tmp_path, shard, encoder):
    tar, rows, _ = shard
    _, _, _, _, paths = _run(tmp_path, tar, rows, encoder)
    _, img, _, meta, _ = _run(tmp_path, tar, rows.head(5), encoder)
    assert img.shape[0] == 5 and meta.height == 5
