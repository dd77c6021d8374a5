"""Embedding throughput: ``embed_shard`` against a bare open_clip loop.

Both paths embed the same shard with the same model, batch size and number of
decode workers, in the same process:

* ``embed_shard``: the pipeline's per-shard step (tar index, batches decoded in
  workers, image + text embeddings, clip_score, float16 memmaps, atomic writes);
* bare: a map-style Dataset reading the tar members, a plain DataLoader with
  default collation, ``encode_image`` / ``encode_text``, normalise, dot, and
  results kept in memory (no files);
* asset (``--asset``): the ``embeddings`` Dagster asset materialised for the
  shard on an ephemeral instance (run start-up, model load, samples table,
  catalog refresh included), wall time of the whole materialisation.

The shard is generated (``--samples`` JPEGs of coloured shapes, 48 px) unless
``--tar`` is given.  Without ``--pretrained`` the model is randomly
initialised (throughput does not depend on the weights).

    python benchmarks/bench_embed.py --model dbprune-tiny --samples 2000 --workers 1
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_shard(path: Path, n: int, size: int = 48, seed: int = 0) -> list[tuple[str, str]]:
    """Write a webdataset tar of ``n`` samples; returns (key, caption) in tar order."""
    from PIL import Image, ImageDraw

    from dbprune_assets.core.running.progress import progress
    from dbprune_assets.core.pool.wds import write_tar

    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 225), "yellow": (235, 215, 40)}
    rng = np.random.default_rng(seed)
    out = []

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for i in range(n):
            key = f"{i:09d}"
            name = list(colors)[i % len(colors)]
            im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 90, 3)))
            x, y = (int(v) for v in rng.integers(2, size // 2, 2))
            ImageDraw.Draw(im).ellipse([x, y, x + size // 3, y + size // 3], fill=colors[name])
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            caption = f"a {name} circle"
            out.append((key, caption))
            yield key, {"jpg": buf.getvalue(), "txt": caption.encode(), "json": b"{}"}

    write_tar(path, progress(samples(), desc="generating the shard", unit="sample", total=n))
    return out


def read_rows(tar: Path) -> list[tuple[str, str]]:
    """(key, caption) of the samples of a webdataset tar that have a caption."""
    from dbprune_assets.core.pool.wds import iter_samples

    return [(key, m["txt"].decode()) for key, m in iter_samples(tar) if "txt" in m]


class BareDataset:
    """Map-style dataset over a tar's members (the straightforward approach)."""

    def __init__(self, tar: Path, keys: list[str], captions: list[str], preprocess, tokenizer):
        self.tar, self.keys, self.captions = str(tar), keys, captions
        self.preprocess, self.tokenizer = preprocess, tokenizer
        with tarfile.open(self.tar) as tf:
            self.members = {m.name: m for m in tf if m.isfile()}
        self._tf = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        from PIL import Image

        if self._tf is None:  # one handle per worker process
            self._tf = tarfile.open(self.tar)
        data = self._tf.extractfile(self.members[f"{self.keys[i]}.jpg"]).read()
        image = self.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
        return image, self.tokenizer([self.captions[i]])[0]


def bare_loop(enc, tar: Path, rows, batch_size: int, workers: int, device: str, precision: str) -> tuple[int, float]:
    import torch
    from torch.utils.data import DataLoader

    from dbprune_assets.core.models.embed import autocast

    ds = BareDataset(tar, [k for k, _ in rows], [c for _, c in rows], enc.preprocess, enc.tokenizer)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.startswith("cuda"))
    t0 = time.perf_counter()
    imgs, txts, scores = [], [], []
    with torch.inference_mode():
        for images, tokens in loader:
            with autocast(device, precision):
                fi = enc.model.encode_image(images.to(device, non_blocking=True))
                ft = enc.model.encode_text(tokens.to(device, non_blocking=True))
            fi = torch.nn.functional.normalize(fi.float(), dim=-1)
            ft = torch.nn.functional.normalize(ft.float(), dim=-1)
            imgs.append(fi.half().cpu())
            txts.append(ft.half().cpu())
            scores.append((fi * ft).sum(-1).cpu())
    n = sum(len(s) for s in scores)
    return n, time.perf_counter() - t0


