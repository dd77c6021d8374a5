"""Evaluation through CLIP_benchmark: the sample pool's eval sets load with its
``build_dataset("wds/...")``; dbprune and CLIP_benchmark's command line give
the same numbers for one model; a hand-made three-class set (and a five-image
retrieval set) with known embeddings gives hand-computed accuracy and recall;
dataset folders are checked with errors that name the folder; DataComp's
result rows and aggregate."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbprune_assets.core.models.eval_metrics import (
    AGGREGATE_GROUPS,
    DATACOMP_TASKS,
    DATASET_GROUPS,
    aggregate_scores,
    datacomp_task,
    dataset_name,
    results_row,
)
from dbprune_assets.core.models.evaluate import (
    EvalError,
    _accuracy,
    clip_benchmark_metrics,
    datacomp_rows,
    eval_rows,
    evaluate_dataset,
    evaluate_model,
    find_eval_datasets,
    load_eval_dataset,
    read_eval_results,
    write_eval_results,
)
from dbprune_assets.core.settings import PoolSettings
from dbprune_assets.core.pool.wds import write_tar
from dbprune_assets.samplepool import EVAL_TEMPLATES, write_sample_pool

N_CONCEPTS = 6
PER_CLASS = 2


# ---------------------------------------------------------------------------
# fixtures


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
    """A randomly initialised dbprune-tiny saved as an open_clip local-dir folder."""
    import open_clip
    import torch

    from dbprune_assets.core.models.encoders import model_config, register_model_configs
    from dbprune_assets.core.models.model_dir import default_preprocess_cfg, save_local_dir

    register_model_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("dbprune-tiny")
    model.eval()
    tokenizer = open_clip.get_tokenizer("dbprune-tiny")
    cfg = model_config("dbprune-tiny")
    folder = save_local_dir(tmp_path_factory.mktemp("model") / "m", model, cfg, default_preprocess_cfg(cfg))
    return model, preprocess, tokenizer, folder


def _write_dataset(root: Path, samples: list[dict[str, bytes]], *, classnames: list[str] | None = None,
                   templates: list[str] | None = None, dataset_type: str | None = None, per_shard: int = 4) -> Path:
    """A dataset folder in CLIP_benchmark's webdataset layout."""
    (root / "test").mkdir(parents=True)
    chunks = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for s, chunk in enumerate(chunks):
        write_tar(root / "test" / f"{s}.tar", ((f"k{s}_{i:03d}", m) for i, m in enumerate(chunk)))
    (root / "test" / "nshards.txt").write_text(f"{len(chunks)}\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames))
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in templates))
    if dataset_type is not None:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    return root


