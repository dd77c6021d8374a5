"""Evaluation: exact retrieval recalls on hand-built embeddings, top-k accuracy,
zero-shot with open_clip's classifier on a tiny random model, and the three
kinds of evaluation split (pool eval/, image folder, captioned webdataset)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbprune_assets.core.eval_metrics import RETRIEVAL_METRICS, positive_ranks, retrieval_metrics, topk_accuracy
from dbprune_assets.core.evaluate import (
    EvalError,
    embed_split,
    evaluate_model,
    load_eval_split,
    zeroshot_metrics,
)
from dbprune_assets.core.settings import PoolSettings
from dbprune_assets.core.wds import write_tar
from dbprune_assets.samplepool import EVAL_TEMPLATES, write_sample_pool

N_CONCEPTS = 6
PER_CLASS = 2


# ---------------------------------------------------------------------------
# pure retrieval metrics


def _onehot(n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)


def test_identical_embeddings_give_recall_one() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16)).astype(np.float32)
    m = retrieval_metrics(emb, emb.copy(), np.arange(50))
    assert set(m) == set(RETRIEVAL_METRICS)
    assert all(v == 1.0 for v in m.values())


def test_known_permutation_gives_known_recalls() -> None:
    # images: one-hot e_j.  Text i is about image i but looks more like image pi(i):
    # t_i = e_pi(i) + 0.5 e_i.  Its true image ranks 1st if pi(i) = i, else 2nd.
    n = 10
    pi = np.array([0, 1, 2, 4, 3, 6, 7, 5, 9, 8])  # fixed points 0, 1, 2
    img = _onehot(n)
    txt = img[pi] + 0.5 * img
    m = retrieval_metrics(img, txt, np.arange(n))
    assert m["image_retrieval_recall@1"] == pytest.approx(0.3)
    assert m["text_retrieval_recall@1"] == pytest.approx(0.3)
    for k in (5, 10):
        assert m[f"image_retrieval_recall@{k}"] == 1.0
        assert m[f"text_retrieval_recall@{k}"] == 1.0
    # a pure shift: text i is image i+3, so the true image ranks 2nd (t_i = e_{i+3} + 0.5 e_i)
    shift = (np.arange(n) + 3) % n
    m = retrieval_metrics(img, img[shift] + 0.5 * img, np.arange(n))
    assert m["image_retrieval_recall@1"] == 0.0 and m["image_retrieval_recall@5"] == 1.0


def test_several_captions_per_image_and_images_without_text() -> None:
    img = _onehot(4)
    # image 0 has two texts, one of them wrong (looks like image 1); image 3 has none
    txt = np.stack([img[1], img[0], img[1], img[2]])
    owner = np.array([0, 0, 1, 2])
    m = retrieval_metrics(img, txt, owner, ks=(1, 2))
    # text -> image: text 0 (about 0, looks like 1): rank 1; others rank 0
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert m["image_retrieval_recall@2"] == 1.0
    # image -> text, queries 0, 1, 2 (image 3 has no text): image 0's best text is text 1 (score 1): hit;
    # image 1: texts 0 and 2 both score 1 and its own (text 2) comes after text 0 (ties by index): rank 1
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0


def _brute_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array([np.flatnonzero(positive[i][order[i]])[0] for i in range(len(scores))])


def test_ranks_match_a_stable_sort_with_ties() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(40, 9)).astype(np.float32)  # many ties
    positive = rng.random((40, 9)) < 0.25
    positive[np.arange(40), rng.integers(0, 9, 40)] = True
    assert np.array_equal(positive_ranks(scores, positive), _brute_ranks(scores, positive))


def test_retrieval_matches_brute_force_and_blocks() -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(size=(30, 8))
    owner = rng.integers(0, 30, size=55)
    txt = img[owner] + rng.normal(scale=1.5, size=(55, 8))
    a = retrieval_metrics(img, txt, owner)
    b = retrieval_metrics(img, txt, owner, block=7)
    assert a == b
    imn = img / np.linalg.norm(img, axis=1, keepdims=True)
    txn = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = (txn @ imn.T).astype(np.float32)
    r_t2i = _brute_ranks(s, owner[:, None] == np.arange(30)[None, :])
    q = np.unique(owner)
    r_i2t = _brute_ranks((imn[q] @ txn.T).astype(np.float32), owner[None, :] == q[:, None])
    for k in (1, 5, 10):
        assert a[f"image_retrieval_recall@{k}"] == pytest.approx((r_t2i < k).mean())
        assert a[f"text_retrieval_recall@{k}"] == pytest.approx((r_i2t < k).mean())


def test_retrieval_rejects_bad_index() -> None:
    with pytest.raises(ValueError):
        retrieval_metrics(_onehot(3), _onehot(3), np.array([0, 1, 3]))


def test_topk_accuracy_by_hand() -> None:
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    labels = np.array([0, 2, 2, 1])
    # ranks of the labels: 0, 1, 0, 2 (row 3: class 2, then class 0 before class 1 on the tie)
    acc = topk_accuracy(logits, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(2 / 4)
    assert acc[2] == pytest.approx(3 / 4)
    assert acc[5] == 1.0  # k capped at the 3 classes


def test_topk_accuracy_ties_are_stable() -> None:
    logits = np.array([[0.3, 0.3, 0.4]])
    assert topk_accuracy(logits, np.array([0]), (1, 2))[2] == 1.0
    assert topk_accuracy(logits, np.array([1]), (1, 2))[2] == 0.0
    assert topk_accuracy(logits, np.array([1]), (5,))[5] == 1.0  # k capped at 3 classes


# ---------------------------------------------------------------------------
# splits and the model-level metrics


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evalpool") / "pool"
    write_sample_pool(
        root,
        PoolSettings(shards=1, samples_per_shard=20, concepts=N_CONCEPTS, reference_samples=0, eval_per_class=PER_CLASS),
    )
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    import open_clip
    import torch

    from dbprune_assets.core.encoders import model_config, register_model_configs
    from dbprune_assets.core.model_dir import default_preprocess_cfg, save_local_dir

    register_model_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("dbprune-tiny")
    model.eval()
    tokenizer = open_clip.get_tokenizer("dbprune-tiny")
    cfg = model_config("dbprune-tiny")
    folder = save_local_dir(tmp_path_factory.mktemp("model") / "m", model, cfg, default_preprocess_cfg(cfg))
    return model, preprocess, tokenizer, folder


def test_pool_eval_split_loads_with_class_names(pool_dir: Path) -> None:
    split = load_eval_split(pool_dir / "eval")
    names = [ln for ln in (pool_dir / "eval" / "classnames.txt").read_text().splitlines() if ln]
    assert split.kind == "webdataset"
    assert split.classnames == names and len(names) == N_CONCEPTS
    assert split.templates == list(EVAL_TEMPLATES)
    assert split.n_items == N_CONCEPTS * PER_CLASS
    assert split.has_labels and split.has_captions and split.supports_zeroshot and split.supports_retrieval
    items = list(split.iter_items())
    assert len(items) == split.n_items
    assert sorted(i.label for i in items) == sorted(list(range(N_CONCEPTS)) * PER_CLASS)
    assert all(len(i.captions) == 1 for i in items)


def test_zeroshot_on_random_model(pool_dir: Path, tiny_model: tuple) -> None:
    model, preprocess, tokenizer, _ = tiny_model
    split = load_eval_split(pool_dir / "eval")
    emb = embed_split(model, preprocess, tokenizer, split, "cpu", batch_size=5)
    n = N_CONCEPTS * PER_CLASS
    assert emb.image_emb.shape[0] == n and emb.text_emb.shape[0] == n
    assert np.allclose(np.linalg.norm(emb.image_emb, axis=1), 1.0, atol=1e-4)
    m = zeroshot_metrics(model, preprocess, tokenizer, split, "cpu", batch_size=5)
    assert set(m) == {"acc1", "acc5"}
    for v in m.values():
        assert 0.0 <= v <= 1.0
        assert abs(v * n - round(v * n)) < 1e-9  # a fraction of the n images
    assert m["acc5"] >= m["acc1"]
    # reusing embeddings gives the same numbers
    assert zeroshot_metrics(model, preprocess, tokenizer, split, "cpu", 5, embeddings=emb) == m


def test_evaluate_model_rows(pool_dir: Path, tiny_model: tuple) -> None:
    *_, folder = tiny_model
    rows = evaluate_model(folder, pool_dir / "eval", pool_dir / "eval", "cpu", batch_size=64)
    metrics = [r["metric"] for r in rows]
    assert metrics == ["acc1", "acc5", *RETRIEVAL_METRICS]
    assert {r["task"] for r in rows} == {"zeroshot", "retrieval"}
    assert all(0.0 <= r["value"] <= 1.0 and r["n"] == N_CONCEPTS * PER_CLASS and r["dataset"] == "eval" for r in rows)


def _png(color: tuple[int, int, int], size: int = 20) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def test_image_folder_split(tmp_path: Path, tiny_model: tuple) -> None:
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    root = tmp_path / "folder"
    for cls, color, n in (("red_circle", (200, 0, 0), 3), ("blue_square", (0, 0, 200), 2), ("green", (0, 200, 0), 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            _png(color).save(root / cls / f"{i}.png")
    (root / "notes.txt").write_text("not a class\n")
    split = load_eval_split(root)
    assert split.kind == "imagefolder"
    assert split.classnames == ["blue square", "green", "red circle"]  # sorted folders, _ -> space
    assert split.n_items == 6 and split.labels == [0, 0, 1, 2, 2, 2]
    assert len(split.templates) == len(OPENAI_IMAGENET_TEMPLATES) and all("{}" in t for t in split.templates)
    assert not split.supports_retrieval
    assert len(load_eval_split(root, template_set="simple").templates) < len(split.templates)
    # classnames.txt beside the class folders wins
    (root / "classnames.txt").write_text("a blue square\na green thing\na red circle\n")
    assert load_eval_split(root).classnames == ["a blue square", "a green thing", "a red circle"]

    model, preprocess, tokenizer, folder = tiny_model
    m = zeroshot_metrics(model, preprocess, tokenizer, split, "cpu", 4)
    assert all(0 <= v <= 1 and abs(v * 6 - round(v * 6)) < 1e-9 for v in m.values())
    assert m["acc5"] == 1.0  # 3 classes: top-min(5, 3) always holds the label
    rows = evaluate_model(folder, root, None, "cpu", 8)
    assert [r["metric"] for r in rows] == ["acc1", "acc5"] and all(r["n"] == 6 for r in rows)
    with pytest.raises(EvalError, match="no captions"):
        evaluate_model(folder, None, root, "cpu", 8)


def _jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    _png(color).save(buf, format="JPEG")
    return buf.getvalue()


def test_captioned_webdataset_is_retrieval_only(tmp_path: Path, tiny_model: tuple) -> None:
    root = tmp_path / "captions"
    root.mkdir()
    samples = [
        (f"{i:04d}", {"jpg": _jpeg_bytes((i * 40, 0, 0)), "txt": f"a red thing number {i}\nanother caption {i}".encode()})
        for i in range(5)
    ]
    write_tar(root / "00000.tar", samples[:3])
    write_tar(root / "00001.tar", samples[3:])
    (root / "sizes.json").write_text(json.dumps({"00000.tar": 3, "00001.tar": 2}))
    split = load_eval_split(root)
    assert split.n_items == 5 and split.has_captions and not split.has_labels
    (root / "sizes.json").unlink()  # counted from the tars then
    split = load_eval_split(root)
    assert split.n_items == 5 and split.has_captions and not split.has_labels
    assert not split.supports_zeroshot
    model, preprocess, tokenizer, folder = tiny_model
    emb = embed_split(model, preprocess, tokenizer, split, "cpu", 2)
    assert emb.text_emb.shape[0] == 10 and list(emb.text_to_image_index) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    rows = evaluate_model(folder, None, root, "cpu", 4)
    assert [r["metric"] for r in rows] == list(RETRIEVAL_METRICS)
    # @5 and @10 over 5 images / 10 texts with 2 positives each
    by = {r["metric"]: r["value"] for r in rows}
    assert by["image_retrieval_recall@5"] == 1.0 and by["image_retrieval_recall@10"] == 1.0
    assert by["text_retrieval_recall@10"] == 1.0
    with pytest.raises(EvalError, match="no labels"):
        evaluate_model(folder, root, None, "cpu", 4)


def test_missing_split_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="no such file"):
        load_eval_split(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="ImageFolder"):
        load_eval_split(tmp_path / "empty")
