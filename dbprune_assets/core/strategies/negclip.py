"""The ``negclip`` strategy: the M dedup survivors of highest negCLIPLoss
(Wang et al., "CLIPLoss and Norm-Based Data Selection Methods for Multimodal
Contrastive Learning", NeurIPS 2024).

The CLIP score ``s_ii = <x_i, t_i>`` (unit image and text embeddings) says
how well a caption fits its image, but not how well it fits it *rather than
other images*: a generic caption fits every image.  negCLIPLoss normalises
the score by the pair's similarity to random in-batch negatives, the term
CLIP's own training loss adds:

    negclip_i = s_ii - (1/K) sum_k R_k(i)
    R_k(i) = tau/2 * [ log sum_{j in B_k(i)} exp(<x_i, t_j> / tau)
                     + log sum_{j in B_k(i)} exp(<x_j, t_i> / tau) ]

over ``K`` random batches ``B_k(i)`` of size ``b`` that hold ``i``
(``strategies.negclip``: ``batches`` K = 10, ``batch_size`` b = 32,768,
``temperature`` tau = 0.01, the paper's values; tau is the teacher CLIP's
learned temperature).

**Batches, bounded and deterministic.**  A batch holding ``i`` is ``i`` and
``b - 1`` random others.  Here batch ``k``'s others are the same for every
sample: the ``b - 1`` dedup survivors of smallest ``uid_hash(uid, seed_k)``
(``seed_k`` from ``selection.seed`` and ``k``), so each sample's batch has the
paper's distribution (``i`` plus a uniform random draw of the others) while
the pass over the pool streams shard by shard against ``K (b - 1)`` stored
rows.  When ``i`` is itself drawn, its batch is the drawn set.  A pool of at
most ``b - 1`` survivors is one batch (every survivor).  The scores are the
same whatever the shard order, thread count or pool split.

Every embedded sample of the pool is scored; the selection takes the top M of
the dedup survivors (``clip_score``'s pool), ties by uid.  Cost: ``4 n K b d``
flops for ``n`` samples, a large-batch matrix product; on a CPU a smaller
``batch_size`` trades the estimate's variance for time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dbprune_assets.core.strategies.base import Prepared, Strategy, StrategyContext, StrategyUnavailable, check_size
from dbprune_assets.core.strategies.clip_score import keep_top, survivors_view

if TYPE_CHECKING:
    from dbprune_assets.core.store.layout import Layout

#: rows scored at once (the logits block is rows x (b - 1) float32)
ROW_BLOCK = 512


def batch_seed(seed: int, k: int) -> int:
    """The ``uid_hash`` seed of reference batch ``k`` (distinct per k, fixed by ``seed``)."""
    return (int(seed) * 1_000_003 + 7_919 * (k + 1)) % (1 << 63)


def _logsumexp_with(first: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Row-wise ``log(exp(first) + sum exp(logits))`` (float64), stable; the
    float32 ``logits`` block is overwritten (its exponentials are summed in float64)."""
    m = np.maximum(first, logits.max(axis=1, initial=-np.inf).astype(np.float64))
    logits -= m[:, None].astype(np.float32)
    np.exp(logits, out=logits)
    return m + np.log(np.exp(first - m) + logits.sum(axis=1, dtype=np.float64))


