"""Evaluation bookkeeping as pure functions: metric names, DataComp's task
table, ``eval_results.jsonl`` rows and DataComp's aggregate scores.  No model,
no torch: the metrics themselves are CLIP_benchmark's (``core/models/evaluate.py``).

Metrics (names of the ``eval`` table, as CLIP_benchmark returns them)
----------------------------------------------------------------------
* classification (``clip_benchmark.metrics.zeroshot_classification``):
  ``acc1``, ``acc5`` (top-k accuracy of the zero-shot classifier: class
  names x templates, averaged, unit norm, against L2-normalised image
  embeddings; CLIP_benchmark leaves ``acc5`` undefined, NaN, below 5 classes,
  and dbprune then writes no ``acc5`` row), ``mean_per_class_recall``
  (balanced accuracy); a multi-label set gives ``mean_average_precision``;
* retrieval (``clip_benchmark.metrics.zeroshot_retrieval``):
  ``image_retrieval_recall@k`` (text -> image: its image among the k most
  similar images) and ``text_retrieval_recall@k`` (image -> text: any of its
  captions among the k most similar captions), k in 1, 5, 10 (only the k up
  to the number of images); plus DataComp's ``mean_recall@1``, the mean of
  the two recalls at 1 (``eval_utils/retr_eval.py``).

DataComp
--------
:data:`DATACOMP_TASKS` is DataComp's ``tasklist.yml`` (key, display name, main
metric) and :data:`DATASET_GROUPS` the groups of its ``aggregate_scores.py``,
both copied from github.com/mlfoundations/datacomp at commit
4a8df1992566ef8334773f7152e1855b1f716162.  :func:`results_row` writes one line
of DataComp's ``eval_results.jsonl`` (``evaluate.py``: ``key``, ``dataset``,
``metrics`` with ``main_metric``); :func:`aggregate_scores` is DataComp's
``get_aggregate_scores`` over the tasks that are present (DataComp insists on
all 38).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
RETRIEVAL_METRICS: tuple[str, ...] = tuple(
    f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in RETRIEVAL_KS
)
CLASSIFICATION_METRICS: tuple[str, ...] = ("acc1", "acc5", "mean_per_class_recall")
MEAN_RECALL = "mean_recall@1"
#: main metric of a set DataComp does not list, by its dataset_type
DEFAULT_MAIN_METRIC: dict[str, str] = {
    "classification": "acc1",
    "multilabel": "mean_average_precision",
    "retrieval": MEAN_RECALL,
}


@dataclass(frozen=True)
class DataCompTask:
    """One entry of DataComp's ``tasklist.yml``."""

    key: str  # e.g. "vtab/cifar100"
    name: str  # e.g. "CIFAR-100"
    main_metric: str | None  # None: DataComp computes it with code dbprune does not run (see below)

    @property
    def folder(self) -> str:
        """The folder DataComp's ``download_evalsets.py`` downloads the set into."""
        task = self.key.split("/", 1)[1] if self.key.startswith("fairness/") else self.key
        return f"wds_{task.replace('/', '-')}_test"


