"""The target images of ``datacomp_image``: where they come from and their embeddings.

DataComp's image-based filter keeps the pool samples whose image cluster is
the nearest one to some image of a target set (ImageNet-1k's training images
in DataComp).  The targets, first found first used:

1. ``strategies.target_embeddings``: a ``.npy`` file (rows = images), a
   ``.npz`` file, or a folder of them (read in name order, concatenated);
2. the pool's own ``targets/`` folder (the DataComp-format sample pool writes
   ``targets/image_embeddings.npz``: images of its evaluation classes, with
   the shards' npz keys);
3. the evaluation sets' images (``eval.datasets``, else the pool's ``eval/``;
   classification sets), embedded by the encoder that embeds the pool: only
   when dbprune computes the pool's embeddings (``embeddings.source:
   compute``), since a precomputed pool's encoder is not at hand.

In an ``.npz`` with several arrays the one used is the pool's image key
(``<embeddings.model>_img`` for a DataComp pool), else the only key ending in
``_img`` or named ``img_emb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from dbprune_assets.core.strategies.base import StrategyUnavailable

if TYPE_CHECKING:
    from dbprune_assets.core.store.layout import Layout

#: the pool's target folder
POOL_TARGETS = "targets"
#: the file the DataComp-format sample pool writes there
SAMPLE_POOL_FILE = "image_embeddings.npz"
#: what a user without targets is told
HOW = ("set strategies.target_embeddings to a .npy/.npz file (or folder of them) of image embeddings from the "
       "pool's encoder (DataComp uses ImageNet-1k's training images)")


#: embeds the images of evaluation set folders: (unit rows, the sets' names)
EmbedEval = Callable[[list[Path]], tuple[np.ndarray, list[str]]]


@dataclass(frozen=True)
class Targets:
    embeddings: np.ndarray  #: unit rows, float32 (n, d)
    source: str  #: where they came from, in words


def _embedding_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
    return [path] if path.is_file() else []


def _eval_folders(layout: Layout, settings: Any) -> list[Path]:
    cfg = settings.eval
    folders = [Path(f) for f in (*(cfg.datasets or ()), *(p for p in (cfg.zeroshot, cfg.retrieval) if p))]
    return folders or ([layout.eval_dir] if layout.eval_dir.is_dir() else [])


def target_source(layout: Layout, settings: Any) -> tuple[str, Path | list[Path]] | None:
    """Which of the module docstring's sources applies: ``("setting", path)``,
    ``("pool", folder)`` or ``("eval", folders)``; None when none does.
    File checks only.  A set ``strategies.target_embeddings`` that holds no
    .npy/.npz file is an error (StrategyUnavailable) rather than a fallback."""
    setting = settings.strategies.target_embeddings
    if setting:
        path = Path(setting).expanduser()
        if not _embedding_files(path):
            raise StrategyUnavailable(f"strategies.target_embeddings: {path} is not a .npy/.npz file or a folder "
                                      f"holding some; {HOW}")
        return "setting", path
    pool_dir = Path(layout.pool) / POOL_TARGETS
    if _embedding_files(pool_dir):
        return "pool", pool_dir
    if settings.embeddings.source == "compute":
        folders = _eval_folders(layout, settings)
        if folders:
            return "eval", folders
    return None


def _npz_array(path: Path, settings: Any) -> np.ndarray:
    with np.load(path) as z:
        keys = list(z.keys())
        if len(keys) == 1:
            return np.asarray(z[keys[0]])
        wanted = f"{settings.embeddings.model}_img"
        if settings.embeddings.source == "datacomp" and wanted in keys:
            return np.asarray(z[wanted])
        named = [k for k in keys if k.endswith("_img") or k == "img_emb"]
        if len(named) == 1:
            return np.asarray(z[named[0]])
        if wanted in keys:
            return np.asarray(z[wanted])
    raise ValueError(f"{path}: several arrays ({', '.join(keys)}) and none is the pool's image key {wanted!r}; "
                     "keep one array in the file or name it so")


def read_embedding_files(path: Path, settings: Any) -> np.ndarray:
    """The rows of every .npy/.npz file at ``path`` (a file or a folder), concatenated."""
    parts = []
    for f in _embedding_files(path):
        a = _npz_array(f, settings) if f.suffix == ".npz" else np.load(f)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"{f}: target embeddings must be a non-empty 2-d array (images x dims), got {a.shape}")
        parts.append(np.asarray(a, dtype=np.float32))
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise ValueError(f"{path}: the files hold embeddings of different dimensions {sorted(dims)}")
    return np.concatenate(parts)


def _unit(x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise ValueError("target embeddings hold NaN or inf values")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if (n == 0).any():
        raise ValueError("target embeddings hold an all-zero row")
    return (x / n).astype(np.float32)


def load_targets(layout: Layout, settings: Any, embed_eval: EmbedEval | None = None) -> Targets:
    """The targets (module docstring); StrategyUnavailable when there are none.
    ``embed_eval(folders)`` embeds the evaluation sets' images with the pool's
    encoder (``core/models/target_images.py``, which the strategy context carries)."""
    found = target_source(layout, settings)
    if found is None:
        raise StrategyUnavailable(f"datacomp_image has no target images: {HOW}")
    kind, where = found
    if kind in ("setting", "pool"):
        assert isinstance(where, Path)
        x = read_embedding_files(where, settings)
        label = "strategies.target_embeddings" if kind == "setting" else "the pool's targets"
        return Targets(_unit(x), f"{len(x)} target embeddings from {label} ({where})")
    assert isinstance(where, list)
    if embed_eval is None:
        raise StrategyUnavailable(f"datacomp_image: no encoder at hand to embed the evaluation images; {HOW}")
    try:
        x, names = embed_eval(where)
    except ValueError as e:
        raise StrategyUnavailable(f"datacomp_image: the evaluation sets give no target images ({e}); {HOW}") from None
    return Targets(_unit(x), f"{len(x)} images of the evaluation sets {', '.join(names)}, embedded by the encoder")