def negclip_scores(img: np.ndarray, txt: np.ndarray, refs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   self_ref: list[np.ndarray], temperature: float, parallel: int = 1) -> np.ndarray:
    """negCLIPLoss (float64) of the pairs ``(img[i], txt[i])`` (unit rows).

    ``refs[k] = (ref_img, ref_txt, _)``: batch ``k``'s other members (unit
    rows); ``self_ref[k][i]`` is the index of sample ``i`` among them, or -1
    (its term is then not counted twice).  Formula: module docstring.  The
    similarities are float32 products (as the stored embeddings are float16),
    the sums and the score float64.  ``parallel`` blocks of rows are scored at
    once in threads (each block's products then on one BLAS thread), so the
    exponentials use every core; each row's score is the same for any value."""
    from dbprune_assets.core.method.kmeans_search import blas_threads
    from dbprune_assets.core.running.parallel import ordered_map

    img = np.ascontiguousarray(img, dtype=np.float32)
    txt = np.ascontiguousarray(txt, dtype=np.float32)
    tau = float(temperature)
    s_ii = np.einsum("ij,ij->i", img.astype(np.float64), txt.astype(np.float64))
    r = np.zeros(len(img), dtype=np.float64)
    for (ref_img16, ref_txt16, _), own in zip(refs, self_ref):
        ref_img_t = np.ascontiguousarray(np.asarray(ref_img16, dtype=np.float32).T) / np.float32(tau)
        ref_txt_t = np.ascontiguousarray(np.asarray(ref_txt16, dtype=np.float32).T) / np.float32(tau)

        def block(a: int, ref_img_t: np.ndarray = ref_img_t, ref_txt_t: np.ndarray = ref_txt_t,
                  own: np.ndarray = own) -> np.ndarray:
            b = min(a + ROW_BLOCK, len(img))
            i2t = img[a:b] @ ref_txt_t  # <x_i, t_j> / tau
            t2i = txt[a:b] @ ref_img_t  # <x_j, t_i> / tau
            mine = own[a:b]
            hit = np.flatnonzero(mine >= 0)
            i2t[hit, mine[hit]] = -np.inf
            t2i[hit, mine[hit]] = -np.inf
            first = s_ii[a:b] / tau
            return tau / 2 * (_logsumexp_with(first, i2t) + _logsumexp_with(first, t2i))

        with blas_threads(1) if parallel > 1 else contextlib.nullcontext():
            for a, part in ordered_map(block, range(0, len(img), ROW_BLOCK), parallel):
                r[a:a + len(part)] += part
    return s_ii - r / max(len(refs), 1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1)


class NegClipStrategy(Strategy):
    """Keep the top M dedup survivors by negCLIPLoss."""

    def unavailable(self, layout: Layout, settings: Any) -> str | None:
        return None  # text embeddings are checked when the step runs (every source stores them)

    def prepare(self, ctx: StrategyContext) -> Prepared:
        import polars as pl

        from dbprune_assets.core.method.kmeans_search import blas_threads
        from dbprune_assets.core.running.device import available_cores

        cfg = ctx.settings.strategies.negclip
        refs = _reference_batches(ctx, cfg.batch_size, cfg.batches)
        n_ref = len(refs[0][0]) if refs else 0
        out_dir = ctx.work / "negclip_scores"
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        parallel = ctx.threads or available_cores()
        with blas_threads(ctx.threads or 0):
            for shard in ctx.shards:
                meta, img, txt = _shard_pairs(ctx.layout, shard)
                if meta.height == 0:
                    continue
                keys = meta["row"].to_numpy()
                own = [_own_index(shard, keys, r_keys) for _, _, r_keys in refs]
                scores = negclip_scores(_unit(img), _unit(txt), refs, own, cfg.temperature, parallel)
                path = out_dir / f"{shard}.parquet"
                meta.select("uid", "shard", "row").with_columns(negclip=pl.Series(scores)).write_parquet(path)
                files.append(path)
        note = (f"negclip: one batch of all {n_ref} dedup survivors (fewer than strategies.negclip.batch_size = "
                f"{cfg.batch_size})" if len(refs) == 1 and n_ref < cfg.batch_size - 1 else
                f"negclip: {len(refs)} random batches of {n_ref + 1}")
        return Prepared(views={"negclip_scores": files}, notes=[f"{note}, temperature {cfg.temperature}"])

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        assert M is not None
        eligible = survivors_view(con)
        check_size(self.name, M, eligible, "dedup survivors with a CLIP score")
        con.execute("""CREATE TEMP VIEW scored AS SELECT v.*, n.negclip FROM survivors v
                       LEFT JOIN negclip_scores n ON n.shard = v.shard AND n.row = v.row""")
        missing = con.execute("SELECT shard, row, uid FROM scored WHERE negclip IS NULL LIMIT 1").fetchall()
        if missing:
            shard, row, uid = missing[0]
            raise ValueError(f"negclip: shard {shard} row {row} (uid {uid}) has no embedding pair to score; "
                             "re-materialise embeddings for that shard")
        keep_top(con, "scored", "negclip", M)
        return eligible


