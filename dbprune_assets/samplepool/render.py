"""Rendering a concept: drawn parameters (:func:`sample_params`), pixels
(:func:`render`), deterministic JPEG bytes, and the images of planted rows
(duplicates derived from their original, undecodable bytes)."""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dbprune_assets.samplepool.concepts import COLORS, SHAPES, Concept


NEAR_NOISE_SIGMA = 2.0  # extra pixel noise of a "noise" near duplicate
_SUPERSAMPLE = 2
_RING_INNER = 0.55
_BASE_GRAY = 64.0
_NOISE_BANK_SEED = 20240117


@dataclass(frozen=True)
class Blob:
    """A shape drawn on the canvas (the concept's shape or a distractor)."""

    shape: str
    cx: float
    cy: float
    radius: float
    rotation: float
    rgb: tuple[float, float, float]


@dataclass(frozen=True)
class RenderParams:
    """Everything needed to re-render one image exactly (duplicates re-use it)."""

    main: Blob
    distractors: tuple[Blob, ...]
    bg_rgb: tuple[float, float, float]
    texture: str  # none | gradient | noise | stripes | checker
    texture_amp: float
    texture_angle: float
    texture_freq: float
    texture_seed: int
    noise_sigma: float
    noise_seed: int
    quality: int


def _regular(n: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> tuple[tuple[float, float], ...]:
    step = 360.0 / n
    return tuple(
        (radii[i % len(radii)] * math.cos(math.radians(start_deg + i * step)),
         radii[i % len(radii)] * math.sin(math.radians(start_deg + i * step)))
        for i in range(n)
    )


#: unit-radius outlines of the polygon shapes (circle and ring are ellipses)
_UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": _regular(3, -90),
    "diamond": ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)),
    "hexagon": _regular(6, 0),
    "star": _regular(10, -90, (1.0, 0.45)),
    "cross": (
        (-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
        (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3),
    ),
}


def _clamp(x: float, lo: float, hi: float) -> float:
    return float(min(max(x, lo), hi))


#: how much the scene around every concept's shape varies (same for all concepts)
SCENE_VARIABILITY = 0.2


def sample_params(concept: Concept, rng: np.random.Generator, size: int) -> RenderParams:
    """Draw one rendering of ``concept``; every jitter scales with its variability.

    At variability 0 renderings still differ by a few pixels of position, ~12%
    of size, ~12 degrees of rotation, a slight shade and background change and
    pixel noise (similar, never duplicates); at 1 they vary in position, size,
    rotation, shade, background color and texture and carry distractor shapes.
    """
    v = concept.variability
    g = math.sqrt(v)  # geometric spread grows fast at first, so every step of v shows
    s = float(size)
    radius = _clamp(0.30 * s * math.exp(rng.uniform(-1, 1) * (0.08 + 0.55 * g)), 0.13 * s, 0.46 * s)
    span = (0.05 + 0.30 * g) * s
    lo, hi = radius * 0.7, s - radius * 0.7
    cx = _clamp(s / 2 + rng.uniform(-1, 1) * span, lo, hi)
    cy = _clamp(s / 2 + rng.uniform(-1, 1) * span, lo, hi)
    # rotation and shade vary only a little, whatever the variability: turned far
    # enough a square is a diamond, and shaded far enough orange is red; a varied
    # concept should be spread out, not confused with its neighbours
    rotation = float(rng.uniform(-1, 1) * (10 + 30 * v))
    rgb = _jitter_color(COLORS[concept.color], rng, 0.15)
    # the scene around the shape (background, texture, clutter) is drawn from one
    # distribution for every concept: variability lives in the concept itself
    # (its geometry and shade), so a varied concept is spread out in embedding
    # space without drifting towards every other varied concept
    bg = _background_color(rgb, rng, SCENE_VARIABILITY)
    texture = "none"
    if rng.random() < 0.9 * SCENE_VARIABILITY:
        texture = ("gradient", "noise", "stripes", "checker")[int(rng.integers(4))]
    n_distractors = min(6, int(rng.poisson(3.5 * SCENE_VARIABILITY)))
    distractors = tuple(_distractor(rng, s) for _ in range(n_distractors))
    return RenderParams(
        main=Blob(concept.shape, cx, cy, radius, rotation, rgb),
        distractors=distractors,
        bg_rgb=bg,
        texture=texture,
        texture_amp=float(15 + 45 * SCENE_VARIABILITY * rng.random()),
        texture_angle=float(rng.uniform(0, math.pi)),
        texture_freq=float(rng.uniform(2, 6)),
        texture_seed=int(rng.integers(2**31)),
        noise_sigma=float(1.5 + 8 * SCENE_VARIABILITY),
        noise_seed=int(rng.integers(2**31)),
        quality=int(rng.integers(80, 96)),
    )


