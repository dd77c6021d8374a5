"""Evaluation metrics as pure functions over embeddings (no model, no torch).

Metrics (names of the ``eval`` table)
-------------------------------------
* ``acc1``, ``acc5``: zero-shot top-k accuracy with open_clip's
  ``build_zero_shot_classifier`` (class names x templates, averaged, unit
  norm) against L2-normalised image embeddings; ``k = min(5, classes)``.
* ``image_retrieval_recall@k`` (text -> image): for each text, is its image
  among the k images most similar to it; ``text_retrieval_recall@k`` (image
  -> text): for each image, is any of its texts among the k most similar
  texts; as CLIP_benchmark's ``zeroshot_retrieval`` (which open_clip's
  training-time retrieval metrics reduce to for one caption per image).
  Images without any caption are candidates but not queries.

Ranking is exact and deterministic: a query's positive ranks behind every
candidate with a strictly higher cosine similarity and behind equal-scoring
candidates with a lower index (a stable sort), so ties never depend on a
library's top-k.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
RETRIEVAL_METRICS: tuple[str, ...] = tuple(
    f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in RETRIEVAL_KS
)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def positive_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based rank of each row's best positive among all columns.

    ``scores`` [q, c]; ``positive`` [q, c] bool (at least one per row).  The
    best positive is the highest-scoring positive (lowest column on ties); its
    rank counts the columns scoring strictly higher, plus equal-scoring
    columns with a lower index (a stable descending sort)."""
    scores = np.asarray(scores)
    positive = np.asarray(positive, dtype=bool)
    if not positive.any(axis=1).all():
        raise ValueError("positive_ranks: a query has no positive")
    masked = np.where(positive, scores, -np.inf)
    best = masked.argmax(axis=1)  # first max = lowest index on ties
    s_best = scores[np.arange(len(best)), best]
    higher = (scores > s_best[:, None]).sum(axis=1)
    cols = np.arange(scores.shape[1])
    ties_before = ((scores == s_best[:, None]) & (cols[None, :] < best[:, None])).sum(axis=1)
    return (higher + ties_before).astype(np.int64)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label ranks within the top k (stable ties); k is
    capped at the number of classes."""
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy: no rows")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"topk_accuracy: labels outside [0, {logits.shape[1]})")
    positive = np.zeros(logits.shape, dtype=bool)
    positive[np.arange(len(labels)), labels] = True
    ranks = positive_ranks(logits, positive)
    return {k: float((ranks < min(k, logits.shape[1])).mean()) for k in ks}


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image_index: np.ndarray,
    ks: Sequence[int] = RETRIEVAL_KS,
    block: int = 1024,
) -> dict[str, float]:
    """``image_retrieval_recall@k`` (per text: its image within the top k images)
    and ``text_retrieval_recall@k`` (per image with at least one text: any of its
    texts within the top k texts), on cosine similarity (inputs are
    normalised here).  Computed in row blocks: memory O(block x candidates)."""
    img = _normalize(image_emb)
    txt = _normalize(text_emb)
    owner = np.asarray(text_to_image_index, dtype=np.int64)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if n_txt == 0 or n_img == 0:
        raise ValueError("retrieval_metrics: needs at least one image and one text")
    if owner.shape != (n_txt,) or owner.min() < 0 or owner.max() >= n_img:
        raise ValueError(f"retrieval_metrics: text_to_image_index must map each of {n_txt} texts to an image in [0, {n_img})")
    img_cols = np.arange(n_img)
    t2i_ranks = np.empty(n_txt, dtype=np.int64)
    for a in range(0, n_txt, block):
        s = txt[a : a + block] @ img.T
        t2i_ranks[a : a + block] = positive_ranks(s, owner[a : a + block, None] == img_cols[None, :])
    has_text = np.zeros(n_img, dtype=bool)
    has_text[owner] = True
    queries = np.flatnonzero(has_text)
    i2t_ranks = np.empty(len(queries), dtype=np.int64)
    for a in range(0, len(queries), block):
        q = queries[a : a + block]
        s = img[q] @ txt.T
        i2t_ranks[a : a + block] = positive_ranks(s, owner[None, :] == q[:, None])
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((t2i_ranks < k).mean())
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = float((i2t_ranks < k).mean())
    return out
