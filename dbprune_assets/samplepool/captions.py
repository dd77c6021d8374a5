"""Captions of the sample pool: web-style alt texts and the zero-shot prompt templates."""

from __future__ import annotations

import numpy as np

from dbprune_assets.samplepool.render import RenderParams

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


#: zero-shot prompt templates of the sample pool's classification set, in
#: CLIP_benchmark's ``zeroshot_classification_templates.txt`` form (``{c}`` for the class name)
EVAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a {c} shape.",
    "an image of a {c}.",
    "a small {c}.",
    "a large {c}.",
    "a {c} on a plain background.",
    "a {c} icon.",
)

#: named background colours of the sample pool's retrieval set (drawn by the
#: writer, named back by :func:`describe_rendering`)
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "charcoal": (64, 64, 64),
    "gray": (128, 128, 128),
    "pale gray": (205, 205, 205),
    "brown": (120, 72, 40),
    "pink": (240, 160, 200),
    "navy": (20, 30, 90),
    "olive": (110, 110, 30),
    "beige": (225, 210, 170),
}
_TEXTURE_WORDS = {"none": "plain", "gradient": "shaded", "noise": "blotchy", "stripes": "striped", "checker": "checkered"}
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six")
# alt-text words (CAPTION_TEMPLATES' {a_size}, {pos}, {bg})
_SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")
_POSITIONS: tuple[str, ...] = (
    "in the center", "at the top", "at the bottom", "on the left", "on the right",
    "in the top left", "in the top right", "in the bottom left", "in the bottom right",
)
_TONES: tuple[str, ...] = ("dark", "light")
_BG_WORDS = {"none": "plain", "gradient": "gradient", "noise": "blotchy", "stripes": "striped", "checker": "checkered"}
_TEXTURES: tuple[str, ...] = tuple(_BG_WORDS.values())


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _luma(rgb: tuple[float, float, float] | tuple[int, int, int]) -> float:
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def _fill(template: str, name: str, size: str, pos: str, bg: str) -> str:
    """A caption template filled in for concept ``name`` and the size, position and background words."""
    return template.format(name=name, a_name=f"{_article(name)} {name}", a_size=f"{_article(size)} {size}",
                           pos=pos, bg=bg)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


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
    tone = "dark" if _luma(params.bg_rgb) < 110 else "light"
    return {"size": size_word, "pos": pos, "bg": f"{tone} {_BG_WORDS[params.texture]}"}


def make_caption(name: str, params: RenderParams, size: int, rng: np.random.Generator) -> str:
    """A web-style alt text for concept ``name`` drawn from the caption templates.

    Some templates describe size, position and background, as real alt texts
    do; that gives a contrastive encoder a reason to tell renderings apart.
    """
    words = _describe(params, size)
    template = _pick(rng, CAPTION_TEMPLATES)
    return _fill(template, name, words["size"], words["pos"], words["bg"])


def drawn_caption(name: str, rng: np.random.Generator) -> str:
    """An alt text for concept ``name`` from the caption templates, its size,
    position and background words drawn at random (for a pool without
    renderings to describe: the DataComp-format pool)."""
    template = _pick(rng, CAPTION_TEMPLATES)
    size = _pick(rng, _SIZE_WORDS)
    bg = f"{_pick(rng, _TONES)} {_pick(rng, _TEXTURES)}"
    return _fill(template, name, size, _pick(rng, _POSITIONS), bg)


def describe_rendering(name: str, params: RenderParams, size: int, base_rgb: tuple[int, int, int]) -> tuple[str, str]:
    """Two captions that describe one rendering of concept ``name`` as a COCO
    caption describes its photo: the shape's size, shade (against the
    concept's ``base_rgb``), place on a 3 x 3 grid, tilt, the background's
    colour (nearest :data:`BACKGROUND_COLORS` entry) and texture, and how many
    other shapes are around.  Read from ``params`` alone (deterministic), so the
    words always match the pixels; renderings that differ in any of these
    facets get different captions."""
    m = params.main
    rel = m.radius / size
    size_word = "small" if rel < 0.15 else ("medium" if rel < 0.22 else "large")
    ratio = _luma(m.rgb) / max(1.0, _luma(base_rgb))
    shade = ("grayish " if name.startswith("white") else "dark ") if ratio < 0.85 else ("light " if ratio > 1.1 else "")
    third = size / 3
    col = "left" if m.cx < third else ("right" if m.cx >= 2 * third else "")
    row = "top" if m.cy < third else ("bottom" if m.cy >= 2 * third else "")
    if row and col:
        pos = f"in the {row} {col} corner"
    elif row or col:
        pos = f"at the {row or col} edge"
    else:
        pos = "in the center"
    tilt = ""
    if m.shape not in ("circle", "ring"):
        tilt = "tilted left" if m.rotation < -12 else ("tilted right" if m.rotation > 12 else "upright")
    bg_name = min(BACKGROUND_COLORS, key=lambda k: float(np.sum((np.asarray(BACKGROUND_COLORS[k]) - params.bg_rgb) ** 2)))
    texture = _TEXTURE_WORDS[params.texture]
    n = len(params.distractors)
    others = f"{_COUNT_WORDS[min(n, 6)]} other shape{'' if n == 1 else 's'}"
    thing = f"{shade}{name}"
    first = (f"{_article(size_word)} {size_word} {thing} {pos}" + (f", {tilt}" if tilt else "")
             + f", on a {texture} {bg_name} background, with {others}")
    second = (f"{texture} {bg_name} background with {_article(thing)} {thing} {pos}: {size_word}"
              + (f", {tilt}" if tilt else "") + f"; {others} around it")
    return first, second