def asset_runner(tmp: Path, tar: Path, rows, enc, compute):
    """A one-shard pool + home whose settings name the same model, ingested once;
    returns a function that materialises the ``embeddings`` asset and returns
    (n, seconds of the whole materialisation)."""
    import shutil

    import dagster as dg
    import polars as pl

    from dbprune_assets.core.settings import build_settings
    from dbprune_assets.defs.common import SHARDS, DbpruneResource
    from dbprune_assets.definitions import ASSETS

    home, pool = tmp / "home", tmp / "home" / "pool"
    pool.mkdir(parents=True)
    shutil.copy(tar, pool / "00000.tar")
    pl.DataFrame({"key": [k for k, _ in rows], "caption": [c for _, c in rows], "status": ["success"] * len(rows),
                  "width": [48] * len(rows), "height": [48] * len(rows)}).write_parquet(pool / "00000.parquet")
    model = enc.resolved.model_name
    settings = build_settings({"profile": "paper", "encoder": {"cluster_encoder": {"model": model}},
                               "compute": compute.model_dump()})
    (home / "config.yaml").write_text(settings.to_yaml())
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARDS, ["00000"])
    resources = {"dbprune": DbpruneResource(home=str(home), pool=str(pool))}
    assert dg.materialize(ASSETS, selection=["raw_metadata"], partition_key="00000", instance=instance,
                          resources=resources).success

    def run() -> tuple[int, float]:
        t0 = time.perf_counter()
        assert dg.materialize(ASSETS, selection=["embeddings"], partition_key="00000", instance=instance,
                              resources=resources).success
        return len(rows), time.perf_counter() - t0

    return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dbprune-tiny", help="open_clip architecture, hf-hub:…, or local-dir:…")
    p.add_argument("--pretrained", default=None, help="tag or checkpoint path (default: random init)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="decode worker processes (both paths)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, both paths (0 = cores minus workers, as embed_shard)")
    p.add_argument("--samples", type=int, default=2000, help="size of the generated shard")
    p.add_argument("--tar", type=Path, default=None, help="embed this tar instead of a generated one")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each path, interleaved; one warm-up first")
    p.add_argument("--asset", action="store_true", help="also materialise the embeddings asset for the shard")
    return p.parse_args(argv)


def shard_to_embed(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[tuple[str, str]]]:
    """``--tar`` and its rows, or a generated shard of ``--samples`` samples."""
    if args.tar is not None:
        return args.tar, read_rows(args.tar)
    tar = tmp / "00000.tar"
    t0 = time.perf_counter()
    rows = make_shard(tar, args.samples)
    print(f"generated {len(rows)} samples in {time.perf_counter() - t0:.1f} s")
    return tar, rows


def bench_encoder(args: argparse.Namespace, tmp: Path, device: str):
    """The encoder both paths use: ``--model`` loaded as the pipeline loads it;
    an architecture without ``--pretrained`` is randomly initialised and saved
    as a local-dir first, so embed_shard loads it the normal way."""
    import torch

    from dbprune_assets.core.models import encoders as E
    from dbprune_assets.core.models.model_dir import save_local_dir
    from dbprune_assets.core.settings import EncoderSpec

    if args.pretrained or args.model.startswith(("hf-hub:", "local-dir:")):
        return E.load_encoder(EncoderSpec(model=args.model, pretrained=args.pretrained), device)
    import open_clip

    E.register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model)
    folder = save_local_dir(tmp / "model", model, E.model_config(args.model), tmp_root=tmp / ".tmp")
    return E.load_encoder(EncoderSpec(model=f"local-dir:{folder}"), device)


def time_paths(paths: list[tuple[str, Callable[[], tuple[int, float]]]], repeat: int) -> dict[str, list[float]]:
    """images/s of each path per timed run, after one warm-up run of each."""
    runs: dict[str, list[float]] = {}
    for name, fn in paths:
        fn()  # warm-up (page cache, worker start-up code paths, allocator)
    for _ in range(max(1, repeat)):  # interleaved, so drifting machine load hits both alike
        for name, fn in paths:
            n, secs = fn()
            runs.setdefault(name, []).append(n / secs)
    return runs


def print_results(runs: dict[str, list[float]]) -> None:
    for name, ips in runs.items():
        each = ", ".join(f"{v:.0f}" for v in ips)
        print(f"{name:>15}: best {max(ips):8.1f} images/s, median {float(np.median(ips)):8.1f} (runs: {each})")
    ratio_best = max(runs["embed_shard"]) / max(runs["bare open_clip"])
    ratio_med = float(np.median(runs["embed_shard"]) / np.median(runs["bare open_clip"]))
    print(f"{'ratio':>15}: {ratio_best:.2f} best, {ratio_med:.2f} median (embed_shard / bare)")
    if "embeddings asset" in runs:
        a_best = max(runs["embeddings asset"]) / max(runs["bare open_clip"])
        a_med = float(np.median(runs["embeddings asset"]) / np.median(runs["bare open_clip"]))
        print(f"{'ratio':>15}: {a_best:.2f} best, {a_med:.2f} median (embeddings asset, whole run / bare)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import polars as pl
    import torch

    from dbprune_assets.core.running.device import auto_threads, torch_device
    from dbprune_assets.core.models.embed import embed_shard, resolve_precision
    from dbprune_assets.core.settings import ComputeSettings

    # the same CPU thread count for both paths (embed_shard's auto choice when 0)
    threads = args.threads if args.threads > 0 else auto_threads(args.workers)
    torch.set_num_threads(threads)
    device = torch_device(args.device)
    precision = resolve_precision(device, args.precision)
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp_s:
        tmp = Path(tmp_s)
        tar, rows = shard_to_embed(args, tmp)
        enc = bench_encoder(args, tmp, device)
        frame = pl.DataFrame({"uid": [k for k, _ in rows], "key": [k for k, _ in rows], "caption": [c for _, c in rows]})
        compute = ComputeSettings(
            device=device, batch_size=args.batch_size, workers=args.workers, threads=threads, precision=precision
        )
        out = tmp / "out"

        def run_pipeline() -> tuple[int, float]:
            st = embed_shard(tar, frame, enc, None, out / "img.npy", out / "txt.npy", out / "meta.parquet", compute, tmp / ".tmp")
            return st.n, st.seconds

        def run_bare() -> tuple[int, float]:
            return bare_loop(enc, tar, rows, args.batch_size, args.workers, device, precision)

        print(
            f"model {enc.name} (dim {enc.embed_dim}), device {device}, precision {precision}, "
            f"batch {args.batch_size}, workers {args.workers}, torch threads {torch.get_num_threads()}, {len(rows)} samples"
        )
        paths = [("embed_shard", run_pipeline), ("bare open_clip", run_bare)]
        if args.asset:
            paths.append(("embeddings asset", asset_runner(tmp, tar, rows, enc, compute)))
        print_results(time_paths(paths, args.repeat))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
