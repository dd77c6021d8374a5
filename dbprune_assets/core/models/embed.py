"""Per-shard embeddings: image + text embeddings and the CLIP score.

``embed_shard`` streams one webdataset tar in batches.  Batches are decoded,
preprocessed and tokenised in DataLoader worker processes: the main process
indexes the tar once (member headers only), and batch ``b`` (samples
``b*B .. b*B+B-1`` in ``rows`` order) is built by worker ``b % workers``,
which seeks to its members' bytes.  Memory is bounded by batch size × workers
× prefetch, never by the shard.  Every batch is written at its rows' positions
into preallocated float16 ``.npy`` memmaps, so outputs are aligned with
``rows`` whatever order workers deliver in, and batch composition (hence every
number) does not depend on the worker count.

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
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from dbprune_assets.core.store.atomic import atomic_path
from dbprune_assets.core.running.device import auto_threads, torch_device, torch_threads
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.settings import ComputeSettings
from dbprune_assets.core.pool.wds import MemberRef, TarDamaged, image_member, iter_sample_headers

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl
    import torch

    from dbprune_assets.core.models.encoders import LoadedEncoder

METADATA_COLUMNS: tuple[str, ...] = ("uid", "shard", "key", "row", "clip_score")


class EmbedError(RuntimeError):
    """A shard cannot be embedded; the message names shard, key and cause."""


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


# ---------------------------------------------------------------------------
# tar index and the worker dataset


def index_tar(tar_path: Path, shard: str) -> dict[str, dict[str, MemberRef]]:
    """``{key: {ext: member}}`` of a webdataset tar, from its headers only (first wins).

    A tar damaged part-way (truncated) is indexed up to the damage: ingest gave
    the samples behind it status ``truncated_tar``, so they are never asked for.
    """
    index: dict[str, dict[str, MemberRef]] = {}
    try:
        for key, members in iter_sample_headers(tar_path):
            entry = index.setdefault(key, {})
            for ext, ref in members.items():
                entry.setdefault(ext, ref)
    except FileNotFoundError:
        raise EmbedError(f"shard {shard}: tar {tar_path} does not exist") from None
    except TarDamaged as err:
        if not index:  # not a tar at all
            raise EmbedError(f"shard {shard}: cannot read tar {tar_path}: {err.cause}") from err
    return index


class _ShardBatches:
    """Iterable over batches of one shard; DataLoader workers split it by batch index.

    Yields dicts ``{"start", "images": [tensor per preprocess], "tokens": [tensor per
    tokenizer]}`` or ``{"error": message}`` for a member that fails to decode.
    """

    def __init__(
        self,
        tar_path: Path,
        shard: str,
        keys: Sequence[str],
        members: Sequence[MemberRef],
        captions: Sequence[str],
        batch_size: int,
        preprocesses: Sequence[Callable[[Any], Any]],
        tokenizers: Sequence[Callable[..., Any]],
    ) -> None:
        self.tar_path, self.shard = str(tar_path), shard
        self.keys, self.members, self.captions = list(keys), list(members), list(captions)
        self.batch_size = batch_size
        self.preprocesses, self.tokenizers = list(preprocesses), list(tokenizers)
        self.n_batches = -(-len(self.keys) // batch_size)

    def _batch(self, f: Any, b: int) -> dict[str, Any]:
        import torch
        from PIL import Image

        start = b * self.batch_size
        stop = min(len(self.keys), start + self.batch_size)
        per_pp: list[list[Any]] = [[] for _ in self.preprocesses]
        for i in range(start, stop):
            m = self.members[i]
            try:
                f.seek(m.offset)
                data = f.read(m.size)
                if len(data) != m.size:
                    raise EOFError(f"member {m.name} truncated ({len(data)} of {m.size} bytes)")
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    rgb = im.convert("RGB")
                for out, pp in zip(per_pp, self.preprocesses):
                    out.append(pp(rgb))
            except Exception as e:  # noqa: BLE001 - any decode/preprocess failure is this sample's
                return {"error": f"shard {self.shard}: key {self.keys[i]}: cannot decode image {m.name} ({type(e).__name__}: {e})"}
        caps = self.captions[start:stop]
        try:
            tokens = [tok(caps) for tok in self.tokenizers]
        except Exception as e:  # noqa: BLE001
            return {"error": f"shard {self.shard}: keys {self.keys[start]}..{self.keys[stop - 1]}: cannot tokenise captions ({type(e).__name__}: {e})"}
        return {"start": start, "images": [torch.stack(x) for x in per_pp], "tokens": tokens}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        with open(self.tar_path, "rb") as f:
            for b in range(wid, self.n_batches, nw):
                item = self._batch(f, b)
                yield item
                if "error" in item:
                    return


def _torch_dataset_class() -> type:
    """``TorchShardBatches``: a torch IterableDataset over a ``_ShardBatches``.

    Built on first use so that importing this module does not import torch;
    reachable as a module attribute (PEP 562), so it pickles by reference for
    spawned DataLoader workers too.
    """
    from torch.utils.data import IterableDataset

    class TorchShardBatches(IterableDataset):  # type: ignore[misc]
        def __init__(self, inner: _ShardBatches) -> None:
            self.inner = inner

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return iter(self.inner)

    TorchShardBatches.__module__ = __name__
    TorchShardBatches.__qualname__ = "TorchShardBatches"
    return TorchShardBatches


def __getattr__(name: str) -> Any:
    if name == "TorchShardBatches":
        cls = globals().get(name) or _torch_dataset_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    import polars as pl
    import torch
    from torch.utils.data import DataLoader


    t0 = time.perf_counter()
    tar_path = Path(tar_path)
    shard = shard or tar_path.stem
    missing_cols = [c for c in ("uid", "key", "caption") if c not in rows.columns]
    if missing_cols:
        raise EmbedError(f"shard {shard}: rows lack column(s) {missing_cols}; expected uid, key, caption")
    device = torch_device(compute.device)
    precision = resolve_precision(device, compute.precision)

    keys = [str(k) for k in rows.get_column("key").to_list()]
    parquet_rows = (rows.get_column("row").cast(pl.Int64).to_numpy() if "row" in rows.columns
                    else np.arange(rows.height, dtype=np.int64))
    uids = rows.get_column("uid").cast(pl.Utf8).to_list()
    captions = [c if c is not None else "" for c in rows.get_column("caption").cast(pl.Utf8).to_list()]
    n = len(keys)

    members: list[MemberRef] = []
    if n:
        index = index_tar(tar_path, shard)
        for key in keys:
            entry = index.get(key)
            image = image_member(entry) if entry else None
            if image is None:
                cause = "not in the tar" if not entry else f"no image member (found {', '.join(sorted(entry))})"
                raise EmbedError(f"shard {shard}: key {key}: {cause} ({tar_path})")
            members.append(image[1])
        del index

    cluster = cluster_encoder.to(device)
    score = score_encoder.to(device) if score_encoder is not None and not cluster.same_model(score_encoder) else None
    preprocesses: list[Callable[[Any], Any]] = [cluster.preprocess]
    tokenizers: list[Callable[..., Any]] = [cluster.tokenizer]
    s_img = s_tok = 0
    if score is not None:
        if not _same_preprocess(cluster, score):
            preprocesses.append(score.preprocess)
            s_img = 1
        if not _same_tokenizer(cluster, score):
            tokenizers.append(score.tokenizer)
            s_tok = 1
    dim = cluster.embed_dim
    batches = _ShardBatches(tar_path, shard, keys, members, captions, compute.batch_size, preprocesses, tokenizers)
    workers = max(0, min(compute.workers, batches.n_batches))
    scores = np.zeros(n, dtype=np.float32)
    # CPU threads: compute.threads, or (0) the cores left beside the decode workers
    threads = compute.threads if compute.threads > 0 else auto_threads(workers)
    with torch_threads(threads), contextlib.ExitStack() as stack:
        # entered meta first: renamed last (LIFO), so metadata appears only with its arrays
        tmp_meta = stack.enter_context(atomic_path(out_meta, tmp_root))
        tmp_text = stack.enter_context(atomic_path(out_text, tmp_root))
        tmp_img = stack.enter_context(atomic_path(out_img, tmp_root))
        if n == 0:
            np.save(tmp_img, np.zeros((0, dim), np.float16), allow_pickle=False)
            np.save(tmp_text, np.zeros((0, dim), np.float16), allow_pickle=False)
        else:
            img_mm = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.float16, shape=(n, dim))
            txt_mm = np.lib.format.open_memmap(tmp_text, mode="w+", dtype=np.float16, shape=(n, dim))
            loader = DataLoader(
                __getattr__("TorchShardBatches")(batches),
                batch_size=None,
                num_workers=workers,
                pin_memory=device.startswith("cuda"),
                prefetch_factor=2 if workers > 0 else None,
            )
            done = 0
            with torch.inference_mode():
                for item in progress(loader, desc=f"embed {shard}", unit="batch", total=batches.n_batches):
                    if "error" in item:
                        raise EmbedError(item["error"])
                    start = int(item["start"])
                    imgs, toks = item["images"], item["tokens"]
                    img = _features(cluster.model.encode_image, imgs[0], device, precision)
                    txt = _features(cluster.model.encode_text, toks[0], device, precision)
                    if score is None:
                        s = (img * txt).sum(-1)
                    else:
                        simg = _features(score.model.encode_image, imgs[s_img], device, precision)
                        stxt = _features(score.model.encode_text, toks[s_tok], device, precision)
                        s = (simg * stxt).sum(-1)
                    k = img.shape[0]
                    if img.shape[1] != dim:
                        raise EmbedError(f"shard {shard}: {cluster.name} produced {img.shape[1]}-dim embeddings, expected {dim}")
                    img_mm[start : start + k] = img.cpu().numpy().astype(np.float16)
                    txt_mm[start : start + k] = txt.cpu().numpy().astype(np.float16)
                    scores[start : start + k] = s.cpu().numpy()
                    done += k
            if done != n:  # pragma: no cover - every batch index is visited once
                raise EmbedError(f"shard {shard}: embedded {done} of {n} samples")
            for mm in (img_mm, txt_mm):
                mm.flush()
            del img_mm, txt_mm
        meta = pl.DataFrame(
            {
                "uid": pl.Series(uids, dtype=pl.Utf8),
                "shard": pl.Series([shard] * n, dtype=pl.Utf8),
                "key": pl.Series(keys, dtype=pl.Utf8),
                "row": pl.Series(parquet_rows, dtype=pl.Int64),
                "clip_score": pl.Series(scores, dtype=pl.Float32),
            }
        )
        meta.write_parquet(tmp_meta, compression="zstd")

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
        embed_dim=dim,
    )
