"""Evaluation of trained models with CLIP_benchmark, on evaluation sets in its
webdataset layout (the layout DataComp's 38 evaluation sets come in).

Datasets (:func:`load_eval_dataset`, :func:`find_eval_datasets`)
---------------------------------------------------------------
A dataset is a folder holding ``test/nshards.txt`` and ``test/0.tar`` ...
``test/<n-1>.tar`` (samples: an image, ``jpg``/``png``/``webp``, with ``cls``,
an integer label, for classification or ``txt``, captions one per line, for
retrieval), ``classnames.txt`` and ``zeroshot_classification_templates.txt``
(templates with ``{c}`` for the class name; both needed for classification)
and an optional ``dataset_type.txt`` (``retrieval``, ``multilabel``, else
classification).  Its task is read from the folder: retrieval when
``dataset_type.txt`` says so, zero-shot classification otherwise.  Its name
(the ``task`` column of the ``eval`` table) is DataComp's task key for a folder
named as DataComp downloads it (``wds_vtab-cifar100_test`` -> ``vtab/cifar100``),
else the folder name without ``wds_`` / ``_test``.  A folder that holds such
folders (a local copy of DataComp's evaluation sets, or the sample pool's
``eval/`` with ``shapes/`` and ``shapes_retrieval/``) stands for all of them.

The evaluator is CLIP_benchmark 1.6.2
-------------------------------------
Datasets are built by ``clip_benchmark.datasets.builder.build_dataset(
"wds/<name>", root=<folder>, split="test", task=...)`` and batched as
CLIP_benchmark's command line does (``dataset.batched(batch_size)`` in a
``DataLoader(batch_size=None)``); metrics come from
``clip_benchmark.metrics.zeroshot_classification.evaluate`` and
``clip_benchmark.metrics.zeroshot_retrieval.evaluate``, in fp32 (``amp=False``,
as DataComp's classification evaluation), so ``clip_benchmark eval --dataset
wds/<name> --dataset_root <folder> --model <arch> --pretrained <weights>
--no_amp`` gives the same numbers.  Metric names: :mod:`.eval_metrics`.

dbprune keeps its own code only where the library cannot serve:

* checking a folder before evaluating (:func:`load_eval_dataset`):
  CLIP_benchmark reads it unchecked and fails late, with an assertion or a
  webdataset error that does not name the missing file;
* retrieval's k: ``zeroshot_retrieval.evaluate`` calls ``torch.topk`` with
  each k and fails on a set with fewer than k images, so only the k up to the
  number of images (counted from the tar headers) are asked for;
* loading dbprune's trained models (open_clip ``local-dir:`` folders, through
  ``core/models/encoders.py``), counting the images evaluated (a pass-through around
  the data loader), DataComp's ``mean_recall@1`` (one line of its
  ``retr_eval.py``) and the result rows: the ``eval`` table and DataComp's
  ``eval_results.jsonl`` (:mod:`.eval_metrics`);
* numpy 2.4: ``zeroshot_classification.accuracy`` calls ``float()`` on a
  one-element array, which numpy 2.4 refuses (TypeError: only 0-dimensional
  arrays can be converted).  :func:`clip_benchmark_metrics` replaces that one
  helper, at our import site, with the same computation ending in
  ``.item()``.  Chosen over pinning ``numpy<2.4``: the environment's other
  packages are installed against numpy 2.4, the fault is one line of one
  helper, and the replacement computes the same numbers (the tests check it
  by hand).  Drop it once CLIP_benchmark fixes ``accuracy``.

torch, open_clip and clip_benchmark are imported inside the functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from dbprune_assets.core.models.eval_metrics import (
    RETRIEVAL_KS,
    DataCompTask,
    dataset_name,
    datacomp_task,
    is_missing,
    main_metric_name,
    results_row,
    with_mean_recall,
)

if TYPE_CHECKING:  # pragma: no cover
    from dbprune_assets.core.store.layout import Layout

DATASET_TYPES: tuple[str, ...] = ("classification", "retrieval", "multilabel")
EVAL_RESULTS_FILE = "eval_results.jsonl"
_LAYOUT_HELP = (
    "expected CLIP_benchmark's webdataset layout: test/nshards.txt with test/0.tar ... test/<n-1>.tar, and "
    "classnames.txt plus zeroshot_classification_templates.txt (templates with {c}) for classification, or "
    "dataset_type.txt reading 'retrieval' for a retrieval set (captions in .txt); or a folder of such folders"
)


class EvalError(ValueError):
    """An evaluation dataset cannot be read or evaluated; the message names the folder."""


# ---------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class EvalDataset:
    """One evaluation dataset folder (see the module docstring)."""

    name: str  # the eval table's task; "wds/<name>" for CLIP_benchmark
    root: Path
    dataset_type: str  # classification | retrieval | multilabel
    n_shards: int
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    datacomp: DataCompTask | None = None
    n_images: int | None = None  # retrieval sets: images, counted from the tar headers

    @property
    def task(self) -> str:
        """CLIP_benchmark's task: ``zeroshot_retrieval`` or ``zeroshot_classification``."""
        return "zeroshot_retrieval" if self.dataset_type == "retrieval" else "zeroshot_classification"

    @property
    def wds_name(self) -> str:
        return f"wds/{self.name}"

    @property
    def key(self) -> str:
        """``key`` of its ``eval_results.jsonl`` row: DataComp's task key, else the name."""
        return self.datacomp.key if self.datacomp else self.name

    @property
    def display_name(self) -> str:
        """``dataset`` of its ``eval_results.jsonl`` row: DataComp's name, else the name."""
        return self.datacomp.name if self.datacomp else self.name

    @property
    def main_metric(self) -> str | None:
        return main_metric_name(self.datacomp, self.dataset_type)


