"""Evaluation of trained models: zero-shot classification and image-text retrieval.

Splits (:func:`load_eval_split`)
--------------------------------
* **webdataset folder** (or one ``.tar``): ``NNNNN.tar`` holding ``KEY.jpg``
  (or png/jpeg/webp) with ``KEY.cls`` (integer label) and/or ``KEY.txt``
  (captions, one per line), optionally ``sizes.json`` (then the item count is
  taken from it instead of reading the tars through), ``classnames.txt`` (one
  class name per line, line i = label i) and ``templates.txt`` (prompt
  templates with ``{}`` for the class name).  The sample pool's ``eval/`` split
  is such a folder (labels, one caption per image, class names and templates);
  a captioned webdataset without labels serves retrieval only, one with labels
  but no ``classnames.txt`` needs class names passed in.
* **labelled image folder** (torchvision ``ImageFolder`` layout: one
  sub-folder per class holding its images): labels are the sorted sub-folder
  indices, class names the folder names (``_`` read as a space) unless a
  ``classnames.txt`` lies beside the class folders; templates come from
  ``templates.txt`` there, else open_clip's OpenAI ImageNet templates (or the
  "simple" ones).  Zero-shot only (no captions).

Splits are streamed: images are decoded batch by batch, never all held.

Metrics: :mod:`dbprune_assets.core.eval_metrics` (their definitions);
zero-shot uses open_clip's ``build_zero_shot_classifier`` (class names x
templates, averaged, unit norm) against L2-normalised image embeddings.

torch and open_clip are imported inside the functions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, TypeVar

import numpy as np

from .device import torch_device
from .eval_metrics import retrieval_metrics, topk_accuracy
from .progress import progress
from .wds import IMAGE_EXTS, TarDamaged, image_member, iter_sample_headers, iter_samples

T = TypeVar("T")

FOLDER_IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class EvalError(ValueError):
    """An evaluation split cannot be read or does not support the requested task."""


# ---------------------------------------------------------------------------
# splits


@dataclass
class EvalItem:
    key: str
    image: Any  # PIL.Image (RGB)
    label: int | None
    captions: list[str]


@dataclass
class EvalSplit:
    """A streamed evaluation split (see the module docstring)."""

    name: str
    kind: Literal["webdataset", "imagefolder"]
    root: Path
    n_items: int
    classnames: list[str] | None = None
    templates: list[str] | None = None
    has_labels: bool = False
    has_captions: bool = False
    files: list[Path] = field(default_factory=list)  # tars, or the image files of an image folder
    labels: list[int] = field(default_factory=list)  # image folder: label per file

    @property
    def supports_zeroshot(self) -> bool:
        return self.has_labels and bool(self.classnames) and bool(self.templates)

    @property
    def supports_retrieval(self) -> bool:
        return self.has_captions

    def iter_items(self) -> Iterator[EvalItem]:
        from PIL import Image

        if self.kind == "imagefolder":
            for path, label in zip(self.files, self.labels):
                with Image.open(path) as im:
                    yield EvalItem(str(path.relative_to(self.root)), im.convert("RGB"), label, [])
            return
        for tar in self.files:
            for key, members in _read_tar(tar, iter_samples):
                found = image_member(members)
                if found is None:
                    continue
                try:
                    with Image.open(io.BytesIO(found[1])) as im:
                        image = im.convert("RGB")
                except Exception as err:  # noqa: BLE001 - PIL raises many types
                    raise EvalError(f"{tar}, key {key}: undecodable image ({type(err).__name__}: {err})") from err
                label = None
                if "cls" in members:
                    try:
                        label = int(members["cls"].decode().strip())
                    except ValueError:
                        raise EvalError(f"{tar}, key {key}: .cls is not an integer: {members['cls'][:40]!r}") from None
                captions = _captions(members.get("txt"))
                yield EvalItem(key, image, label, captions)


def _captions(raw: bytes | None) -> list[str]:
    if raw is None:
        return []
    return [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]


def _read_tar(tar_path: Path, reader: Callable[[Path], Iterator[tuple[str, dict[str, T]]]]) -> Iterator[tuple[str, dict[str, T]]]:
    """The samples of one split tar through a :mod:`~dbprune_assets.core.wds` reader; a damaged tar is an :class:`EvalError`."""
    try:
        yield from reader(tar_path)
    except (TarDamaged, OSError) as err:
        raise EvalError(f"{tar_path}: unreadable tar ({err})") from err


def _read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def default_templates(which: Literal["openai", "simple"] = "openai") -> list[str]:
    """open_clip's ImageNet prompt templates as ``str.format`` strings."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    src = OPENAI_IMAGENET_TEMPLATES if which == "openai" else SIMPLE_IMAGENET_TEMPLATES
    return [t("{}") if callable(t) else str(t) for t in src]


