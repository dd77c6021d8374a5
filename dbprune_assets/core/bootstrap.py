"""The bootstrap encoder: a small CLIP trained with the real ``open_clip_train``.

Without pretrained weights (offline), the pipeline trains ``dbprune-tiny`` on
the sample pool's clean ``reference/`` split (or, for a user pool without one,
on the pool itself) and uses it as cluster and score encoder.

Training runs ``open_clip_train.main.main(argv)`` in a subprocess
(``python -m dbprune_assets.core.bootstrap [--threads N] -- ARGV``): the
launcher registers the project's model configs, makes open_clip_train's sample
shuffle seeded, and hands ``argv`` to open_clip_train unchanged.  The
architecture is passed as ``--model local-dir:<folder holding only
open_clip_config.json>``: open_clip builds a randomly initialised model from
that config (no weights in the folder) and ``get_tokenizer`` reads the text
config from it.  The final checkpoint is written to ``out_dir`` as an
open_clip ``local-dir:`` folder (config + ``open_clip_model.safetensors``).

``build_train_argv`` / ``run_open_clip_train`` / ``parse_loss_curve`` are public
so that per-strategy training reuses them on exported subsets.

Determinism: given ``seed``, the same shards, device, thread count and worker
count give bit-identical weights on CPU.  open_clip_train seeds torch/numpy/
random (model init, the DataLoader worker seeds, hence the augmentation) and
its shard shuffle, but draws its sample-shuffle buffer RNG from the clock;
the launcher replaces that with one seeded by (seed, worker, pass).  CPU
kernels are deterministic for a fixed number of intra-op threads (``threads``
sets ``torch.set_num_threads`` and OMP/MKL_NUM_THREADS in the subprocess);
another thread count can change float summation order, hence the last bits.
On CUDA open_clip_train enables cudnn.benchmark and TF32, so GPU runs are
repeatable only approximately.

torch and open_clip are imported inside the functions (cheap module import).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from dbprune_assets.core.atomic import scratch_dir, write_bytes, write_json
from dbprune_assets.core.encoders import (
    LOCAL_DIR,
    available_cores,
    default_preprocess_cfg,
    export_checkpoint,
    model_config,
    resolve_device,
    weights_hash,
    write_config_dir,
)
from dbprune_assets.core.settings import BootstrapSettings

RUN_NAME = "train"
LAUNCHER_MODULE = "dbprune_assets.core.bootstrap"


class BootstrapError(RuntimeError):
    """Training the bootstrap encoder (or any open_clip_train run) failed."""


class LossPoint(NamedTuple):
    """One logged training step; unpacks as ``(step, loss, epoch)``."""

    step: int  # optimiser steps done (1-based, over all epochs)
    loss: float  # the logged loss of that step (total loss; not the running average)
    epoch: int


@dataclass
class TrainRun:
    """What one ``open_clip_train`` subprocess left behind (in a scratch folder)."""

    argv: list[str]
    returncode: int
    seconds: float
    cpu_seconds: float  # user + system CPU time of the trainer and its loader workers
    run_dir: Path  # <logs>/<name>
    log_path: Path  # <run_dir>/out.log
    stdout_path: Path
    checkpoint: Path | None  # the final epoch_N.pt

    def tail(self, n: int = 40) -> str:
        for p in (self.stdout_path, self.log_path):
            if p.is_file():
                lines = p.read_text(errors="replace").splitlines()
                if lines:
                    return "\n".join(lines[-n:])
        return "(no output)"


@dataclass
class BootstrapResult:
    out_dir: Path
    model_name: str  # "local-dir:<out_dir>"
    weights_hash: str
    loss_curve: list[LossPoint]
    seconds: float  # whole call: training subprocess + export
    train_seconds: float  # the open_clip_train subprocess alone (wall clock)
    train_cpu_seconds: float  # its CPU time (trainer + loader workers): load-independent cost
    n_samples: int
    epochs: int
    steps: int
    device: str
    precision: str
    argv: list[str]
    log_path: Path | None = None  # the training log kept under logs_dir
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float | None:
        return self.loss_curve[-1].loss if self.loss_curve else None

    @property
    def first_loss(self) -> float | None:
        return self.loss_curve[0].loss if self.loss_curve else None


# ---------------------------------------------------------------------------
# argv, subprocess, log parsing (reused by per-strategy training)


def train_data_arg(train_data: Sequence[Path | str] | str) -> str:
    """``--train-data`` value: a pattern string as is, a list joined with ``::``."""
    if isinstance(train_data, (str, os.PathLike)):
        return str(train_data)
    paths = [str(Path(p)) for p in train_data]
    if not paths:
        raise BootstrapError("no training shards given")
    return "::".join(paths)


def build_train_argv(
    *,
    model: str,
    train_data: Sequence[Path | str] | str,
    n_samples: int,
    batch_size: int,
    epochs: int,
    lr: float,
    warmup: int,
    workers: int,
    precision: str,
    seed: int,
    logs: Path,
    name: str,
    device: str = "cpu",
    pretrained: str | None = None,
    save_frequency: int = 0,
    log_every_n_steps: int = 1,
    wd: float = 0.2,
    beta1: float = 0.9,
    beta2: float = 0.98,
    eps: float = 1e-6,
    extra: Sequence[str] = (),
) -> list[str]:
    """Arguments of ``open_clip_train.main`` for contrastive training on webdataset tars.

    ``model`` is an open_clip model name (registered architecture, or
    ``local-dir:/path`` whose folder holds only ``open_clip_config.json`` to
    train from scratch).  ``save_frequency=0`` saves only the final epoch.
    AdamW betas/eps are passed explicitly: open_clip_train otherwise picks them
    from whether the model *name* contains "vit", which a ``local-dir:`` path
    does not.  Zero-shot and validation are off (evaluation is its own asset).
    """
    argv = [
        "--model", model,
        "--train-data", train_data_arg(train_data),
        "--dataset-type", "webdataset",
        "--train-num-samples", str(int(n_samples)),
        "--batch-size", str(int(batch_size)),
        "--epochs", str(int(epochs)),
        "--lr", repr(float(lr)),
        "--wd", repr(float(wd)),
        "--beta1", repr(float(beta1)),
        "--beta2", repr(float(beta2)),
        "--eps", repr(float(eps)),
        "--warmup", str(int(warmup)),
        "--workers", str(int(workers)),
        "--precision", precision,
        "--seed", str(int(seed)),
        "--logs", str(logs),
        "--name", name,
        "--device", device,
        "--save-frequency", str(int(save_frequency)),
        "--log-every-n-steps", str(int(log_every_n_steps)),
        "--report-to", "none",
        "--zeroshot-frequency", "0",
        "--val-frequency", "0",
    ]
    if pretrained:
        argv += ["--pretrained", pretrained]
    return argv + list(extra)


def run_open_clip_train(
    argv: Sequence[str],
    *,
    threads: int = 0,
    stdout_path: Path,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    tail: Callable[[TrainRun], str] | None = None,
) -> TrainRun:
    """Run ``open_clip_train.main`` on ``argv`` in a subprocess (through the launcher).

    ``prefix`` goes between the interpreter and the launcher (e.g. ``-m
    torch.distributed.run --standalone --nproc_per_node N`` for several GPUs);
    ``tail`` picks the part of the output a failure report shows.
    stdout/stderr go to ``stdout_path``.  Raises ``BootstrapError`` with the
    output's tail when it fails or times out.
    """
    argv = list(argv)
    logs, name = Path(_arg(argv, "--logs")), _arg(argv, "--name")
    run_dir = logs / name
    cmd = [sys.executable, *prefix, "-m", LAUNCHER_MODULE, "--threads", str(int(threads)), "--", *argv]
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env.setdefault("WANDB_MODE", "disabled")
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            child_env[var] = str(int(threads))
    # the launcher must import this package even when it is not installed
    pkg_root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, child_env.get("PYTHONPATH", "")) if p)
    stdout_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cpu0 = _children_cpu()
    with open(stdout_path, "wb") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env, timeout=timeout_s, check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    seconds = time.perf_counter() - start
    cpu_seconds = _children_cpu() - cpu0
    epochs = int(_arg(argv, "--epochs"))
    ckpt = run_dir / "checkpoints" / f"epoch_{epochs}.pt"
    run = TrainRun(argv, rc, seconds, cpu_seconds, run_dir, run_dir / "out.log", stdout_path, ckpt if ckpt.is_file() else None)
    if rc != 0 or run.checkpoint is None:
        why = f"timed out after {timeout_s:.0f} s" if rc == -9 else f"exit status {rc}"
        if rc == 0:
            why = f"no final checkpoint {ckpt}"
        what = "torchrun open_clip_train" if prefix else "open_clip_train"
        raise BootstrapError(f"{what} failed ({why}); last output:\n{(tail or TrainRun.tail)(run)}")
    return run


def _children_cpu() -> float:
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return 0.0


def _arg(argv: Sequence[str], flag: str) -> str:
    try:
        return argv[list(argv).index(flag) + 1]
    except (ValueError, IndexError):
        raise BootstrapError(f"open_clip_train arguments lack {flag}") from None


_LOG_RE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<seen>\d+)/(?P<total>\d+) \(\s*\d+%\)\].*?"
    r"Logit Scale: [-\d.]+ (?P<losses>.*)$"
)
_LOSS_RE = re.compile(r"(?P<name>\w+): (?P<val>[-+\d.eE]+|nan|inf) \([^)]*\)")


def parse_loss_curve(log_path: Path, batch_size: int) -> list[LossPoint]:
    """The (step, loss) points of an ``open_clip_train`` log (``out.log``).

    ``batch_size`` is the global batch (per-device batch × devices × accum).
    The loss of a point is the total ``Loss`` when logged, else the sum of the
    named losses (``Contrastive_loss`` for CLIP).
    """
    points: list[LossPoint] = []
    if not Path(log_path).is_file():
        return points
    for line in Path(log_path).read_text(errors="replace").splitlines():
        m = _LOG_RE.search(line)
        if not m:
            continue
        losses = {lm["name"].lower(): float(lm["val"]) for lm in _LOSS_RE.finditer(m["losses"])}
        if not losses:
            continue
        loss = losses["loss"] if "loss" in losses else sum(losses.values())
        epoch, seen, total = int(m["epoch"]), int(m["seen"]), int(m["total"])
        per_epoch = max(1, round(total / batch_size))
        step = epoch * per_epoch + max(1, round(seen / batch_size))
        points.append(LossPoint(step=step, loss=loss, epoch=epoch))
    return points


# ---------------------------------------------------------------------------
# the bootstrap encoder


def _shard_sizes(shards: Sequence[Path]) -> list[int] | None:
    """Per-shard sample counts from ``sizes.json`` beside the shards, when present."""
    sizes: list[int] = []
    cache: dict[Path, dict[str, int]] = {}
    for s in shards:
        f = s.parent / "sizes.json"
        if f not in cache:
            if not f.is_file():
                return None
            try:
                cache[f] = {k: int(v) for k, v in json.loads(f.read_text()).items()}
            except (ValueError, OSError):
                return None
        if s.name not in cache[f]:
            return None
        sizes.append(cache[f][s.name])
    return sizes


def plan_workers(shards: Sequence[Path], n_samples: int, batch_size: int, workers: int) -> int:
    """Loader workers that open_clip_train can use on these shards.

    open_clip_train splits *shards* between workers and each worker must fill
    at least one batch from its share (else its epoch never ends); it also
    asserts shards >= workers.  Returns the largest workable count <= ``workers``.
    """
    if n_samples < batch_size:
        raise BootstrapError(
            f"the training set has {n_samples} samples, fewer than one batch of {batch_size}: "
            "lower encoder.bootstrap.batch_size (or give it more samples)"
        )
    sizes = _shard_sizes(shards)
    w = max(0, min(workers, len(shards)))
    while w > 1:
        share = sorted(sizes)[: len(shards) // w] if sizes else None
        if share is None or sum(share) >= batch_size:
            break
        w -= 1
    if sizes is not None and w <= 1 and sum(sizes) < batch_size:
        raise BootstrapError(f"the training shards hold {sum(sizes)} samples, fewer than one batch of {batch_size}")
    return w


def train_bootstrap(
    train_shards: list[Path],
    n_samples: int,
    out_dir: Path,
    settings: BootstrapSettings,
    device: str,
    logs_dir: Path,
    tmp_root: Path,
    *,
    threads: int = 0,
    precision: str | None = None,
    timeout_s: float | None = None,
    log_every_n_steps: int = 1,
    source: str = "reference",
) -> BootstrapResult:
    """Train ``settings.model`` from scratch with ``open_clip_train`` on ``train_shards``.

    Writes ``out_dir`` atomically as an open_clip ``local-dir:`` folder
    (``open_clip_config.json`` + ``open_clip_model.safetensors`` +
    ``bootstrap.json`` describing the run) and the training log, its
    parameters and loss curve under ``logs_dir``.  ``device`` is auto/cpu/cuda;
    precision defaults to fp32 on CPU and amp_bf16 on CUDA.  ``source`` says
    what the shards are (``reference`` or ``pool``), recorded in bootstrap.json.
    ``threads`` is the trainer's torch intra-op thread count; 0 picks the
    available cores minus the loader workers (at least 1), which keeps the
    decode workers from fighting the trainer for cores.  Weights are
    bit-identical only for the same thread count (recorded in bootstrap.json).
    """
    start = time.perf_counter()
    shards = [Path(s).resolve() for s in train_shards]
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise BootstrapError(f"bootstrap training shards missing: {missing or 'none given'}")
    dev = resolve_device(device)
    precision = precision or ("amp_bf16" if dev.startswith("cuda") else "fp32")
    workers = plan_workers(shards, n_samples, settings.batch_size, settings.workers)
    if threads <= 0:
        threads = max(1, available_cores() - workers)
    model_cfg = model_config(settings.model)
    preprocess_cfg = default_preprocess_cfg(model_cfg)
    with scratch_dir(Path(tmp_root), "bootstrap-") as scratch_s:
        scratch = Path(scratch_s)
        arch_dir = write_config_dir(scratch / "arch", model_cfg, preprocess_cfg)
        model_arg = LOCAL_DIR + str(arch_dir)
        if "coca" in model_arg.lower():  # open_clip_train picks CoCa's loss from the model name
            raise BootstrapError(f"the temp folder path {arch_dir} contains 'coca', which open_clip_train misreads")
        argv = build_train_argv(
            model=model_arg,
            train_data=shards,
            n_samples=n_samples,
            batch_size=settings.batch_size,
            epochs=settings.epochs,
            lr=settings.lr,
            warmup=settings.warmup,
            workers=workers,
            precision=precision,
            seed=settings.seed,
            logs=scratch / "logs",
            name=RUN_NAME,
            device=dev,
            log_every_n_steps=log_every_n_steps,
        )
        run = run_open_clip_train(argv, threads=threads, stdout_path=scratch / "stdout.log", timeout_s=timeout_s)
        curve = parse_loss_curve(run.log_path, settings.batch_size)
        steps_per_epoch = math.ceil(n_samples / settings.batch_size)
        if workers > 1:
            steps_per_epoch = math.ceil(steps_per_epoch / workers) * workers
        info = {
            "architecture": settings.model,
            "settings": settings.model_dump(mode="json"),
            "source": source,
            "shards": [str(s) for s in shards],
            "n_samples": n_samples,
            "device": dev,
            "precision": precision,
            "threads": threads,
            "workers": workers,
            "steps": steps_per_epoch * settings.epochs,
            "first_loss": curve[0].loss if curve else None,
            "final_loss": curve[-1].loss if curve else None,
            "train_seconds": round(run.seconds, 3),
            "train_cpu_seconds": round(run.cpu_seconds, 3),
        }
        assert run.checkpoint is not None
        export_checkpoint(
            run.checkpoint, Path(out_dir), model_cfg, preprocess_cfg, tmp_root=Path(tmp_root),
            extra_files={"bootstrap.json": json.dumps(info, indent=2, sort_keys=True) + "\n"},
        )
        logs_dir = Path(logs_dir)
        log_copy: Path | None = None
        if run.log_path.is_file():
            log_copy = logs_dir / "out.log"
            write_bytes(log_copy, run.log_path.read_bytes(), tmp_root=Path(tmp_root))
        params = run.run_dir / "params.txt"
        if params.is_file():
            write_bytes(logs_dir / "params.txt", params.read_bytes(), tmp_root=Path(tmp_root))
        write_json(logs_dir / "loss_curve.json", {"columns": ["step", "loss", "epoch"], "points": [list(p) for p in curve]}, tmp_root=Path(tmp_root))
    out_dir = Path(out_dir)
    return BootstrapResult(
        out_dir=out_dir,
        model_name=LOCAL_DIR + str(out_dir.resolve()),
        weights_hash=weights_hash(out_dir),
        loss_curve=curve,
        seconds=time.perf_counter() - start,
        train_seconds=run.seconds,
        train_cpu_seconds=run.cpu_seconds,
        n_samples=n_samples,
        epochs=settings.epochs,
        steps=info["steps"],
        device=dev,
        precision=precision,
        argv=argv,
        log_path=log_copy,
        info=info,
    )


# ---------------------------------------------------------------------------
# the launcher (runs in the training subprocess)


def _seed_sample_shuffle(seed: int) -> None:
    """Make open_clip_train's sample shuffle buffer deterministic.

    open_clip_train calls ``webdataset.shuffle(bufsize, initial)``, whose RNG
    is seeded from pid and clock.  Replace it with a stage seeded by
    (seed, DataLoader worker id, pass number in that worker).
    """
    import random

    import webdataset as wds
    from torch.utils.data import get_worker_info
    from webdataset import filters

    class SeededShuffle(wds.PipelineStage):
        def __init__(self, bufsize: int = 1000, initial: int = 100, **_: Any) -> None:
            self.bufsize, self.initial, self.passes = bufsize, initial, 0

        def run(self, src: Any) -> Any:
            info = get_worker_info()
            rng = random.Random(f"dbprune-shuffle:{seed}:{info.id if info else 0}:{self.passes}")
            self.passes += 1
            return filters._shuffle(src, self.bufsize, self.initial, rng)

    wds.shuffle = SeededShuffle  # type: ignore[assignment]
    filters.shuffle = SeededShuffle  # type: ignore[assignment]


def _launch(args: list[str]) -> int:
    threads = 0
    if args[:1] == ["--threads"]:
        threads, args = int(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from dbprune_assets.core.encoders import register_model_configs

    register_model_configs()
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
    _seed_sample_shuffle(seed)
    from open_clip_train.main import main

    rc = main(args)
    return 0 if rc in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