def _not_a_dataset(root: Path) -> str:
    found = ""
    if (root / "templates.txt").is_file() or any(p.suffix == ".tar" for p in root.iterdir() if p.is_file()):
        found = (" (it has tars or templates.txt directly in it: dbprune's old evaluation layout; regenerate the "
                 "sample pool with `dbprune sample-pool --overwrite`)")
    elif any(p.is_dir() for p in root.iterdir()):
        found = " (nor does any folder in it have test/nshards.txt)"
    return (f"evaluation dataset {root}: no test/nshards.txt{found}; {_LAYOUT_HELP}. Convert other data with "
            "clip_benchmark.webdataset_builder.convert_dataset")


def _lines(path: Path) -> list[str]:
    """A metadata file's lines as CLIP_benchmark's ``build_wds_dataset`` reads them."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def load_eval_dataset(folder: str | Path) -> EvalDataset:
    """Check one dataset folder (files present, templates with ``{c}``) and
    read its task, class names and templates; a retrieval set's images are
    counted from the tar headers.  Nothing is decoded."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EvalError(f"evaluation dataset {root}: no such folder; {_LAYOUT_HELP}")
    nshards_file = root / "test" / "nshards.txt"
    if not nshards_file.is_file():
        raise EvalError(_not_a_dataset(root))
    text = nshards_file.read_text(encoding="utf-8", errors="replace").strip()
    try:
        n_shards = int(text)
    except ValueError:
        raise EvalError(f"{nshards_file}: {text[:40]!r} is not a number of shards; write the number of "
                        "test/<i>.tar files") from None
    if n_shards < 1:
        raise EvalError(f"{nshards_file}: {n_shards} shards; a dataset needs test/0.tar at least")
    tars = [root / "test" / f"{i}.tar" for i in range(n_shards)]
    missing = [t for t in tars if not t.is_file()]
    if missing:
        raise EvalError(f"evaluation dataset {root}: test/nshards.txt says {n_shards} shards but {missing[0]} "
                        f"is missing ({len(missing)} of {n_shards} missing); copy the dataset completely")
    type_file = root / "dataset_type.txt"
    dataset_type = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    if dataset_type not in DATASET_TYPES:
        raise EvalError(f"{type_file}: dataset type {dataset_type!r}; allowed: {', '.join(DATASET_TYPES)}")
    name = dataset_name(root.name)
    task = datacomp_task(root.name)
    if dataset_type == "retrieval":
        return EvalDataset(name, root, dataset_type, n_shards, datacomp=task, n_images=_count_images(tars))
    names_file, temps_file = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
    for f in (names_file, temps_file):
        if not f.is_file():
            raise EvalError(f"evaluation dataset {root}: no {f.name}, which zero-shot classification needs "
                            f"(or dataset_type.txt reading 'retrieval' for a retrieval set); {_LAYOUT_HELP}")
    classnames, templates = _lines(names_file), _lines(temps_file)
    if not any(classnames):
        raise EvalError(f"{names_file}: no class names (one per line, line i = label i)")
    if not any(templates):
        raise EvalError(f"{temps_file}: no templates (one per line, {{c}} for the class name)")
    for t in templates:
        try:
            ok = t.format(c="\x00") != t
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise EvalError(f"{temps_file}: template {t!r} has no {{c}} for the class name (CLIP_benchmark fills "
                            "templates with template.format(c=classname); write e.g. 'a photo of a {c}.')")
    return EvalDataset(name, root, dataset_type, n_shards, tuple(classnames), tuple(templates), task)


