"""Per-shard embeddings: image + text embeddings and the CLIP score.

``embed_shard`` streams one webdataset tar in batches.  Batches are decoded,
preprocessed and tokenised in DataLoader worker processes: the main process
indexes the tar once (member headers only), and batch ``b`` (samples
``b*B .. b*B+B-1`` in ``rows`` order) is built by worker ``b % workers``,
which seeks to its members' bytes.  Memory is bounded by batch size × workers
× prefetch, never by the shard.  Every batch is written at its rows' positions
into preallocated float16 ``.npy`` memmaps, so outputs are aligned with
``rows`` whatever order workers deliver in, and batch composition (hence every
number) does not depend on the worker count.  The tar index and the workers'
batches are :mod:`dbprune_assets.core.models.embed_batches`.

Outputs, in clip-retrieval's layout (rows aligned, ``ok`` samples only):

* ``img_emb/<shard>.npy``  float16 [n, d] — image embeddings of the *cluster* encoder,
* ``text_emb/<shard>.npy`` float16 [n, d] — caption embeddings of the same encoder,
* ``metadata/<shard>.parquet`` — uid, shard, key, row (the sample's row in the
  shard's parquet, i.e. its identity in ``samples``), clip_score float32; the
  i-th metadata row describes the i-th row of both arrays.

``clip_score = cos(image, text)`` from the *score* encoder, computed in float32
before the float16 rounding; when the score encoder is the cluster encoder the
same embeddings are reused, else it runs its own image + text pass over the
same decoded batches.  All three files are written under the temp root and
renamed into place together at the end.

torch is imported inside the functions (cheap module import).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from dbprune_assets.core.models.embed_batches import EmbedError, ShardBatches, image_members, torch_dataset
from dbprune_assets.core.running.device import auto_threads, torch_device, torch_threads
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.settings import ComputeSettings
from dbprune_assets.core.store.atomic import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl
    import torch

    from dbprune_assets.core.models.encoders import LoadedEncoder

METADATA_COLUMNS: tuple[str, ...] = ("uid", "shard", "key", "row", "clip_score")


@dataclass(frozen=True)
class EmbedStats:
    shard: str
    n: int
    seconds: float
    images_per_s: float
    device: str
    precision: str
    batch_size: int
    workers: int
    threads: int  # torch intra-op threads used
    embed_dim: int


# ---------------------------------------------------------------------------
# precision and small encode helpers (reused by evaluation)


def resolve_precision(device: str, precision: str = "auto") -> str:
    """``auto`` → bf16 on CUDA, fp32 on CPU; fp16 needs CUDA."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise EmbedError("compute.precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    if precision not in ("fp32", "bf16", "fp16"):
        raise EmbedError(f"compute.precision: unknown precision {precision!r}; allowed: auto, fp32, bf16, fp16")
    return precision


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for bf16/fp16, a no-op for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def _model_device(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:  # pragma: no cover
        return "cpu"


def _features(fn: Callable[[Any], Any], x: "torch.Tensor", device: str, precision: str) -> "torch.Tensor":
    """fn(x) on device under autocast, as L2-normalised float32."""
    import torch

    x = x.to(device, non_blocking=True)
    with autocast(device, precision):
        f = fn(x)
    return torch.nn.functional.normalize(f.float(), dim=-1)


def _encode(model: Any, encode: Callable[[Any], Any], prepare: Callable[[Sequence[Any]], Any], items: Sequence[Any],
            batch_size: int, device: str | None, precision: str) -> np.ndarray:
    """L2-normalised float32 [n, d] of ``encode(prepare(batch))`` over ``items`` in batches, in order."""
    import torch

    device = device or _model_device(model)
    precision = resolve_precision(device, precision)
    out = []
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            out.append(_features(encode, prepare(items[i : i + batch_size]), device, precision).cpu().numpy())
    dim = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def encode_images(
    model: Any,
    preprocess: Callable[[Any], Any],
    pil_images: Sequence[Any],
    *,
    batch_size: int = 256,
    device: str | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """L2-normalised image embeddings (float32 [n, d]) of PIL images, in order."""
    import torch

    def prepare(images: Sequence[Any]) -> Any:
        return torch.stack([preprocess(im.convert("RGB")) for im in images])

    return _encode(model, model.encode_image, prepare, pil_images, batch_size, device, precision)


def encode_texts(
    model: Any,
    tokenizer: Callable[..., Any],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """L2-normalised text embeddings (float32 [n, d]) of strings, in order."""
    return _encode(model, model.encode_text, lambda batch: tokenizer([t or "" for t in batch]), texts, batch_size,
                   device, precision)


def _same_preprocess(a: "LoadedEncoder", b: "LoadedEncoder") -> bool:
    pa = getattr(getattr(a.model, "visual", None), "preprocess_cfg", None)
    pb = getattr(getattr(b.model, "visual", None), "preprocess_cfg", None)
    return a.preprocess is b.preprocess or (pa is not None and pa == pb)


def _same_tokenizer(a: "LoadedEncoder", b: "LoadedEncoder") -> bool:
    from open_clip.tokenizer import SimpleTokenizer

    ta, tb = a.tokenizer, b.tokenizer
    if ta is tb:
        return True
    return (
        type(ta) is SimpleTokenizer
        and type(tb) is SimpleTokenizer
        and ta.context_length == tb.context_length
        and ta.clean_fn == tb.clean_fn
        and ta.reduction_fn is None
        and tb.reduction_fn is None
    )


# ---------------------------------------------------------------------------
# embed one shard


@dataclass(frozen=True)
class _ShardRows:
    """The ``rows`` of one shard as embed_shard takes them: output row i is
    sample i."""

    keys: list[str]
    parquet_rows: np.ndarray  # int64: the parquet row (or the array row without a ``row`` column)
    uids: list[str]
    captions: list[str]  # None as ""

    @staticmethod
    def check_columns(rows: "pl.DataFrame", shard: str) -> None:
        """EmbedError when ``rows`` lacks uid, key or caption."""
        missing_cols = [c for c in ("uid", "key", "caption") if c not in rows.columns]
        if missing_cols:
            raise EmbedError(f"shard {shard}: rows lack column(s) {missing_cols}; expected uid, key, caption")

    @classmethod
    def read(cls, rows: "pl.DataFrame") -> "_ShardRows":
        """The columns of ``rows`` (checked by :meth:`check_columns`)."""
        import polars as pl

        return cls(
            keys=[str(k) for k in rows.get_column("key").to_list()],
            parquet_rows=(rows.get_column("row").cast(pl.Int64).to_numpy() if "row" in rows.columns
                          else np.arange(rows.height, dtype=np.int64)),
            uids=rows.get_column("uid").cast(pl.Utf8).to_list(),
            captions=[c if c is not None else "" for c in rows.get_column("caption").cast(pl.Utf8).to_list()],
        )

    def metadata(self, shard: str, scores: np.ndarray) -> "pl.DataFrame":
        """The ``metadata/<shard>.parquet`` frame (:data:`METADATA_COLUMNS`)."""
        import polars as pl

        return pl.DataFrame(
            {
                "uid": pl.Series(self.uids, dtype=pl.Utf8),
                "shard": pl.Series([shard] * len(self.keys), dtype=pl.Utf8),
                "key": pl.Series(self.keys, dtype=pl.Utf8),
                "row": pl.Series(self.parquet_rows, dtype=pl.Int64),
                "clip_score": pl.Series(scores, dtype=pl.Float32),
            }
        )


class _ShardEncoders:
    """The cluster encoder and, when it is another model, the score encoder,
    on one device: which preprocesses and tokenizers the batches carry, and
    the embeddings and CLIP scores of one batch."""

    def __init__(self, cluster: "LoadedEncoder", score: "LoadedEncoder | None", device: str, precision: str) -> None:
        self.cluster = cluster.to(device)
        self.score = score.to(device) if score is not None and not self.cluster.same_model(score) else None
        self.device, self.precision = device, precision
        self.preprocesses: list[Callable[[Any], Any]] = [self.cluster.preprocess]
        self.tokenizers: list[Callable[..., Any]] = [self.cluster.tokenizer]
        # the batch's images / tokens the score encoder reads: the cluster encoder's when they match
        self.score_image = self.score_tokens = 0
        if self.score is not None:
            if not _same_preprocess(self.cluster, self.score):
                self.preprocesses.append(self.score.preprocess)
                self.score_image = 1
            if not _same_tokenizer(self.cluster, self.score):
                self.tokenizers.append(self.score.tokenizer)
                self.score_tokens = 1

    def encode(self, images: Sequence["torch.Tensor"], tokens: Sequence["torch.Tensor"]
               ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """Image and text embeddings of the cluster encoder (L2-normalised
        float32) and ``cos(image, text)`` of the score encoder."""
        img = _features(self.cluster.model.encode_image, images[0], self.device, self.precision)
        txt = _features(self.cluster.model.encode_text, tokens[0], self.device, self.precision)
        if self.score is None:
            return img, txt, (img * txt).sum(-1)
        simg = _features(self.score.model.encode_image, images[self.score_image], self.device, self.precision)
        stxt = _features(self.score.model.encode_text, tokens[self.score_tokens], self.device, self.precision)
        return img, txt, (simg * stxt).sum(-1)


def _write_embeddings(tmp_img: Path, tmp_text: Path, batches: ShardBatches, encoders: _ShardEncoders,
                      workers: int, n: int) -> np.ndarray:
    """Encode every batch (decoded by ``workers`` DataLoader processes) into
    float16 ``.npy`` memmaps at ``tmp_img`` / ``tmp_text``, each batch at its
    rows; returns the CLIP scores (float32, row order)."""
    import torch
    from torch.utils.data import DataLoader

    dim = encoders.cluster.embed_dim
    scores = np.zeros(n, dtype=np.float32)
    if n == 0:
        np.save(tmp_img, np.zeros((0, dim), np.float16), allow_pickle=False)
        np.save(tmp_text, np.zeros((0, dim), np.float16), allow_pickle=False)
        return scores
    img_mm = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.float16, shape=(n, dim))
    txt_mm = np.lib.format.open_memmap(tmp_text, mode="w+", dtype=np.float16, shape=(n, dim))
    loader = DataLoader(
        torch_dataset(batches),
        batch_size=None,
        num_workers=workers,
        pin_memory=encoders.device.startswith("cuda"),
        prefetch_factor=2 if workers > 0 else None,
    )
    done = 0
    with torch.inference_mode():
        for item in progress(loader, desc=f"embed {batches.shard}", unit="batch", total=batches.n_batches):
            if "error" in item:
                raise EmbedError(item["error"])
            start = int(item["start"])
            img, txt, s = encoders.encode(item["images"], item["tokens"])
            k = img.shape[0]
            if img.shape[1] != dim:
                raise EmbedError(f"shard {batches.shard}: {encoders.cluster.name} produced {img.shape[1]}-dim embeddings, expected {dim}")
            img_mm[start : start + k] = img.cpu().numpy().astype(np.float16)
            txt_mm[start : start + k] = txt.cpu().numpy().astype(np.float16)
            scores[start : start + k] = s.cpu().numpy()
            done += k
    if done != n:  # pragma: no cover - every batch index is visited once
        raise EmbedError(f"shard {batches.shard}: embedded {done} of {n} samples")
    for mm in (img_mm, txt_mm):
        mm.flush()
    del img_mm, txt_mm
    return scores


def embed_shard(
    tar_path: Path,
    rows: "pl.DataFrame",
    cluster_encoder: "LoadedEncoder",
    score_encoder: "LoadedEncoder | None",
    out_img: Path,
    out_text: Path,
    out_meta: Path,
    compute: ComputeSettings,
    tmp_root: Path,
    *,
    shard: str | None = None,
) -> EmbedStats:
    """Embed the ``rows`` of one shard (its ``ok`` samples, in parquet order).

    ``rows`` has ``uid, key, caption`` (a ``row`` column, the parquet row, may be
    present and is copied to the metadata; without it the metadata's ``row`` is
    the array row): output row i is ``rows[i]``.  Device
    ``compute.device`` (auto: cuda when present), precision
    ``compute.precision`` (auto: bf16 autocast on cuda, fp32 on cpu), batches of
    ``compute.batch_size`` decoded by ``compute.workers`` processes, torch CPU
    threads ``compute.threads`` (0: the cores left beside the workers; set
    for the call, then restored).  The encoders are moved to the device.
    Outputs are bit-identical for the same device and thread count, whatever
    the worker count.  Images come from
    ``tar_path`` (``KEY.jpg``/``.png``/…); captions from ``rows``.  The three
    outputs are written atomically (temp files under ``tmp_root``, renamed at
    the end).  Raises ``EmbedError`` naming shard, key and cause when a key is
    missing from the tar or its image does not decode.
    """
    t0 = time.perf_counter()
    tar_path = Path(tar_path)
    shard = shard or tar_path.stem
    _ShardRows.check_columns(rows, shard)
    device = torch_device(compute.device)
    precision = resolve_precision(device, compute.precision)
    samples = _ShardRows.read(rows)
    n = len(samples.keys)
    members = image_members(tar_path, shard, samples.keys)
    encoders = _ShardEncoders(cluster_encoder, score_encoder, device, precision)
    batches = ShardBatches(tar_path, shard, samples.keys, members, samples.captions, compute.batch_size,
                           encoders.preprocesses, encoders.tokenizers)
    workers = max(0, min(compute.workers, batches.n_batches))
    # CPU threads: compute.threads, or (0) the cores left beside the decode workers
    threads = compute.threads if compute.threads > 0 else auto_threads(workers)
    with torch_threads(threads), contextlib.ExitStack() as stack:
        # entered meta first: renamed last (LIFO), so metadata appears only with its arrays
        tmp_meta = stack.enter_context(atomic_path(out_meta, tmp_root))
        tmp_text = stack.enter_context(atomic_path(out_text, tmp_root))
        tmp_img = stack.enter_context(atomic_path(out_img, tmp_root))
        scores = _write_embeddings(tmp_img, tmp_text, batches, encoders, workers, n)
        samples.metadata(shard, scores).write_parquet(tmp_meta, compression="zstd")

    seconds = time.perf_counter() - t0
    return EmbedStats(
        shard=shard,
        n=n,
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else 0.0,
        device=device,
        precision=precision,
        batch_size=compute.batch_size,
        workers=workers,
        threads=threads,
        embed_dim=encoders.cluster.embed_dim,
    )