def _shard_pairs(layout: Layout, shard: str) -> tuple[Any, np.ndarray, np.ndarray]:
    """(metadata, image embeddings, text embeddings) of one shard, rows aligned."""
    from dbprune_assets.core.method.embstore import shard_embeddings

    meta, img = shard_embeddings(layout, shard)
    path = layout.text_emb(shard)
    if not path.is_file():
        raise StrategyUnavailable(f"negclip needs text embeddings, but {path} is missing; re-materialise "
                                  f"embeddings for shard {shard} (every source stores them)")
    txt = np.load(path, mmap_mode="r")
    if txt.shape != img.shape:
        raise ValueError(f"shard {shard}: text embeddings {txt.shape} do not match image embeddings {img.shape}; "
                         "re-materialise embeddings for this shard")
    return meta, img, txt


def _own_index(shard: str, rows: np.ndarray, ref_keys: np.ndarray) -> np.ndarray:
    """For each of the shard's ``rows``, its index among the batch's members
    (``ref_keys``: structured (shard, row)), or -1."""
    mine = np.flatnonzero(ref_keys["shard"] == shard)
    out = np.full(len(rows), -1, dtype=np.int64)
    if mine.size:
        where = {int(r): int(i) for r, i in zip(ref_keys["row"][mine], mine)}
        out = np.fromiter((where.get(int(r), -1) for r in rows), dtype=np.int64, count=len(rows))
    return out


def _reference_batches(ctx: StrategyContext, batch_size: int, batches: int
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each batch's ``b - 1`` others: (unit images, unit texts, keys (shard, row)),
    drawn from the dedup survivors by seeded uid hash (module docstring)."""
    from dbprune_assets.core.store.atomic import scratch_dir
    from dbprune_assets.core.store.duck import connect, create_view, parquet_files
    from dbprune_assets.core.pool.uids import samples_view

    with scratch_dir(ctx.work, "draw-") as work:
        con = connect(Path(work), threads=ctx.threads)
        try:
            t = Path(ctx.tables)
            samples_view(con, "samples", parquet_files(t / "samples"), t, ("uid", "shard", "row", "status"))
            for name, cols in (("scores", ("uid", "shard", "clip_score")), ("duplicates", ("uid", "shard"))):
                create_view(con, name, parquet_files(t / name), columns=cols)
            n = survivors_view(con)
            if n == 0:
                raise ValueError("negclip: no dedup survivor with a CLIP score; nothing to select from")
            take = min(batch_size - 1, n)
            drawn = [con.execute(
                f"""SELECT shard, row FROM survivors
                    ORDER BY uid_hash(uid, CAST({batch_seed(ctx.seed, k)} AS BIGINT)), uid, shard, row
                    LIMIT {take}""").fetchall() for k in range(batches if take < n else 1)]
        finally:
            con.close()
    return [_gather(ctx.layout, members) for members in drawn]


def _gather(layout: Layout, members: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unit image and text embeddings of ``members`` (shard, row), in their order."""
    keys = np.array(members, dtype=[("shard", object), ("row", np.int64)])
    img = txt = None
    for shard in sorted(set(keys["shard"])):
        meta, s_img, s_txt = _shard_pairs(layout, shard)
        pos = {int(r): i for i, r in enumerate(meta["row"].to_numpy())}
        idx = np.flatnonzero(keys["shard"] == shard)
        at = np.array([pos[int(r)] for r in keys["row"][idx]], dtype=np.int64)
        if img is None:
            img = np.zeros((len(keys), s_img.shape[1]), dtype=np.float32)
            txt = np.zeros_like(img)
        img[idx], txt[idx] = _unit(s_img[at]), _unit(s_txt[at])
    assert img is not None and txt is not None
    # held as float16 (the stored embeddings' precision): K (b - 1) rows of both modalities
    return img.astype(np.float16), txt.astype(np.float16), keys


NEGCLIP = NegClipStrategy(
    "negclip", "negCLIPLoss: the M dedup survivors whose CLIP score stands out most from random in-batch negatives",
    needs=("candidates", "duplicates", "scores"), sized=True,
    reference="Wang et al., CLIPLoss and Norm-Based Data Selection Methods for Multimodal Contrastive Learning, "
              "NeurIPS 2024")
