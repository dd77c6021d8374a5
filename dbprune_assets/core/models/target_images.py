"""The evaluation sets' images embedded by the pool's encoder: the target set
``datacomp_image`` falls back to (``core/strategies/targets.py``) when neither
the settings nor the pool name one."""

from __future__ import annotations

import tarfile
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from dbprune_assets.core.store.layout import Layout

#: image extensions of a CLIP_benchmark webdataset tar
IMAGE_EXTENSIONS = (".webp", ".jpg", ".jpeg", ".png")


def _tar_images(tars: Sequence[Path]) -> list[Any]:
    from PIL import Image

    images = []
    for tar in tars:
        with tarfile.open(tar) as t:
            for m in t:
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS):
                    data = t.extractfile(m)
                    if data is not None:
                        images.append(Image.open(BytesIO(data.read())).convert("RGB"))
    return images


#: the embedded evaluation images, beside the encoder (made by the ``encoder`` step, which has the encoder
#: loaded; a ``pruned_subset`` step then reads them without loading torch)
CACHE = "eval_targets.npz"


def cache_key(layout: Layout, folders: Sequence[Path]) -> str:
    """What the cached embeddings depend on: the encoder (its ``encoder.json``:
    what resolved, the weights' hashes) and every file under ``folders`` (path,
    size, modification time)."""
    import hashlib

    h = hashlib.sha256()
    enc = layout.encoder_dir / "encoder.json"
    h.update(enc.read_bytes() if enc.is_file() else b"no encoder.json")
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def embed_eval_images(layout: Layout, settings: Any, folders: Sequence[Path]) -> tuple[np.ndarray, list[str]]:
    """Every image of the classification sets among ``folders`` (CLIP_benchmark
    webdataset layout), embedded by the cluster encoder (unit rows, float32),
    and the sets' names: from ``models/encoder/eval_targets.npz`` when its key
    (:func:`cache_key`) is current, else embedded and cached.  ValueError (an
    ``EvalError``) when the folders hold no readable classification set or no image."""
    from dbprune_assets.core.store.atomic import atomic_path

    key = cache_key(layout, folders)
    cache = layout.encoder_dir / CACHE
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return np.asarray(z["x"]), [str(n) for n in z["names"]]
    x, names = _embed(layout, settings, folders)
    with atomic_path(cache, layout.tmp) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x, names=np.array(names), key=np.array(key))
    return x, names


def _embed(layout: Layout, settings: Any, folders: Sequence[Path]) -> tuple[np.ndarray, list[str]]:
    from dbprune_assets.core.models.embed import encode_images
    from dbprune_assets.core.models.encoders import load_encoder, resolve_encoder
    from dbprune_assets.core.models.evaluate import EvalError, find_eval_datasets

    sets = [d for d in find_eval_datasets(dict.fromkeys(str(f) for f in folders)) if d.dataset_type == "classification"]
    images: list[Any] = []
    for d in sets:
        images += _tar_images(sorted((d.root / "test").glob("*.tar")))
    if not images:
        raise EvalError(f"no classification images in {', '.join(map(str, folders))}")
    enc = load_encoder(resolve_encoder(settings.encoder.cluster_encoder, layout.encoder_dir / "bootstrap"),
                       settings.compute.device)
    x = encode_images(enc.model, enc.preprocess, images, batch_size=settings.compute.batch_size, device=enc.device)
    return x, [d.name for d in sets]