def _png(red: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (red, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------
# the sample pool's eval sets with CLIP_benchmark's builder


def test_sample_eval_sets_load_with_clip_benchmark_build_dataset(pool_dir: Path) -> None:
    from clip_benchmark.datasets.builder import build_dataset

    names = (pool_dir / "eval" / "shapes" / "classnames.txt").read_text().splitlines()
    info = json.loads((pool_dir / "pool_info.json").read_text())
    assert names == [c["name"] for c in info["concepts"]]
    ds = build_dataset("wds/shapes", root=str(pool_dir / "eval" / "shapes"), transform=None, split="test",
                       download=False, task="zeroshot_classification")
    assert ds.classes == names and ds.templates == list(EVAL_TEMPLATES)
    items = list(ds)
    assert len(items) == N_CONCEPTS * PER_CLASS
    assert sorted(label for _, label in items) == sorted(list(range(N_CONCEPTS)) * PER_CLASS)
    assert all(isinstance(img, Image.Image) and img.size == (48, 48) for img, _ in items)  # PoolSettings.image_size

    ret = build_dataset("wds/shapes_retrieval", root=str(pool_dir / "eval" / "shapes_retrieval"), transform=None,
                        split="test", download=False, task="zeroshot_retrieval")
    pairs = list(ret)
    assert len(pairs) == N_CONCEPTS * PER_CLASS
    captions = [c for _, caps in pairs for c in caps]
    assert all(len(caps) == 2 for _, caps in pairs)
    assert len(set(captions)) == len(captions)  # every caption singles out its image
    for _, caps in pairs:  # each names one concept and where it is
        assert sum(n in caps[0] for n in names) >= 1 and any(w in caps[0] for w in ("corner", "edge", "center"))

    found = find_eval_datasets([pool_dir / "eval"])
    assert [(d.name, d.task, d.n_shards) for d in found] == [
        ("shapes", "zeroshot_classification", 1), ("shapes_retrieval", "zeroshot_retrieval", 1)]
    assert found[0].classnames == tuple(names) and found[1].n_images == N_CONCEPTS * PER_CLASS


def test_retrieval_captions_describe_their_rendering() -> None:
    from dbprune_assets.samplepool import RenderParams
    from dbprune_assets.samplepool.captions import describe_rendering
    from dbprune_assets.samplepool.render import Blob

    other = Blob("circle", 40.0, 8.0, 3.0, 0.0, (40.0, 80.0, 225.0))
    p = RenderParams(main=Blob("square", 5.0, 40.0, 5.5, 20.0, (154.0, 28.0, 28.0)), distractors=(other, other),
                     bg_rgb=(22.0, 28.0, 95.0), texture="stripes", texture_amp=10.0, texture_angle=0.0,
                     texture_freq=3.0, texture_seed=0, noise_sigma=1.0, noise_seed=0, quality=90)
    # 48 px: radius 5.5 / 48 = 0.11 (small); x 5 < 16 (left), y 40 >= 32 (bottom); 20 degrees (right);
    # red at 0.7 of its base (220, 40, 40): dark; background nearest navy (20, 30, 90)
    first, second = describe_rendering("red square", p, 48, (220, 40, 40))
    assert first == ("a small dark red square in the bottom left corner, tilted right, on a striped navy background, "
                     "with two other shapes")
    assert second == ("striped navy background with a dark red square in the bottom left corner: small, tilted right; "
                      "two other shapes around it")
    centred = RenderParams(**{**p.__dict__, "main": Blob("circle", 24.0, 24.0, 12.0, 30.0, (220.0, 40.0, 40.0)),
                              "distractors": (), "texture": "none"})
    assert describe_rendering("red circle", centred, 48, (220, 40, 40))[0] == (
        "a large red circle in the center, on a plain navy background, with no other shapes")  # no tilt for circles


# ---------------------------------------------------------------------------
# dbprune and CLIP_benchmark's command line agree


def _clip_benchmark_cli(monkeypatch: pytest.MonkeyPatch, out: Path, dataset: str, root: Path, task: str,
                        weights: Path, batch_size: int) -> dict[str, float]:
    """``clip_benchmark eval ...`` through its python ``main`` entry (in process,
    so the project's dbprune-tiny architecture is registered with open_clip)."""
    from clip_benchmark.cli import main

    from dbprune_assets.core.models.encoders import register_model_configs

    register_model_configs()
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--dataset", f"wds/{dataset}", "--dataset_root", str(root),
        "--model", "dbprune-tiny", "--pretrained", str(weights), "--task", task, "--no_amp",
        "--num_workers", "0", "--batch_size", str(batch_size), "--recall_k", "1", "5", "10",
        "--output", str(out), "--quiet",
    ])
    main()
    return json.loads(out.read_text())["metrics"]


