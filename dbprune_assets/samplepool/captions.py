"""Captions of the sample pool: web-style alt texts and the zero-shot prompt templates."""

from __future__ import annotations

import numpy as np

from .render import RenderParams

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a_name}",
    "{name} on a {bg} background",
    "{a_size} {name}",
    "{a_name} {pos}",
    "a drawing of {a_name}",
    "{name} icon",
    "{a_size} {name} {pos} on a {bg} background",
    "clipart of {a_name}",
    "an image showing {a_name}",
    "{name}",
)


EVAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a {} shape.",
    "an image of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} on a plain background.",
    "a {} icon.",
)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _describe(params: RenderParams, size: int) -> dict[str, str]:
    """Words for the rendering's size, position and background (alt-text detail)."""
    m = params.main
    rel = m.radius / size
    size_word = "small" if rel < 0.25 else ("large" if rel > 0.36 else "medium")
    third = size / 3
    col = "left" if m.cx < third else ("right" if m.cx > 2 * third else "")
    row = "top" if m.cy < third else ("bottom" if m.cy > 2 * third else "")
    if row and col:
        pos = f"in the {row} {col}"
    elif row or col:
        pos = f"at the {row}" if row else f"on the {col}"
    else:
        pos = "in the center"
    lum = float(np.dot(params.bg_rgb, (0.299, 0.587, 0.114)))
    tone = "dark" if lum < 110 else "light"
    bg = {"none": "plain", "gradient": "gradient", "noise": "blotchy", "stripes": "striped", "checker": "checkered"}
    return {"size": size_word, "pos": pos, "bg": f"{tone} {bg[params.texture]}"}


def make_caption(name: str, params: RenderParams, size: int, rng: np.random.Generator) -> str:
    """A web-style alt text for concept ``name`` drawn from the caption templates.

    Some templates describe size, position and background, as real alt texts
    do; that gives a contrastive encoder a reason to tell renderings apart.
    """
    words = _describe(params, size)
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(
        name=name,
        a_name=f"{_article(name)} {name}",
        a_size=f"{_article(words['size'])} {words['size']}",
        pos=words["pos"],
        bg=words["bg"],
    )