def _count_images(tars: Sequence[Path]) -> int:
    from dbprune_assets.core.pool.wds import IMAGE_EXTS, TarDamaged, iter_sample_headers

    n = 0
    for tar in tars:
        try:
            n += sum(1 for _key, exts in iter_sample_headers(tar) if any(e in exts for e in IMAGE_EXTS))
        except (TarDamaged, OSError) as err:
            raise EvalError(f"{tar}: unreadable tar ({err})") from err
    return n


def find_eval_datasets(folders: Iterable[str | Path]) -> list[EvalDataset]:
    """The datasets of ``folders``, in order: a dataset folder is itself, a
    folder of dataset folders stands for those (sorted by name; sub-folders
    without ``test/nshards.txt``, such as DataComp's ``hf_cache``, are
    skipped).  Two datasets with one name are an error."""
    out: list[EvalDataset] = []
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise EvalError(f"evaluation dataset {root}: no such folder; {_LAYOUT_HELP}")
        if (root / "test" / "nshards.txt").is_file():
            out.append(load_eval_dataset(root))
            continue
        subs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "test" / "nshards.txt").is_file())
        if not subs:
            raise EvalError(_not_a_dataset(root))
        out += [load_eval_dataset(p) for p in subs]
    seen: dict[str, Path] = {}
    for ds in out:
        if ds.name in seen:
            raise EvalError(f"two evaluation datasets named {ds.name}: {seen[ds.name]} and {ds.root}; "
                            "list each dataset once")
        seen[ds.name] = ds.root
    return out


# ---------------------------------------------------------------------------
# CLIP_benchmark


def _accuracy(output: Any, target: Any, topk: Sequence[int] = (1,)) -> list[float]:
    """``clip_benchmark.metrics.zeroshot_classification.accuracy`` with
    ``.item()`` where it calls ``float()`` on a one-element array (numpy 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0).item()) / n for k in topk]


def clip_benchmark_metrics() -> tuple[Any, Any]:
    """CLIP_benchmark's ``zeroshot_classification`` and ``zeroshot_retrieval``
    modules, ``accuracy`` replaced by :func:`_accuracy` (module docstring)."""
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    if zeroshot_classification.accuracy is not _accuracy:
        zeroshot_classification.accuracy = _accuracy
    return zeroshot_classification, zeroshot_retrieval


class _Counted:
    """A data loader that counts the images it hands out (``dataset`` kept:
    ``zeroshot_classification.evaluate`` reads ``dataloader.dataset.classes``)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.n = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.n += len(batch[0])
            yield batch


def build_loader(ds: EvalDataset, transform: Any, batch_size: int, workers: int = 0) -> tuple[Any, Any]:
    """``(dataset, loader)`` as CLIP_benchmark's command line builds them for
    ``--dataset wds/<name> --dataset_root <folder>``."""
    import torch
    from clip_benchmark.datasets.builder import build_dataset

    dataset = build_dataset(dataset_name=ds.wds_name, root=str(ds.root), transform=transform, split="test",
                            download=False, task=ds.task)
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False,
                                         num_workers=max(0, min(workers, ds.n_shards)))
    return dataset, loader


def _autocast_device(device: str) -> str:
    """CLIP_benchmark passes its device to ``torch.autocast``, which takes
    ``cuda`` but not ``cuda:N``: select N and say ``cuda``."""
    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(int(device.split(":", 1)[1]))
        return "cuda"
    return device


@dataclass(frozen=True)
class DatasetResult:
    dataset: EvalDataset
    metrics: dict[str, float]  # CLIP_benchmark's (NaN where undefined), plus mean_recall@1 for retrieval
    n: int  # images evaluated


