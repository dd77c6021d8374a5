"""Reading one shard's samples in batches, for ``embed_shard``'s DataLoader workers.

:func:`image_members` finds each sample's image member from the tar's headers
only (:func:`index_tar`); :class:`ShardBatches` is the iterable the workers
split by batch index: worker ``b % workers`` builds batch ``b`` (samples
``b*B .. b*B+B-1``), seeking to its members' bytes, decoding and
preprocessing the images and tokenising the captions.
``TorchShardBatches`` wraps it as a torch ``IterableDataset`` (built on first
use: importing this module does not import torch).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from dbprune_assets.core.pool.wds import MemberRef, TarDamaged, image_member, iter_sample_headers


class EmbedError(RuntimeError):
    """A shard cannot be embedded; the message names shard, key and cause."""


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


def image_members(tar_path: Path, shard: str, keys: Sequence[str]) -> list[MemberRef]:
    """The image member of each key in the tar, in ``keys`` order; EmbedError
    naming the key when it is not in the tar or has no image."""
    members: list[MemberRef] = []
    if not keys:
        return members
    index = index_tar(tar_path, shard)
    for key in keys:
        entry = index.get(key)
        image = image_member(entry) if entry else None
        if image is None:
            cause = "not in the tar" if not entry else f"no image member (found {', '.join(sorted(entry))})"
            raise EmbedError(f"shard {shard}: key {key}: {cause} ({tar_path})")
        members.append(image[1])
    return members


class ShardBatches:
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
    """``TorchShardBatches``: a torch IterableDataset over a ``ShardBatches``.

    Built on first use so that importing this module does not import torch;
    reachable as a module attribute (PEP 562), so it pickles by reference for
    spawned DataLoader workers too.
    """
    from torch.utils.data import IterableDataset

    class TorchShardBatches(IterableDataset):  # type: ignore[misc]
        def __init__(self, inner: ShardBatches) -> None:
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


def torch_dataset(batches: ShardBatches) -> Any:
    """``batches`` as a torch ``IterableDataset`` (``TorchShardBatches``) for a DataLoader."""
    return __getattr__("TorchShardBatches")(batches)
