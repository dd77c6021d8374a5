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


def embed_eval_images(layout: Layout, settings: Any, folders: Sequence[Path]) -> tuple[np.ndarray, list[str]]:
    """Every image of the classification sets among ``folders`` (CLIP_benchmark
    webdataset layout), embedded by the cluster encoder (unit rows, float32),
    and the sets' names.  ValueError (an ``EvalError``) when the folders hold
    no readable classification set or no image."""
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
