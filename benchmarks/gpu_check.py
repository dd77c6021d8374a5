"""GPU check: what a GPU buys this pipeline, and whether CPU and GPU agree.

Sized for an H200 with 16 cores (about 5 minutes); on a CPU-only machine it
says so and runs the CPU half.  Sections: 1 environment; 2 the JPEG-decode
limit (synthetic JPEGs decoded + preprocessed by a pool of every core: the most
images/s this machine can feed an encoder); 3 ViT-B-32 embedding throughput
(random init, nothing downloaded) on pre-decoded tensors, GPU fp32/bf16/fp16
vs CPU, against that limit; 4 CPU/GPU embedding agreement; 5 faiss spherical
k-means and nearest-centroid assignment, GPU vs CPU, ``core.kmeans`` vs bare
faiss; 6 the project's torch path (torch on CUDA where faiss sees no GPU; on a
CPU-only machine torch's CPU stands in): its k-means fit against faiss' on the
CPU (objective, centroids, DBP decisions) and its assignment against faiss'
on the same centroids (labels, distances); 7 ``x @ cᵀ`` argmax in bf16 vs
fp32; 8 DBP decisions (``core.dbp``) on the CPU from the stored distances of
two devices; 9 a summary.

It prints figures and asserts nothing; the agreement checks print PASS/FAIL
and the exit status is 1 when one fails or a section breaks.  A section whose
optional package (faiss, open_clip) is missing is skipped.

    python benchmarks/gpu_check.py            # GPU machine, < 6 min
    python benchmarks/gpu_check.py --quick    # ~1 min smoke run on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import synth  # noqa: F401  (puts the repository on sys.path)
from _common import Report, clock, cuda_sync

FP32_MIN_COS = 0.999  # the design's cross-device promise, for fp32 on both sides
# bf16 keeps 8 significand bits (rounding ~2e-3 per op); through 12 blocks the
# rows drift to a cosine of ~0.995-0.999, so 0.99 flags a broken path (wrong
# autocast, overflow), not expected rounding; 0.999 is printed beside it.
LOW_PRECISION_MIN_COS = 0.99
OPTIONAL = ("faiss", "open_clip")  # packages whose absence skips a section
DBP = dict(l=20, tau=0.1, keep_fraction=0.25, r=0.0)  # the settings' defaults


@dataclasses.dataclass(frozen=True)
class Sizes:
    jpegs: int = 8192  # synthetic JPEGs for the decode limit
    jpeg_px: int = 256
    batch: int = 512  # GPU embedding batch
    batches: int = 24  # GPU batches per precision
    cpu_batch: int = 32
    cpu_batches: int = 2
    agree: int = 256  # images in the agreement check
    rows: int = 2_000_000  # embeddings for k-means / assignment / decisions
    d: int = 512
    k: int = 1000
    niter: int = 20
    cpu_torch_rows: int = 200_000  # rows of the CPU half of section 6
    chunk: int = 65536  # assignment chunk (the project's default)


QUICK = Sizes(jpegs=192, batch=32, batches=2, cpu_batch=8, cpu_batches=1, agree=32,
              rows=30_000, k=64, niter=8, cpu_torch_rows=30_000, chunk=16384)


def scaled(s: Sizes, scale: float) -> Sizes:
    grow = ("jpegs", "batches", "rows", "cpu_torch_rows")
    return dataclasses.replace(s, **{f: max(1, int(getattr(s, f) * scale)) for f in grow})


@dataclasses.dataclass
class Env:
    cores: int
    torch_gpu: bool  # torch sees CUDA
    faiss_gpu: bool  # faiss sees a GPU (a CPU-only faiss build does not)


def env_section(rep: Report) -> Env:
    import torch

    from dbprune_assets.core.running.device import available_cores

    cores = available_cores()
    gpu = torch.cuda.is_available()
    rep.fig("python", sys.version.split()[0])
    rep.fig("torch", torch.__version__)
    rep.fig("CUDA available", str(gpu))
    if gpu:
        p = torch.cuda.get_device_properties(0)
        rep.fig("GPU", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    try:
        import faiss
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        rep.fig("faiss", f"{faiss.__version__}, get_num_gpus() = {ngpu}")
    except ImportError:
        ngpu = 0
        rep.fig("faiss", "not installed (sections 5 and 7 skip it)")
    rep.fig("CPU cores (affinity)", cores)
    if not gpu and not ngpu:
        print("  no GPU: CPU half only")
    return Env(cores, gpu, ngpu > 0)


_PRE: list[Any] = []


def _transform() -> Any:
    """ViT-B-32's eval transform (resize, crop, normalise), made once per process."""
    if not _PRE:
        import open_clip
        _PRE.append(open_clip.image_transform(224, is_train=False))
    return _PRE[0]


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)
    _transform()