# DataComp's tasklist.yml (key, name, main_metric; "acc1" where it names none).  Its
# retrieval/ and misc/ tasks are Hugging Face datasets, not webdataset folders: the two
# retrieval ones are reachable through CLIP_benchmark's webdataset copies of the same
# test splits (RETRIEVAL_ALIASES).  The wilds/ and fairness/ main metrics other than
# acc1 (worst-group accuracy, macro F1, ...) need the group metadata DataComp reads with
# eval_utils/wilds_eval.py and fairness_eval.py; dbprune evaluates those folders as
# plain zero-shot classification and leaves their main metric out (None), and so does
# it for FairFace and UTKFace, whose acc1 DataComp computes over several attributes.
DATACOMP_TASKS: tuple[DataCompTask, ...] = tuple(DataCompTask(*t) for t in (
    ("vtab/caltech101", "Caltech-101", "mean_per_class_recall"),
    ("cifar10", "CIFAR-10", "acc1"),
    ("vtab/cifar100", "CIFAR-100", "acc1"),
    ("vtab/clevr_count_all", "CLEVR Counts", "acc1"),
    ("vtab/clevr_closest_object_distance", "CLEVR Distance", "acc1"),
    ("country211", "Country211", "acc1"),
    ("vtab/dtd", "Describable Textures", "acc1"),
    ("vtab/eurosat", "EuroSAT", "acc1"),
    ("fgvc_aircraft", "FGVC Aircraft", "mean_per_class_recall"),
    ("food101", "Food-101", "acc1"),
    ("gtsrb", "GTSRB", "acc1"),
    ("imagenet1k", "ImageNet 1k", "acc1"),
    ("imagenet_sketch", "ImageNet Sketch", "acc1"),
    ("imagenetv2", "ImageNet v2", "acc1"),
    ("imagenet-a", "ImageNet-A", "acc1"),
    ("imagenet-o", "ImageNet-O", "acc1"),
    ("imagenet-r", "ImageNet-R", "acc1"),
    ("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", "acc1"),
    ("mnist", "MNIST", "acc1"),
    ("objectnet", "ObjectNet", "acc1"),
    ("vtab/flowers", "Oxford Flowers-102", "mean_per_class_recall"),
    ("vtab/pets", "Oxford-IIIT Pet", "mean_per_class_recall"),
    ("voc2007", "Pascal VOC 2007", "acc1"),
    ("vtab/pcam", "PatchCamelyon", "acc1"),
    ("renderedsst2", "Rendered SST2", "acc1"),
    ("vtab/resisc45", "RESISC45", "acc1"),
    ("cars", "Stanford Cars", "acc1"),
    ("stl10", "STL-10", "acc1"),
    ("sun397", "SUN397", "acc1"),
    ("vtab/svhn", "SVHN", "acc1"),
    ("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", MEAN_RECALL),
    ("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", MEAN_RECALL),
    ("misc/winogavil", "WinoGAViL", None),  # jaccard_score_10-12: eval_utils/wino_eval.py
    ("wilds/iwildcam", "iWildCam", None),  # F1-macro_all
    ("wilds/camelyon17", "Camelyon17", "acc1"),
    ("wilds/fmow", "FMoW", None),  # acc_worst_region
    ("fairness/dollar_street", "Dollar Street", None),  # acc_top5_wg
    ("fairness/geode", "GeoDE", None),  # acc_wg
    ("fairness/fairface", "FairFace", None),
    ("fairness/utkface", "UTKFace", None),
))
_BY_KEY = {t.key: t for t in DATACOMP_TASKS}
_BY_FOLDER = {t.folder: t for t in DATACOMP_TASKS if not t.key.startswith(("retrieval/", "misc/"))}
#: CLIP_benchmark's webdataset copies (folders ``wds_<name>``) of DataComp's two
#: retrieval test sets: the Karpathy 1k Flickr30k and 5k MSCOCO-2014 test splits
RETRIEVAL_ALIASES: dict[str, str] = {
    "flickr30k": "retrieval/flickr_1k_test_image_text_retrieval",
    "mscoco_captions": "retrieval/mscoco_2014_5k_test_image_text_retrieval",
}

# DataComp's aggregate_scores.py, DATASET_GROUPS (plus "ImageNet" = ImageNet 1k, and
# "Average" over every task with a main metric)
DATASET_GROUPS: dict[str, frozenset[str]] = {
    "ImageNet dist. shifts": frozenset({
        "ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet",
    }),
    "VTAB": frozenset({
        "Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
        "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45", "SVHN",
        "SUN397",
    }),
    "Retrieval": frozenset({"Flickr", "MSCOCO", "WinoGAViL"}),
}
AGGREGATE_GROUPS: tuple[str, ...] = ("ImageNet", *DATASET_GROUPS, "Average")