def load_eval_split(
    path: str | Path,
    *,
    name: str | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    template_set: Literal["openai", "simple"] = "openai",
) -> EvalSplit:
    """Open an evaluation split (webdataset folder or tar, or labelled image folder).

    ``classnames`` / ``templates`` override the split's files; templates
    default to the split's ``templates.txt``, else open_clip's ``template_set``.
    Reads tar headers (or ``sizes.json``) to count items; no image is decoded.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise EvalError(f"evaluation split {root}: no such file or folder")
    folder = root if root.is_dir() else root.parent
    split_name = name or (root.stem if root.is_file() else root.name)
    names = list(classnames) if classnames is not None else _read_lines(folder / "classnames.txt")
    temps = list(templates) if templates is not None else _read_lines(folder / "templates.txt")
    for t in temps or []:
        if "{}" not in t:
            raise EvalError(f"{folder / 'templates.txt'}: template {t!r} has no '{{}}' for the class name")

    tars = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(".tar"))
    if tars:
        return _webdataset_split(root, split_name, tars, names, temps, template_set)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        return _imagefolder_split(root, split_name, classes, names, temps, template_set)
    raise EvalError(
        f"evaluation split {root}: neither webdataset tars (NNNNN.tar) nor class sub-folders of images "
        "(ImageFolder layout) found"
    )


def _webdataset_split(
    root: Path, name: str, tars: list[Path], names: list[str] | None, temps: list[str] | None, template_set: str
) -> EvalSplit:
    sizes = _sizes_json(root if root.is_dir() else root.parent, tars)
    n = 0
    labels = captions = False
    if sizes is not None:
        # count from sizes.json; tell labels / captions from the first samples
        n = sum(sizes)
        for i, (_key, exts) in enumerate(_read_tar(tars[0], iter_sample_headers)):
            labels |= "cls" in exts
            captions |= "txt" in exts
            if i >= 15:
                break
    else:
        for tar in tars:
            for _key, exts in _read_tar(tar, iter_sample_headers):
                if not any(e in exts for e in IMAGE_EXTS):
                    continue
                n += 1
                labels |= "cls" in exts
                captions |= "txt" in exts
    if n == 0:
        raise EvalError(f"evaluation split {root}: the tars hold no images ({', '.join(IMAGE_EXTS)})")
    if labels and names is not None and temps is None:
        temps = default_templates(template_set)  # type: ignore[arg-type]
    return EvalSplit(name, "webdataset", root, n, names, temps, labels, captions, list(tars))


def _sizes_json(folder: Path, tars: list[Path]) -> list[int] | None:
    """Per-tar sample counts from ``sizes.json`` when it lists every tar."""
    path = folder / "sizes.json"
    if not path.is_file():
        return None
    try:
        sizes = json.loads(path.read_text())
        return [int(sizes[t.name]) for t in tars]
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _imagefolder_split(
    root: Path, name: str, classes: list[str], names: list[str] | None, temps: list[str] | None, template_set: str
) -> EvalSplit:
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        imgs = sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_SUFFIXES)
        files += imgs
        labels += [i] * len(imgs)
    if not files:
        raise EvalError(f"image folder {root}: the class folders hold no images")
    if names is None:
        names = [c.replace("_", " ") for c in classes]
    elif len(names) != len(classes):
        raise EvalError(f"{root}: {len(names)} class names for {len(classes)} class folders")
    temps = temps or default_templates(template_set)  # type: ignore[arg-type]
    return EvalSplit(name, "imagefolder", root, len(files), names, temps, True, False, files, labels)


def resolve_split(split: EvalSplit | str | Path | None) -> EvalSplit | None:
    if split is None or isinstance(split, EvalSplit):
        return split
    return load_eval_split(split)


# ---------------------------------------------------------------------------
# embeddings


@dataclass
class SplitEmbeddings:
    """L2-normalised embeddings of a split, rows in split order."""

    image_emb: np.ndarray  # [n_images, d] float32
    labels: np.ndarray  # [n_images] int64, -1 where unlabelled
    text_emb: np.ndarray  # [n_texts, d] float32 (empty when texts were not embedded)
    text_to_image_index: np.ndarray  # [n_texts] int64
    keys: list[str]

    @property
    def n_images(self) -> int:
        return int(self.image_emb.shape[0])


def embed_split(
    model: Any,
    preprocess: Callable[[Any], Any],
    tokenizer: Callable[..., Any] | None,
    split: EvalSplit,
    device: str,
    batch_size: int,
    *,
    texts: bool = True,
) -> SplitEmbeddings:
    """Stream ``split`` through ``model``: normalised image embeddings, labels
    and (``texts`` and a tokenizer given) caption embeddings with the index of
    each caption's image.  fp32, ``torch.inference_mode``."""
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    model.eval()
    img_chunks: list[np.ndarray] = []
    txt_chunks: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    owners: list[int] = []
    pending_imgs: list[Any] = []
    pending_txt: list[str] = []

    def flush_images() -> None:
        if pending_imgs:
            x = torch.stack(pending_imgs).to(device)
            img_chunks.append(model.encode_image(x, normalize=True).float().cpu().numpy())
            pending_imgs.clear()

    def flush_texts() -> None:
        if pending_txt:
            assert tokenizer is not None
            t = tokenizer(pending_txt).to(device)
            txt_chunks.append(model.encode_text(t, normalize=True).float().cpu().numpy())
            pending_txt.clear()

    with torch.inference_mode():
        items = progress(split.iter_items(), desc=f"evaluate: embedding {split.name}", unit="image", total=split.n_items)
        for i, item in enumerate(items):
            pending_imgs.append(preprocess(item.image))
            labels.append(-1 if item.label is None else int(item.label))
            keys.append(item.key)
            if texts and tokenizer is not None:
                for cap in item.captions:
                    pending_txt.append(cap)
                    owners.append(i)
                    if len(pending_txt) >= batch_size:
                        flush_texts()
            if len(pending_imgs) >= batch_size:
                flush_images()
        flush_images()
        flush_texts()
    dim = img_chunks[0].shape[1] if img_chunks else 0
    image_emb = np.concatenate(img_chunks) if img_chunks else np.zeros((0, dim), np.float32)
    text_emb = np.concatenate(txt_chunks) if txt_chunks else np.zeros((0, dim), np.float32)
    return SplitEmbeddings(
        image_emb.astype(np.float32, copy=False),
        np.asarray(labels, dtype=np.int64),
        text_emb.astype(np.float32, copy=False),
        np.asarray(owners, dtype=np.int64),
        keys,
    )


