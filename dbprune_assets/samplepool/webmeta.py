"""Web metadata of a pool row, drawn the same way by both generated pools
(:mod:`.writer`'s image pool and :mod:`.datacomp`'s metadata shards): the
url the sample was "downloaded" from, the image's original size and, for
DataComp's ``face_bboxes`` column, face boxes."""

from __future__ import annotations

import numpy as np

DOMAINS: tuple[str, ...] = (
    "cdn.shapestock.example",
    "img.clipartzone.example",
    "media.iconbazaar.example",
    "static.geoshop.example",
    "i.pixelboard.example",
    "images.craftyprints.example",
)
SLUG_WORDS: tuple[str, ...] = ("shape", "icon", "clipart", "vector", "sticker", "badge", "logo", "symbol", "pattern")
FACE_RATE = 0.03  # rows with one or two face boxes


def random_url(rng: np.random.Generator) -> str:
    """An image url on one of :data:`DOMAINS`."""
    slug = SLUG_WORDS[int(rng.integers(len(SLUG_WORDS)))]
    domain = DOMAINS[int(rng.integers(len(DOMAINS)))]
    return f"https://{domain}/{int(rng.integers(10, 99))}/{slug}-{int(rng.integers(10**5, 10**6))}.jpg"


def random_original_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of the image before img2dataset resized it."""
    side = int(rng.integers(180, 1200))
    return side, int(side * rng.uniform(0.6, 1.6))


def random_faces(rng: np.random.Generator) -> list[list[float]]:
    """Face boxes ``[x0, y0, x1, y1]`` in relative coordinates: none for most
    rows, one or two for a share :data:`FACE_RATE`."""
    if rng.random() >= FACE_RATE:
        return []
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        x0, y0 = rng.uniform(0.0, 0.7, size=2)
        w, h = rng.uniform(0.05, 0.3, size=2)
        boxes.append([round(float(x0), 6), round(float(y0), 6), round(float(x0 + w), 6), round(float(y0 + h), 6)])
    return boxes