def _jitter_color(base: tuple[int, int, int], rng: np.random.Generator, v: float) -> tuple[float, float, float]:
    shade = np.asarray(base, dtype=float) + rng.uniform(-1, 1, 3) * (12 + 43 * v)
    shade *= math.exp(rng.uniform(-1, 1) * (0.05 + 0.25 * v))
    return tuple(float(x) for x in np.clip(shade, 0, 255))  # type: ignore[return-value]


def _background_color(rgb: tuple[float, float, float], rng: np.random.Generator, v: float) -> tuple[float, float, float]:
    """Gray at low variability, drifting to random colors at high variability,
    always with enough contrast that the shape stays visible."""
    fg = np.asarray(rgb)
    bg = np.full(3, _BASE_GRAY)
    for _ in range(16):
        bg = (1 - v) * _BASE_GRAY + v * rng.uniform(0, 255, 3) + rng.uniform(-1, 1, 3) * (8 + 20 * v)
        bg = np.clip(bg, 0, 255)
        if np.linalg.norm(bg - fg) > 110:
            break
    else:
        bg = np.full(3, _BASE_GRAY)
    return tuple(float(x) for x in bg)  # type: ignore[return-value]


def _distractor(rng: np.random.Generator, s: float) -> Blob:
    color = list(COLORS.values())[int(rng.integers(len(COLORS)))]
    return Blob(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        cx=float(rng.uniform(0, s)),
        cy=float(rng.uniform(0, s)),
        radius=float(rng.uniform(0.05, 0.1) * s),
        rotation=float(rng.uniform(0, 360)),
        rgb=tuple(float(x) for x in color),  # type: ignore[arg-type]
    )


def _shape_mask(blob: Blob, size: int) -> Image.Image:
    """Anti-aliased coverage mask (mode "L") of one shape, drawn supersampled."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = blob.cx * ss, blob.cy * ss, blob.radius * ss
    if blob.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if blob.shape == "ring":
            ri = r * _RING_INNER
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        ca, sa = math.cos(math.radians(blob.rotation)), math.sin(math.radians(blob.rotation))
        draw.polygon([(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _UNIT_POLYGONS[blob.shape]], fill=255)
    return canvas.reduce(ss)


def _rgb_int(rgb: Sequence[float]) -> tuple[int, int, int]:
    return (int(round(rgb[0])), int(round(rgb[1])), int(round(rgb[2])))


def _background(p: RenderParams, size: int) -> Image.Image:
    """The canvas before shapes: a flat color, or a flat color plus a texture."""
    if p.texture == "none":
        return Image.new("RGB", (size, size), _rgb_int(p.bg_rgb))
    yy, xx = _grid(size)
    u = xx * math.cos(p.texture_angle) + yy * math.sin(p.texture_angle)
    if p.texture == "gradient":
        t = (u - 0.5) * 2.0
    elif p.texture == "stripes":
        t = np.sin(2 * math.pi * p.texture_freq * u)
    elif p.texture == "checker":
        f = p.texture_freq
        t = ((np.floor(xx * f) + np.floor(yy * f)) % 2) * 2.0 - 1.0
    else:  # smooth blotchy noise
        small = np.random.default_rng(p.texture_seed).integers(0, 256, (4, 4), dtype=np.uint8)
        t = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    img = np.asarray(p.bg_rgb, dtype=np.float32) + (t * p.texture_amp)[..., None]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def render(p: RenderParams, size: int) -> np.ndarray:
    """Render ``p`` as an RGB uint8 array of shape (size, size, 3)."""
    img = _background(p, size)
    for blob in (*p.distractors, p.main):
        img.paste(_rgb_int(blob.rgb), None, _shape_mask(blob, size))
    out = np.asarray(img, dtype=np.float32) + noise(p.noise_seed, size) * p.noise_sigma
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed run of standard normal values; an image's noise is a window of it."""
    return np.random.default_rng(_NOISE_BANK_SEED).standard_normal(size * size * 3 * 64, dtype=np.float32)


def noise(seed: int, size: int) -> np.ndarray:
    """Pixel noise for ``seed``: a window of the bank at a seed-chosen offset
    (windows at different offsets are pixel-wise independent draws)."""
    bank = _noise_bank(size)
    n = size * size * 3
    start = seed % (bank.size - n)
    return bank[start : start + n].reshape(size, size, 3)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return yy, xx


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG with fixed encoder settings (deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=int(quality), optimize=False, subsampling=2)
    return buf.getvalue()


def corrupt(data: bytes, variant: int, rng: np.random.Generator) -> bytes:
    """Undecodable bytes: a JPEG cut in half (even variant) or random garbage
    with a JPEG signature (odd), as broken downloads look."""
    if variant % 2 == 0:
        return data[: max(16, len(data) * 2 // 5)]
    return b"\xff\xd8\xff\xe0" + rng.bytes(max(64, len(data) // 2))