# ---------------------------------------------------------------------------
# model-level metrics


def zeroshot_classifier(model: Any, tokenizer: Callable[..., Any], split: EvalSplit, device: str) -> np.ndarray:
    """open_clip's zero-shot classifier of the split's class names and templates: [d, classes]."""
    from open_clip import build_zero_shot_classifier

    if not split.has_labels:
        raise EvalError(f"zero-shot on {split.name} ({split.root}): the split has no labels (.cls or class folders)")
    if not split.classnames:
        raise EvalError(f"zero-shot on {split.name} ({split.root}): no class names (add classnames.txt, one per label)")
    if not split.templates:
        raise EvalError(f"zero-shot on {split.name} ({split.root}): no prompt templates")
    w = build_zero_shot_classifier(
        model, tokenizer, list(split.classnames), list(split.templates), num_classes_per_batch=10, device=device
    )
    return w.float().cpu().numpy()


def zeroshot_metrics(
    model: Any,
    preprocess: Callable[[Any], Any],
    tokenizer: Callable[..., Any],
    split: EvalSplit,
    device: str,
    batch_size: int,
    *,
    embeddings: SplitEmbeddings | None = None,
) -> dict[str, float]:
    """``{"acc1", "acc5"}`` of open_clip's zero-shot classifier on the split's
    labelled images (``embeddings`` reuses an :func:`embed_split` result)."""
    classifier = zeroshot_classifier(model, tokenizer, split, device)
    emb = embeddings or embed_split(model, preprocess, tokenizer, split, device, batch_size, texts=False)
    keep = emb.labels >= 0
    if not keep.any():
        raise EvalError(f"zero-shot on {split.name}: no labelled images")
    labels = emb.labels[keep]
    if labels.max() >= classifier.shape[1]:
        raise EvalError(f"zero-shot on {split.name}: label {int(labels.max())} but only {classifier.shape[1]} class names")
    logits = emb.image_emb[keep] @ classifier
    acc = topk_accuracy(logits, labels, (1, 5))
    return {"acc1": acc[1], "acc5": acc[5]}