def datacomp_task(folder_name: str) -> DataCompTask | None:
    """DataComp's task for a dataset folder named as DataComp downloads it
    (``wds_imagenet1k_test``, ``wds_vtab-cifar100_test``, ...) or as
    CLIP_benchmark names its copies of the retrieval sets (``wds_flickr30k``,
    ``wds_mscoco_captions``); None for any other folder."""
    if folder_name in _BY_FOLDER:
        return _BY_FOLDER[folder_name]
    alias = RETRIEVAL_ALIASES.get(re.sub(r"^wds_", "", folder_name))
    return _BY_KEY[alias] if alias else None


def dataset_name(folder_name: str) -> str:
    """A dataset's task name: DataComp's key for a DataComp folder
    (``vtab/cifar100``), else the folder name without CLIP_benchmark's
    ``wds_`` prefix and DataComp's ``_test`` suffix."""
    if folder_name in _BY_FOLDER:
        return _BY_FOLDER[folder_name].key
    return re.sub(r"_test$", "", re.sub(r"^wds_", "", folder_name)) or folder_name


def is_missing(value: Any) -> bool:
    """None or NaN (CLIP_benchmark's "undefined", e.g. acc5 below 5 classes)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def main_metric_name(task: DataCompTask | None, dataset_type: str) -> str | None:
    """DataComp's main metric for the task, else the default for its type."""
    return task.main_metric if task is not None else DEFAULT_MAIN_METRIC.get(dataset_type)


def with_mean_recall(metrics: Mapping[str, float]) -> dict[str, float]:
    """Retrieval metrics plus DataComp's ``mean_recall@1`` (``retr_eval.py``)."""
    out = dict(metrics)
    if "image_retrieval_recall@1" in out and "text_retrieval_recall@1" in out:
        out[MEAN_RECALL] = 0.5 * (out["text_retrieval_recall@1"] + out["image_retrieval_recall@1"])
    return out


def results_row(key: str, dataset: str, metrics: Mapping[str, Any], main_metric: str | None) -> dict[str, Any]:
    """One line of DataComp's ``eval_results.jsonl``: ``{"key", "dataset",
    "metrics": {..., "main_metric"}}``; undefined values (NaN) become null, as
    DataComp writes None, so the line is valid JSON."""
    clean = {m: None if is_missing(v) else float(v) for m, v in metrics.items()}
    clean["main_metric"] = clean.get(main_metric) if main_metric else None
    return {"key": key, "dataset": dataset, "metrics": clean}


@dataclass(frozen=True)
class AggregateScore:
    """One of DataComp's aggregate scores: the mean main metric of the
    ``n_present`` tasks of the group found (of ``n_group`` in DataComp's group)."""

    group: str
    score: float
    n_present: int
    n_group: int


def aggregate_scores(rows: Iterable[Mapping[str, Any]]) -> dict[str, AggregateScore]:
    """DataComp's ``get_aggregate_scores`` on ``eval_results.jsonl`` rows, over
    the tasks present: ``ImageNet`` (ImageNet 1k), each of
    :data:`DATASET_GROUPS` with at least one member present, and ``Average``
    over every row with a main metric.  Rows are keyed by ``dataset`` (the
    display name) as in DataComp; a group none of whose tasks is present is
    left out, and so is everything when no row has a main metric."""
    results: dict[str, float] = {}
    for r in rows:
        v = r.get("metrics", {}).get("main_metric")
        if not is_missing(v):
            results[str(r["dataset"])] = float(v)
    out: dict[str, AggregateScore] = {}
    if "ImageNet 1k" in results:
        out["ImageNet"] = AggregateScore("ImageNet", results["ImageNet 1k"], 1, 1)
    for group, members in DATASET_GROUPS.items():
        present = [results[d] for d in sorted(members) if d in results]
        if present:
            out[group] = AggregateScore(group, sum(present) / len(present), len(present), len(members))
    if results:
        out["Average"] = AggregateScore("Average", sum(results.values()) / len(results), len(results), len(results))
    return out