def test_dbprune_and_clip_benchmark_cli_give_the_same_numbers(pool_dir: Path, tiny_model: tuple, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    *_, folder = tiny_model
    datasets = find_eval_datasets([pool_dir / "eval"])
    results = evaluate_model(folder, datasets, "cpu", batch_size=8)
    ours = {r.dataset.name: r.metrics for r in results}
    assert [r.n for r in results] == [N_CONCEPTS * PER_CLASS] * 2
    for name, task in (("shapes", "zeroshot_classification"), ("shapes_retrieval", "zeroshot_retrieval")):
        theirs = _clip_benchmark_cli(monkeypatch, tmp_path / f"{name}.json", name, pool_dir / "eval" / name, task,
                                     folder / "open_clip_model.safetensors", batch_size=5)
        assert set(theirs) <= set(ours[name]), name
        for metric, value in theirs.items():
            assert ours[name][metric] == pytest.approx(value, abs=1e-6), (name, metric)
    assert set(ours["shapes"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert set(ours["shapes_retrieval"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)
                                             } | {"mean_recall@1"}

    rows = eval_rows(results)
    assert {(r["task"], r["metric"]) for r in rows} == {(n, m) for n, ms in ours.items() for m in ms}
    jsonl = datacomp_rows(results)
    assert [(r["key"], r["dataset"]) for r in jsonl] == [("shapes", "shapes"), ("shapes_retrieval", "shapes_retrieval")]
    assert jsonl[0]["metrics"]["main_metric"] == ours["shapes"]["acc1"]
    assert jsonl[1]["metrics"]["main_metric"] == ours["shapes_retrieval"]["mean_recall@1"]
    write_eval_results(tmp_path / "r" / "eval_results.jsonl", jsonl)
    assert read_eval_results(tmp_path / "r" / "eval_results.jsonl") == jsonl


# ---------------------------------------------------------------------------
# a hand-made set with known embeddings


class _Lookup:
    """A CLIP-like model with known embeddings: an image is its red value / 20
    (an index into IMAGES), a text its index in TEXTS."""

    def __init__(self, images: np.ndarray, texts: dict[str, np.ndarray]) -> None:
        import torch

        self.images = torch.tensor(images, dtype=torch.float32)
        self.names = list(texts)
        self.texts = torch.tensor(np.stack(list(texts.values())), dtype=torch.float32)

    def eval(self) -> "_Lookup":
        return self

    def transform(self, image: Image.Image) -> object:
        import torch

        return torch.tensor([float(image.getpixel((0, 0))[0])])

    def tokenizer(self, texts: list[str]) -> object:
        import torch

        return torch.tensor([self.names.index(t) for t in texts])

    def encode_image(self, x: object) -> object:
        return self.images[(x[:, 0] / 20).round().long()]  # type: ignore[index]

    def encode_text(self, tokens: object) -> object:
        return self.texts[tokens]


E = np.eye(5, dtype=np.float32)
# classification: images 0-6 (labels below), 3 classes whose only prompt embeds to e0, e1, e2
CLS_IMAGES = [((0.9, 0.3, 0.1), 0), ((0.2, 0.8, 0.1), 0), ((0.1, 0.9, 0.3), 1), ((0.1, 0.2, 0.7), 1),
              ((0.1, 0.3, 0.9), 2), ((0.3, 0.1, 0.6), 2), ((0.8, 0.1, 0.1), 0)]
# retrieval: images 7-11 embed to e0..e4; captions (owner, embedding)
RET_CAPTIONS = {
    "t0a": (0, E[0] + 0.5 * E[1]),
    "t0b": (0, E[1] + 0.2 * E[0]),
    "t1": (1, E[2] + 0.4 * E[1]),
    "t2": (2, E[2] + 0.1 * E[3]),
    "t3": (3, E[3] + 0.3 * E[0]),
    "t4": (4, E[4] + 0.5 * E[3]),
}


@pytest.fixture()
def hand_model() -> _Lookup:
    images = np.zeros((12, 5), np.float32)
    for i, (emb, _) in enumerate(CLS_IMAGES):
        images[i, :3] = emb
    images[7:12] = E
    texts = {"a cat.": E[0], "a dog.": E[1], "a bird.": E[2], **{k: v for k, (_, v) in RET_CAPTIONS.items()}}
    return _Lookup(images, texts)


def test_three_class_set_by_hand(tmp_path: Path, hand_model: _Lookup) -> None:
    root = _write_dataset(tmp_path / "three", [{"png": _png(20 * i), "cls": str(c).encode()}
                                               for i, (_, c) in enumerate(CLS_IMAGES)],
                          classnames=["cat", "dog", "bird"], templates=["a {c}."], per_shard=3)
    ds = load_eval_dataset(root)
    assert (ds.name, ds.task, ds.n_shards, ds.classnames) == ("three", "zeroshot_classification", 3,
                                                             ("cat", "dog", "bird"))
    res = evaluate_dataset(hand_model, hand_model.transform, hand_model.tokenizer, ds, "cpu", batch_size=2)
    # predictions (argmax of the first three coordinates): 0, 1, 1, 2, 2, 2, 0 for labels 0, 0, 1, 1, 2, 2, 0:
    # right for images 0, 2, 4, 5, 6
    assert res.n == 7
    assert res.metrics["acc1"] == pytest.approx(5 / 7)
    # recall per class: cat 2/3 (images 0, 6 of 0, 1, 6), dog 1/2, bird 2/2
    assert res.metrics["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert math.isnan(res.metrics["acc5"])  # CLIP_benchmark: no acc5 below 5 classes ...
    assert {r["metric"] for r in eval_rows([res])} == {"acc1", "mean_per_class_recall"}  # ... and no row
    assert datacomp_rows([res])[0]["metrics"]["acc5"] is None


def test_retrieval_set_by_hand(tmp_path: Path, hand_model: _Lookup) -> None:
    by_owner: dict[int, list[str]] = {}
    for cap, (owner, _) in RET_CAPTIONS.items():
        by_owner.setdefault(owner, []).append(cap)
    root = _write_dataset(tmp_path / "wds_captions", [{"png": _png(20 * (7 + i)), "txt": "\n".join(by_owner[i]).encode()}
                                                       for i in range(5)], dataset_type="retrieval", per_shard=2)
    ds = load_eval_dataset(root)
    assert (ds.name, ds.task, ds.n_images, ds.main_metric) == ("captions", "zeroshot_retrieval", 5, "mean_recall@1")
    res = evaluate_dataset(hand_model, hand_model.transform, hand_model.tokenizer, ds, "cpu", batch_size=2)
    m = res.metrics
    # cosine of (normalised) caption and image e_i = the caption's i-th coordinate over its norm.
    # text -> image, the best image per caption: t0a e0 (own), t0b e1 (0.98 > 0.20: miss), t1 e2 (0.93 > 0.37: miss),
    # t2 e2, t3 e3, t4 e4: 4 of 6
    assert m["image_retrieval_recall@1"] == pytest.approx(4 / 6)
    # image -> text, the best caption per image: e0 t0a (0.89 > 0.29, own), e1 t0b (0.98, image 0's: miss),
    # e2 t2 (0.995 > 0.93, own), e3 t3 (0.96 > 0.45), e4 t4: 4 of 5
    assert m["text_retrieval_recall@1"] == pytest.approx(4 / 5)
    assert m["mean_recall@1"] == pytest.approx((4 / 6 + 4 / 5) / 2)
    assert m["image_retrieval_recall@5"] == 1.0 and m["text_retrieval_recall@5"] == 1.0
    assert "image_retrieval_recall@10" not in m  # only k up to the 5 images


def test_patched_accuracy_by_hand() -> None:
    import torch

    zsc, _ = clip_benchmark_metrics()
    assert zsc.accuracy is _accuracy
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.2, 0.3, 0.4], [0.2, 0.5, 0.3, 0.0, 0.1, 0.6],
                           [0.1, 0.2, 0.7, 0.3, 0.0, 0.5], [0.35, 0.3, 0.4, 0.1, 0.2, 0.0]])
    # ranks of the labels 0, 2, 2, 1: 0, 2, 0, 2
    assert _accuracy(logits, torch.tensor([0, 2, 2, 1]), topk=(1, 2, 3)) == [0.5, 0.5, 1.0]


# ---------------------------------------------------------------------------
# folders: checks and names


def _cls_set(root: Path, **kw: object) -> Path:
    args: dict = {"classnames": ["a", "b"], "templates": ["a photo of a {c}."], **kw}
    return _write_dataset(root, [{"png": _png(0), "cls": b"0"}, {"png": _png(20), "cls": b"1"}], **args)


def test_folder_errors_name_the_folder_and_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="nope: no such folder"):
        load_eval_dataset(tmp_path / "nope")
    old = tmp_path / "old"  # dbprune's earlier layout: tars and templates.txt directly in the folder
    old.mkdir()
    write_tar(old / "00000.tar", [("k", {"jpg": b"x", "cls": b"0"})])
    (old / "templates.txt").write_text("a photo of a {}.\n")
    with pytest.raises(EvalError) as e:
        find_eval_datasets([old])
    assert str(old) in str(e.value) and "old evaluation layout" in str(e.value) and "test/nshards.txt" in str(e.value)
    with pytest.raises(EvalError, match=r"template 'a photo of a \{\}\.' has no \{c\}"):
        load_eval_dataset(_cls_set(tmp_path / "braces", templates=["a photo of a {}."]))
    with pytest.raises(EvalError, match="no classnames.txt"):
        load_eval_dataset(_cls_set(tmp_path / "nonames", classnames=None))
    with pytest.raises(EvalError, match="dataset type 'captions'"):
        load_eval_dataset(_cls_set(tmp_path / "badtype", dataset_type="captions"))
    gap = _cls_set(tmp_path / "gap")
    (gap / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(EvalError, match=r"says 3 shards but .*gap/test/1.tar is missing"):
        load_eval_dataset(gap)
    (gap / "test" / "nshards.txt").write_text("three\n")
    with pytest.raises(EvalError, match="'three' is not a number of shards"):
        load_eval_dataset(gap)


def test_folder_of_datasets_datacomp_names_and_duplicates(tmp_path: Path) -> None:
    data = tmp_path / "datacomp"
    _cls_set(data / "wds_vtab-cifar100_test")
    _cls_set(data / "wds_imagenet-a_test")
    _cls_set(data / "wds_mine")
    (data / "hf_cache").mkdir()  # DataComp keeps its Hugging Face retrieval sets here: skipped
    found = find_eval_datasets([data])
    assert [(d.name, d.key, d.display_name, d.main_metric) for d in found] == [
        ("imagenet-a", "imagenet-a", "ImageNet-A", "acc1"),  # sorted by folder name
        ("mine", "mine", "mine", "acc1"),
        ("vtab/cifar100", "vtab/cifar100", "CIFAR-100", "acc1"),
    ]
    assert found[2].wds_name == "wds/vtab/cifar100"
    with pytest.raises(EvalError, match="two evaluation datasets named mine"):
        find_eval_datasets([data, data / "wds_mine"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="empty: no test/nshards.txt"):
        find_eval_datasets([tmp_path / "empty"])


def test_eval_splits_default_old_settings_and_failure(tmp_path: Path, pool_dir: Path) -> None:
    import dagster as dg

    from dbprune_assets.core.store.layout import Layout
    from dbprune_assets.core.settings import build_settings
    from dbprune_assets.defs.training import eval_splits

    layout = Layout(home=tmp_path / "home", pool=pool_dir)
    assert [d.name for d in eval_splits(layout, build_settings({}, profile="sample"))] == ["shapes", "shapes_retrieval"]
    extra = _cls_set(tmp_path / "wds_imagenet1k_test")
    s = build_settings({"eval": {"datasets": [str(pool_dir / "eval" / "shapes")], "zeroshot": str(extra)}},
                       profile="sample")
    assert [d.name for d in eval_splits(layout, s)] == ["shapes", "imagenet1k"]
    bad = build_settings({"eval": {"datasets": [str(tmp_path / "missing")]}}, profile="sample")
    with pytest.raises(dg.Failure, match="missing: no such folder"):
        eval_splits(layout, bad)


# ---------------------------------------------------------------------------
# DataComp's rows and aggregate


def test_datacomp_tables_copied_consistently() -> None:
    names = {t.name for t in DATACOMP_TASKS}
    assert len(DATACOMP_TASKS) == 40 and len(names) == 40
    for members in DATASET_GROUPS.values():
        assert members <= names
    assert AGGREGATE_GROUPS == ("ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average")
    assert datacomp_task("wds_dollar_street_test").key == "fairness/dollar_street"  # DataComp drops fairness/
    assert datacomp_task("wds_wilds-iwildcam_test").main_metric is None
    assert datacomp_task("wds_mscoco_captions").name == "MSCOCO"  # CLIP_benchmark's copy of the 5k test split
    assert datacomp_task("wds_retrieval-mscoco_2014_5k_test_image_text_retrieval_test") is None  # not a wds set
    assert dataset_name("wds_imagenet1k_test") == "imagenet1k" and dataset_name("shapes") == "shapes"


def test_results_row_and_aggregate_by_hand() -> None:
    row = results_row("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance",
                      {"acc1": 0.5, "acc5": float("nan"), "mean_per_class_recall": 0.4}, "acc1")
    assert row == {"key": "vtab/kitti_closest_vehicle_distance", "dataset": "KITTI Vehicle Distance",
                   "metrics": {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.4, "main_metric": 0.5}}
    assert json.loads(json.dumps(row)) == row  # valid JSON (no NaN)

    def r(dataset: str, main: float | None) -> dict:
        return {"key": dataset, "dataset": dataset, "metrics": {"main_metric": main}}

    rows = [r("ImageNet 1k", 0.30), r("ImageNet v2", 0.20), r("ImageNet-R", 0.40), r("CIFAR-100", 0.50),
            r("SVHN", 0.10), r("MSCOCO", 0.25), r("iWildCam", None), r("shapes", 0.90)]
    agg = aggregate_scores(rows)
    assert list(agg) == ["ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average"]
    assert agg["ImageNet"].score == pytest.approx(0.30)
    assert (agg["ImageNet dist. shifts"].score, agg["ImageNet dist. shifts"].n_present,
            agg["ImageNet dist. shifts"].n_group) == (pytest.approx(0.30), 2, 6)
    assert (agg["VTAB"].score, agg["VTAB"].n_present, agg["VTAB"].n_group) == (pytest.approx(0.30), 2, 13)
    assert (agg["Retrieval"].score, agg["Retrieval"].n_present) == (pytest.approx(0.25), 1)
    # Average: every row with a main metric (iWildCam has none): (0.3+0.2+0.4+0.5+0.1+0.25+0.9) / 7
    assert (agg["Average"].score, agg["Average"].n_present) == (pytest.approx(2.65 / 7), 7)
    only_sample = aggregate_scores([r("shapes", 0.6), r("shapes_retrieval", 0.2)])
    assert list(only_sample) == ["Average"] and only_sample["Average"].score == pytest.approx(0.4)
    assert aggregate_scores([r("x", None)]) == {}