def load_model(model_dir: str | Path, device: str) -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` of an open_clip ``local-dir:`` folder, eval mode."""
    from dbprune_assets.core.encoders import ResolvedEncoder, load_encoder
    from dbprune_assets.core.model_dir import LOCAL_DIR, weights_path

    folder = Path(model_dir).expanduser().resolve()
    enc = load_encoder(ResolvedEncoder("local-dir", LOCAL_DIR + str(folder), None, "trained_model", weights_path(folder)), device)
    return enc.model, enc.preprocess, enc.tokenizer


def evaluate_model(
    model_dir: str | Path,
    split_zeroshot: EvalSplit | str | Path | None,
    split_retrieval: EvalSplit | str | Path | None,
    device: str,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Rows for the ``eval`` table (the caller adds ``strategy`` and ``seed``):
    ``{"task": "zeroshot" | "retrieval", "metric", "value", "dataset", "n"}``
    where ``dataset`` names the split and ``n`` counts the images evaluated
    (labelled images for zero-shot, images for retrieval).  When both splits
    are the same folder its images are embedded once."""
    dev = torch_device(device)
    zs, rt = resolve_split(split_zeroshot), resolve_split(split_retrieval)
    if zs is None and rt is None:
        raise EvalError("evaluate_model: no evaluation split given")
    if zs is not None and not zs.has_labels:
        raise EvalError(f"zero-shot split {zs.root}: no labels (.cls members or class folders)")
    if zs is not None and not zs.classnames:
        raise EvalError(f"zero-shot split {zs.root}: no class names (add classnames.txt, one name per label)")
    if rt is not None and not rt.supports_retrieval:
        raise EvalError(f"retrieval split {rt.root}: no captions (.txt members)")
    model, preprocess, tokenizer = load_model(model_dir, dev)
    zs_rows: list[dict[str, Any]] = []
    rt_rows: list[dict[str, Any]] = []
    rt_emb: SplitEmbeddings | None = None
    if rt is not None:
        rt_emb = embed_split(model, preprocess, tokenizer, rt, dev, batch_size, texts=True)
        for metric, value in retrieval_metrics(rt_emb.image_emb, rt_emb.text_emb, rt_emb.text_to_image_index).items():
            rt_rows.append({"task": "retrieval", "metric": metric, "value": value, "dataset": rt.name, "n": rt_emb.n_images})
    if zs is not None:
        same = rt is not None and rt.kind == zs.kind and rt.files == zs.files
        emb = rt_emb if same and rt_emb is not None else embed_split(model, preprocess, tokenizer, zs, dev, batch_size, texts=False)
        n = int((emb.labels >= 0).sum())
        for metric, value in zeroshot_metrics(model, preprocess, tokenizer, zs, dev, batch_size, embeddings=emb).items():
            zs_rows.append({"task": "zeroshot", "metric": metric, "value": value, "dataset": zs.name, "n": n})
    return zs_rows + rt_rows
