"""The planted CLIP geometry of the DataComp-format pool (:mod:`.datacomp`):
per model, the directions and the image and text vectors drawn around them.

Per model (b32 and l14 drawn independently, same story): orthonormal
directions ``g_img``, ``g_txt`` (a modality gap, ``g_img·g_txt = GAP_COSINE``),
one per shape, one per colour and one per concept; a concept's direction
``u_c`` shares :data:`ATTRIBUTE_SHARE` of its squared length with its shape's
and its colour's direction (so concepts that share an attribute are nearer
neighbours, and d_inter differs between clusters).  A sample is

    image = normalise(MODALITY_GAP·g_img + u_c + spread_c·z),  z ~ N(0, I/d)
    text  = normalise(MODALITY_GAP·g_txt + u_t + TEXT_NOISE[model]·w)

with ``t`` the caption's concept and ``spread_c`` linear in the concept's
variability (:data:`SPREAD_RANGE`): the mean within-concept image cosine is
about ``(1 + a²) / (1 + a² + spread_c²)``, from ~0.89 down to ~0.54.  A
correct pair scores ~0.3-0.6, a mismatched one ~0-0.2.  An exact duplicate
stores the very same image vector; a near one is ``normalise(x + ε·v)`` with
ε from :data:`NEAR_EPS` (cosine 0.985-0.997 to its original, above
SemDeDup's ``1 - 0.07/2``), while no two unrelated samples come near
``1 - 0.07``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dbprune_assets.samplepool.concepts import COLORS, SHAPES, Concept

MODALITY_GAP = 1.0
GAP_COSINE = 0.3
ATTRIBUTE_SHARE = 0.2  # of a concept direction's squared length, along its shape's and along its colour's
SPREAD_RANGE: tuple[float, float] = (0.5, 1.3)  # spread at variability 0 and 1
TEXT_NOISE: dict[str, float] = {"b32": 0.9, "l14": 0.8}  # l14 pairs align a little better, as in DataComp
NEAR_EPS: dict[str, float] = {"requality": 0.08, "noise": 0.12, "rescale": 0.16}


def spread(concept: Concept) -> float:
    """The planted spread of a concept's image embeddings (noise scale, linear in variability)."""
    lo, hi = SPREAD_RANGE
    return lo + (hi - lo) * concept.variability


def expected_within_cosine(concept: Concept) -> float:
    """The mean image cosine of two distinct samples of ``concept`` the geometry plants
    (``(1 + a²) / (1 + a² + spread²)``; duplicates excluded)."""
    a2 = MODALITY_GAP**2
    return (1 + a2) / (1 + a2 + spread(concept) ** 2)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` L2-normalised, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Isotropic Gaussian noise of expected squared norm 1 per row, float32."""
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))


def near_copy(x: np.ndarray, variant: str, rng: np.random.Generator) -> np.ndarray:
    """A near duplicate of image vector ``x``: nudged by ``NEAR_EPS[variant]`` of noise, renormalised."""
    return unit(x + NEAR_EPS[variant] * noise(rng, x.shape))


class Directions:
    """One model's planted directions (modality gap, shape, colour and concept
    directions), and the image and text vectors drawn around them."""

    def __init__(self, rng: np.random.Generator, model: str, dim: int, concepts: Sequence[Concept]) -> None:
        shapes, colors = list(SHAPES), list(COLORS)
        need = 2 + len(shapes) + len(colors) + len(concepts)
        q, _ = np.linalg.qr(rng.standard_normal((dim, need)))
        q = q.T.astype(np.float32)  # orthonormal rows
        self.dim = dim
        self.text_noise = TEXT_NOISE[model]
        self.spread = np.array([spread(c) for c in concepts], dtype=np.float32)
        self.g_img = q[0]
        self.g_txt = (GAP_COSINE * q[0] + np.sqrt(1 - GAP_COSINE**2) * q[1]).astype(np.float32)
        shape_dir = {s: q[2 + i] for i, s in enumerate(shapes)}
        color_dir = {c: q[2 + len(shapes) + i] for i, c in enumerate(colors)}
        own = q[2 + len(shapes) + len(colors):]
        w_attr, w_own = np.sqrt(ATTRIBUTE_SHARE), np.sqrt(1 - 2 * ATTRIBUTE_SHARE)
        self.concept = np.stack([w_attr * shape_dir[c.shape] + w_attr * color_dir[c.color] + w_own * own[c.id]
                                 for c in concepts]).astype(np.float32)  # unit rows

    def images(self, concept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unit float32 image vectors, one per entry of ``concept`` (concept ids)."""
        z = noise(rng, (len(concept), self.dim))
        return unit(MODALITY_GAP * self.g_img + self.concept[concept] + self.spread[concept, None] * z)

    def texts(self, caption: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unit float32 text vectors, one per entry of ``caption`` (the captions' concept ids)."""
        w = noise(rng, (len(caption), self.dim))
        return unit(MODALITY_GAP * self.g_txt + self.concept[caption] + self.text_noise * w)