def make_jpeg(args: tuple[int, int]) -> bytes:
    """A JPEG with web-like content: a smooth random field, texture, shapes."""
    from PIL import Image, ImageDraw
    i, px = args
    rng = np.random.default_rng(i)
    low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((px, px), Image.BICUBIC)
    arr = np.asarray(low, dtype=np.int16) + rng.normal(0, rng.uniform(2, 25), (px, px, 3)).astype(np.int16)
    im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 6))):
        x, y = (int(v) for v in rng.integers(0, px - px // 4, 2))
        draw.rectangle([x, y, x + px // 4, y + px // 5], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(75, 95)))
    return buf.getvalue()


def decode(data: bytes) -> float:
    """Decode + open_clip preprocess one JPEG (in a pool worker)."""
    from PIL import Image
    return float(_transform()(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0, 0])


def decode_section(rep: Report, env: Env, s: Sizes) -> tuple[list[bytes], float]:
    from dbprune_assets.core.running.device import torch_threads

    ctx = mp.get_context("forkserver")
    with ctx.Pool(env.cores, initializer=_worker_init) as pool:
        jpegs = pool.map(make_jpeg, [(i, s.jpeg_px) for i in range(s.jpegs)], chunksize=16)
        pool.map(decode, jpegs[: env.cores * 2], chunksize=1)  # first decode per worker, untimed
        _, dt = clock(lambda: pool.map(decode, jpegs, chunksize=16))
    one = jpegs[: max(8, s.jpegs // 16)]
    _transform()
    with torch_threads(1):
        _, dt1 = clock(lambda: [decode(b) for b in one])
    rep.fig("JPEGs", f"{len(jpegs)} of {s.jpeg_px}x{s.jpeg_px}, mean {np.mean([len(b) for b in jpegs]) / 1024:.1f} KiB")
    rate = len(jpegs) / dt
    rep.fig(f"decode+preprocess, {env.cores} processes", rate, "images/s")
    rep.fig("decode+preprocess, 1 core", len(one) / dt1, "images/s")
    return jpegs, rate


def embed(model: Any, x: Any, device: str, precision: str) -> Any:
    """L2-normalised float32 image embeddings of a preprocessed batch
    (``precision`` fp32, or bf16/fp16 under autocast)."""
    import torch
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(device, dtype=low or torch.bfloat16, enabled=low is not None):
        f = model.encode_image(x.to(device, non_blocking=True))
    return torch.nn.functional.normalize(f.float(), dim=-1)


@dataclasses.dataclass
class Models:
    cpu: Any
    gpu: Any | None
    preprocess: Any
    tensors: Any  # (agree, 3, 224, 224) preprocessed, on the CPU


def load_models(env: Env, jpegs: list[bytes], s: Sizes) -> Models:
    import copy

    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    gpu = copy.deepcopy(model).to("cuda") if env.torch_gpu else None
    x = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs[: s.agree]])
    return Models(model, gpu, pre, x)


def images_per_s(model: Any, x: Any, device: str, precision: str, batches: int, budget: float) -> float:
    xb = x.to(device)
    embed(model, xb, device, precision)  # warm-up (kernels, autotune)
    cuda_sync()
    t0, n = time.perf_counter(), 0
    while n < batches * len(xb) and (n == 0 or time.perf_counter() - t0 < budget):
        embed(model, xb, device, precision)
        n += len(xb)
    cuda_sync()
    return n / (time.perf_counter() - t0)


def batch_of(x: Any, size: int) -> Any:
    """``size`` preprocessed images: ``x`` repeated (content does not change the speed)."""
    return x.repeat(-(-size // len(x)), 1, 1, 1)[:size].contiguous()


def embed_section(rep: Report, env: Env, s: Sizes, jpegs: list[bytes], decode_rate: float, budget: float) -> Models:
    m = load_models(env, jpegs, s)
    rates = {}
    if m.gpu is not None:
        for prec in ("fp32", "bf16", "fp16"):
            rates[prec] = images_per_s(m.gpu, batch_of(m.tensors, s.batch), "cuda", prec, s.batches, budget)
            rep.fig(f"GPU {prec}, batch {s.batch}", rates[prec], "images/s")
    cpu = images_per_s(m.cpu, batch_of(m.tensors, s.cpu_batch), "cpu", "fp32", s.cpu_batches, budget)
    rep.fig(f"CPU fp32, batch {s.cpu_batch}, {env.cores} threads", cpu, "images/s")
    best = max(rates.values(), default=cpu)
    rep.fig("fastest embedding / decode limit", best / decode_rate, "x (>1: decode-bound)")
    if rates:
        rep.fig("GPU bf16 / CPU fp32", rates["bf16"] / cpu, "x")
        rep.fig("cores to decode for GPU bf16", rates["bf16"] / decode_rate * env.cores, "cores")
    try:
        from PIL import Image

        from dbprune_assets.core.models.embed import encode_images

        dev = "cuda" if m.gpu is not None else "cpu"
        pil = [Image.open(io.BytesIO(b)) for b in jpegs[: max(s.agree, min(1024, len(jpegs)))]]
        _, dt = clock(lambda: encode_images(m.cpu if m.gpu is None else m.gpu, m.preprocess, pil, batch_size=256, device=dev))
        rep.fig(f"project encode_images on {dev} (serial decode)", len(pil) / dt, "images/s")
    except Exception as e:  # noqa: BLE001 - the module is optional here
        print(f"  project path skipped: {type(e).__name__}: {e}")
    return m


def agree_section(rep: Report, m: Models) -> None:
    ref = embed(m.cpu, m.tensors, "cpu", "fp32")
    pairs = [("cuda", m.gpu, p) for p in ("fp32", "bf16", "fp16")] if m.gpu is not None else [("cpu", m.cpu, "bf16")]
    print(f"  reference: CPU fp32, {len(ref)} images, seeded random-init ViT-B-32")
    for device, model, prec in pairs:
        cos = (embed(model, m.tensors, device, prec).cpu() * ref).sum(1)
        lo, mean = float(cos.min()), float(cos.mean())
        rep.fig(f"cosine {device} {prec} vs CPU fp32: min / mean", f"{lo:.6f} / {mean:.6f}")
        need = FP32_MIN_COS if prec == "fp32" and device != "cpu" else LOW_PRECISION_MIN_COS
        rep.check(f"embeddings {device} {prec}", lo >= need, f"min cosine {lo:.6f} >= {need}"
                  + ("" if need == FP32_MIN_COS else f" (design's {FP32_MIN_COS}: {'met' if lo >= FP32_MIN_COS else 'NOT met'})"))


def clustered(n: int, s: Sizes, device: str, seed: int = 0) -> np.ndarray:
    """Unit rows around 2k random directions (cosine ~0.6 to their centre)."""
    import torch
    g = torch.Generator(device).manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(2 * s.k, s.d, generator=g, device=device), dim=1)
    out = np.empty((n, s.d), dtype=np.float32)
    for a in range(0, n, 262144):
        b = min(n, a + 262144)
        lab = torch.randint(0, 2 * s.k, (b - a,), generator=g, device=device)
        x = centres[lab] + 0.06 * torch.randn(b - a, s.d, generator=g, device=device)
        out[a:b] = torch.nn.functional.normalize(x, dim=1).cpu().numpy()
    return out


def bare_kmeans(x: np.ndarray, s: Sizes, gpu: bool) -> np.ndarray:
    import faiss
    km = faiss.Kmeans(s.d, s.k, niter=s.niter, seed=1, spherical=True, gpu=gpu)
    km.train(x)
    return km.centroids


def bare_assign(x: np.ndarray, cent: np.ndarray, s: Sizes, gpu: bool) -> np.ndarray:
    import faiss
    index = faiss.IndexFlatIP(s.d)
    index.add(cent)
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return np.concatenate([index.search(x[a : a + s.chunk], 1)[1][:, 0] for a in range(0, len(x), s.chunk)])


@dataclasses.dataclass
class Assigned:
    x: np.ndarray
    cent: np.ndarray  # the CPU-trained project centroids, used by every assignment
    cpu: tuple[np.ndarray, np.ndarray]  # project nearest_centroid on the CPU
    gpu: tuple[np.ndarray, np.ndarray] | None  # the same on faiss' GPU


def faiss_section(rep: Report, env: Env, s: Sizes) -> Assigned:
    import faiss  # noqa: F401 - skips the section when missing

    from dbprune_assets.core.running.device import faiss_threads
    from dbprune_assets.core.method.kmeans import nearest_centroid, spherical_kmeans

    x = clustered(s.rows, s, "cuda" if env.torch_gpu else "cpu")
    rep.fig("data", f"{s.rows:,} x {s.d} float32, k = {s.k}, niter = {s.niter}")
    print(f"  k-means trains on min(n, 256 k) = {min(s.rows, 256 * s.k):,} rows (faiss' cap, both paths)")
    devices = ["cpu"] + (["gpu"] if env.faiss_gpu else [])
    secs: dict[str, float] = {}
    out: dict[str, Any] = {}
    with faiss_threads(env.cores):
        for dev in devices:
            g = dev == "gpu"
            jobs = {
                f"kmeans project {dev}": lambda: spherical_kmeans(x, s.k, s.niter, 1, use_gpu=g, threads=env.cores),
                f"kmeans bare {dev}": lambda: bare_kmeans(x, s, g),
                f"assign project {dev}": lambda: nearest_centroid(x, out["cent"], s.chunk, use_gpu=g, threads=env.cores),
                f"assign bare {dev}": lambda: bare_assign(x, out["cent"], s, g),
            }
            for name, job in jobs.items():
                out[name], secs[name] = clock(job)
                out.setdefault("cent", out[name])  # the first run: project CPU centroids
                rate = f"{secs[name]:.2f} s" + (f", {s.rows / secs[name]:,.0f} rows/s" if "assign" in name else "")
                rep.fig(name, rate)
    for what in ("kmeans", "assign"):
        for dev in devices:
            rep.fig(f"{what} {dev}: project / bare", secs[f"{what} project {dev}"] / secs[f"{what} bare {dev}"], "x")
        if env.faiss_gpu:
            rep.fig(f"{what} project: CPU / GPU", secs[f"{what} project cpu"] / secs[f"{what} project gpu"], "x")
    gpu = out.get("assign project gpu")
    if gpu is not None:
        rep.fig("assignments GPU == CPU", float(np.mean(gpu[0] == out["assign project cpu"][0])), "fraction")
    return Assigned(x, out["cent"], out["assign project cpu"], gpu)


def torch_kmeans_section(rep: Report, env: Env, s: Sizes, a: Assigned) -> None:
    """The project's torch path (``kmeans_torch``: faiss' algorithm in torch)
    against faiss on the CPU: the fit (same sample, init, iterations) and the
    assignment on the same centroids, which must agree label for label."""
    from dbprune_assets.core.method.kmeans import nearest_centroid, spherical_kmeans
    from dbprune_assets.core.running.device import torch_backend

    dev = "cuda" if env.torch_gpu else "cpu"
    n = s.rows if env.torch_gpu else min(s.rows, s.cpu_torch_rows)
    x, tb = a.x[:n], torch_backend(dev)
    print(f"  torch on {dev}, {n:,} rows" + ("" if env.torch_gpu else " (CPU stand-in for CUDA)"))
    if n == s.rows:
        ref, (lab_ref, dist_ref) = a.cent, a.cpu
    else:
        ref = spherical_kmeans(x, s.k, s.niter, 1, use_gpu=False, threads=env.cores)
        lab_ref, dist_ref = nearest_centroid(x, ref, s.chunk, use_gpu=False, threads=env.cores)
    cent, dt = clock(lambda: spherical_kmeans(x, s.k, s.niter, 1, use_gpu=tb, threads=env.cores))
    rep.fig(f"kmeans project torch {dev}", f"{dt:.2f} s")
    (lab_t, dist_t), dt = clock(lambda: nearest_centroid(x, cent, s.chunk, use_gpu=tb, threads=env.cores))
    rep.fig(f"assign project torch {dev}", f"{dt:.2f} s, {n / dt:,.0f} rows/s")
    obj_ref, obj_t = float(np.sum(1.0 - dist_ref, dtype=np.float64)), float(np.sum(1.0 - dist_t, dtype=np.float64))
    rel = obj_t / obj_ref - 1.0
    rep.fig("objective Σ max x·c: faiss CPU fit / torch fit", f"{obj_ref:,.2f} / {obj_t:,.2f} ({rel:+.2e})")
    rep.check("torch fit objective within 0.5% of faiss CPU's", abs(rel) <= 0.005, f"relative difference {rel:+.2e}")
    rep.fig("centroids max |torch fit - faiss CPU fit|", float(np.abs(cent - ref).max()))
    rep.fig("rows in the same cluster, torch fit vs faiss CPU fit", float(np.mean(lab_t == lab_ref)), "fraction")
    uids = np.char.mod("%012x", np.arange(n))
    keep_ref, _ = decisions(lab_ref, dist_ref, ref, uids)
    keep_t, _ = decisions(lab_t, dist_t, cent, uids)
    rep.fig("DBP decisions differing, torch fit vs faiss CPU fit", int((keep_ref != keep_t).sum()))
    lab_s, dist_s = nearest_centroid(x, ref, s.chunk, use_gpu=tb, threads=env.cores)
    same = np.array_equal(lab_s, lab_ref) and np.array_equal(dist_s, dist_ref)
    rep.check(f"assignment torch {dev} == faiss CPU (same centroids)", same,
              f"{int((lab_s != lab_ref).sum())} labels, {int((dist_s != dist_ref).sum())} distances differ of {n:,}")


def torch_assign(x: Any, cent: Any, dtype: Any, chunk: int) -> tuple[Any, Any]:
    """(cluster, cosine distance) by ``x @ cᵀ`` argmax (first maximum) in ``dtype``."""
    import torch
    c = cent.to(dtype)
    parts = [torch.max(x[a : a + chunk].to(dtype) @ c.T, dim=1) for a in range(0, len(x), chunk)]
    return torch.cat([p.indices for p in parts]), 1 - torch.cat([p.values.float() for p in parts])


def torch_section(rep: Report, env: Env, s: Sizes, a: Assigned) -> None:
    import torch
    device = "cuda" if env.torch_gpu else "cpu"
    n = s.rows if env.torch_gpu else min(s.rows, s.cpu_torch_rows)
    x = torch.from_numpy(a.x[:n]).to(device)
    c = torch.from_numpy(a.cent).to(device)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch_assign(x[: s.chunk], c, dtype, s.chunk)  # warm-up
        res[dtype], dt = clock(lambda: torch_assign(x, c, dtype, 4 * s.chunk))
        rep.fig(f"torch {device} {str(dtype)[6:]} assign, {n:,} rows", n / dt, "rows/s")
    (i32, d32), (i16, d16) = res[torch.float32], res[torch.bfloat16]
    rep.fig("bf16 argmax == fp32 argmax", float((i32 == i16).float().mean()), "fraction")
    rep.fig("bf16 max |distance - fp32 distance|", float((d32 - d16).abs().max()))
    rep.fig("torch fp32 argmax == faiss CPU assignment", float(np.mean(i32.cpu().numpy() == a.cpu[0][:n])), "fraction")


def decisions(cluster: np.ndarray, dist: np.ndarray, cent: np.ndarray, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DBP keep mask and quotas, on the CPU, with the settings' defaults."""
    from dbprune_assets.core.method import dbp

    k = len(cent)
    count, total = dbp.cluster_partial_sums(cluster, dist, k)
    C = dbp.complexity(dbp.d_inter(cent, DBP["l"]), dbp.d_intra(total, count))
    P = dbp.softmax_probabilities(C, DBP["tau"])
    M = dbp.target_size(len(cluster), keep_fraction=DBP["keep_fraction"])
    N = dbp.solve_quotas(P, count, M, dbp.lower_bounds(count, M, k, DBP["r"]))
    return dbp.select_hardest(cluster, dist, uids, N), N


def other_device(env: Env, a: Assigned, s: Sizes) -> tuple[str, tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    """The second table: faiss on the GPU (project nearest_centroid), else the
    project's torch path on CUDA (or the CPU): torch searches, the CPU decides
    the label and stores the exact distance (kmeans_exact); also torch's own
    raw fp32 distances, to show what that recomputation buys."""
    if a.gpu is not None:
        return "faiss GPU (project nearest_centroid)", a.gpu, None
    import torch

    from dbprune_assets.core.method.kmeans import nearest_centroid
    from dbprune_assets.core.running.device import torch_backend
    dev = "cuda" if env.torch_gpu else "cpu"
    _, d = torch_assign(torch.from_numpy(a.x).to(dev), torch.from_numpy(a.cent).to(dev), torch.float32, s.chunk)
    table = nearest_centroid(a.x, a.cent, s.chunk, use_gpu=torch_backend(dev), threads=env.cores)
    return f"project nearest_centroid through torch on {dev} (no faiss GPU)", table, d.cpu().numpy()


def stored(tmp: Path, name: str, table: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Round-trip (cluster int32, distance float32) through .npy files."""
    for part, arr in zip(("cluster", "distance"), table):
        np.save(tmp / f"{name}.{part}.npy", arr.astype(np.int32 if part == "cluster" else np.float32))
    return np.load(tmp / f"{name}.cluster.npy"), np.load(tmp / f"{name}.distance.npy")


def decisions_section(rep: Report, env: Env, s: Sizes, a: Assigned) -> None:
    label, other, raw = other_device(env, a, s)
    print(f"  reference: faiss CPU (project nearest_centroid); other: {label}")
    uids = np.char.mod("%012x", np.arange(s.rows))
    with tempfile.TemporaryDirectory() as tmp:
        ref, oth = stored(Path(tmp), "ref", a.cpu), stored(Path(tmp), "other", other)
    (keep1, q1), (keep2, _) = decisions(*ref, a.cent, uids), decisions(*ref, a.cent, uids)
    rep.check("same stored table, two CPU runs", bool(np.array_equal(keep1, keep2)),
              f"{int(keep1.sum()):,} kept of {s.rows:,}, {int((keep1 != keep2).sum())} decisions differ")
    moved = ref[0] != oth[0]
    # the reference table with the other device's rows wherever the assignment differs
    hybrid = (np.where(moved, oth[0], ref[0]), np.where(moved, oth[1], ref[1]))
    keep_o, q_o = decisions(*oth, a.cent, uids)
    keep_h, _ = decisions(*hybrid, a.cent, uids)
    rep.fig("samples whose cluster differs", int(moved.sum()))
    rep.fig("max |distance diff|, same cluster", float(np.abs(ref[1][~moved] - oth[1][~moved]).max(initial=0.0)))
    rep.fig("clusters whose quota differs", int((q1 != q_o).sum()))
    rep.fig("decisions differing, reference vs other", int((keep1 != keep_o).sum()))
    if raw is not None:
        keep_raw, _ = decisions(oth[0], raw.astype(np.float32), a.cent, uids)
        rep.fig("decisions differing with the device's raw distances", int((keep1 != keep_raw).sum()))
    rep.check("cross-device differences come from assignments only", bool(np.array_equal(keep_h, keep_o)),
              f"{int((keep_h != keep_o).sum())} decisions change through distance rounding alone")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run (tiny sizes)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply image, batch and row counts")
    ap.add_argument("--budget-s", type=float, default=20.0, help="time cap of each throughput loop")
    args = ap.parse_args(argv)
    s = scaled(QUICK if args.quick else Sizes(), args.scale)
    rep, t0 = Report(OPTIONAL), time.perf_counter()
    env = rep.section("1 environment", env_section)
    dec = env and rep.section("2 JPEG-decode limit", decode_section, env, s)
    models = dec and rep.section("3 embedding throughput", embed_section, env, s, *dec, args.budget_s)
    if models:
        rep.section("4 CPU/GPU embedding agreement", agree_section, models)
    assigned = env and rep.section("5 faiss k-means and assignment", faiss_section, env, s)
    if assigned:
        rep.section("6 torch k-means and assignment vs faiss CPU", torch_kmeans_section, env, s, assigned)
        rep.section("7 bf16 torch assignment", torch_section, env, s, assigned)
        rep.section("8 decisions from stored distances", decisions_section, env, s, assigned)
    return rep.summary("9 summary", time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