def evaluate_dataset(model: Any, transform: Any, tokenizer: Any, ds: EvalDataset, device: str, batch_size: int,
                     workers: int = 0) -> DatasetResult:
    """CLIP_benchmark's zero-shot classification or retrieval of ``model`` on
    ``ds`` (fp32); retrieval at k = 1, 5, 10 up to the number of images."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    zsc, zsr = clip_benchmark_metrics()
    dev = _autocast_device(device)
    model.eval()
    dataset, loader = build_loader(ds, transform, batch_size, workers)
    counted = _Counted(loader)
    try:
        if ds.task == "zeroshot_retrieval":
            ks = [k for k in RETRIEVAL_KS if k <= (ds.n_images or 0)]
            if not ks:
                raise EvalError(f"evaluation dataset {ds.root}: no images in its tars")
            metrics = with_mean_recall(zsr.evaluate(model, counted, tokenizer, device=dev, amp=False,
                                                    recall_k_list=ks))
        else:
            metrics = zsc.evaluate(model, counted, tokenizer, list(dataset.classes), list(dataset.templates),
                                   device=dev, amp=False, verbose=False)
    except EvalError:
        raise
    except Exception as err:  # noqa: BLE001 - webdataset, PIL and torch raise many types
        raise EvalError(f"evaluating {ds.name} ({ds.root}) with CLIP_benchmark failed: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if counted.n == 0:
        raise EvalError(f"evaluation dataset {ds.root}: CLIP_benchmark read no samples (images with "
                        f"{'txt' if ds.task == 'zeroshot_retrieval' else 'cls'}) from its tars")
    return DatasetResult(ds, {k: float(v) for k, v in metrics.items()}, counted.n)


def load_model(model_dir: str | Path, device: str) -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` of an open_clip ``local-dir:`` folder, eval mode."""
    from dbprune_assets.core.models.encoders import ResolvedEncoder, load_encoder
    from dbprune_assets.core.models.model_dir import LOCAL_DIR, weights_path

    folder = Path(model_dir).expanduser().resolve()
    enc = load_encoder(ResolvedEncoder("local-dir", LOCAL_DIR + str(folder), None, "trained_model", weights_path(folder)), device)
    return enc.model, enc.preprocess, enc.tokenizer


def evaluate_model(model_dir: str | Path, datasets: Sequence[EvalDataset], device: str, batch_size: int,
                   workers: int = 0) -> list[DatasetResult]:
    """Every dataset's result for the model folder ``model_dir``, in order."""
    from dbprune_assets.core.running.device import torch_device

    if not datasets:
        raise EvalError("evaluate_model: no evaluation dataset given")
    dev = torch_device(device)
    model, preprocess, tokenizer = load_model(model_dir, dev)
    return [evaluate_dataset(model, preprocess, tokenizer, ds, dev, batch_size, workers) for ds in datasets]


# ---------------------------------------------------------------------------
# results


def eval_rows(results: Iterable[DatasetResult]) -> list[dict[str, Any]]:
    """Rows for the ``eval`` table (the caller adds ``strategy`` and ``seed``):
    ``{"task": dataset name, "metric", "value", "n": images evaluated}``;
    undefined metrics (NaN, e.g. acc5 below 5 classes) get no row."""
    return [
        {"task": r.dataset.name, "metric": m, "value": float(v), "n": r.n}
        for r in results for m, v in r.metrics.items() if not is_missing(v)
    ]


def datacomp_rows(results: Iterable[DatasetResult]) -> list[dict[str, Any]]:
    """DataComp's ``eval_results.jsonl`` rows (:func:`.eval_metrics.results_row`)."""
    return [results_row(r.dataset.key, r.dataset.display_name, r.metrics, r.dataset.main_metric) for r in results]


def eval_results_path(layout: "Layout", strategy: str, seed: int) -> Path:
    """``artefacts/eval_scores/<strategy>/seed<k>/eval_results.jsonl``."""
    return layout.artefact_dir("eval_scores") / strategy / f"seed{int(seed)}" / EVAL_RESULTS_FILE


def write_eval_results(path: Path, rows: Iterable[dict[str, Any]], tmp_root: Path | None = None) -> None:
    """DataComp's ``eval_results.jsonl``: one JSON object per line (atomic)."""
    from dbprune_assets.core.store.atomic import write_bytes

    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_bytes(path, text.encode(), tmp_root)


def read_eval_results(path: Path) -> list[dict[str, Any]]:
    """The rows of an ``eval_results.jsonl`` (empty when the file is absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
