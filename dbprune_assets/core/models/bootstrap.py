"""The bootstrap encoder: a small CLIP trained with the real ``open_clip_train``.

Without pretrained weights (offline), the pipeline trains ``dbprune-tiny`` on
the sample pool's clean ``reference/`` split (or, for a user pool without one,
on the pool itself) and uses it as cluster and score encoder (see
docs/design.md).  Training goes through the open_clip_train runner of
:mod:`dbprune_assets.core.models.oc_train` (seeded sample shuffle, fixed threads: on
CPU the same seed, shards, thread count and worker count give bit-identical
weights); the final checkpoint is written to ``out_dir`` as an open_clip
``local-dir:`` folder (config + ``open_clip_model.safetensors`` +
``bootstrap.json`` describing the run).

torch and open_clip are imported inside the functions (cheap module import).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dbprune_assets.core.running.device import auto_threads, torch_device
from dbprune_assets.core.models.model_dir import LOCAL_DIR, weights_hash
from dbprune_assets.core.models.oc_train import (
    LossPoint,
    OpenClipTrainError,
    TrainRun,
    build_train_argv,
    parse_loss_curve,
    run_open_clip_train,
    training_scratch,
)
from dbprune_assets.core.settings import BootstrapSettings


class BootstrapError(RuntimeError):
    """Training the bootstrap encoder failed."""


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
    ``bootstrap.json`` describing the run) and open_clip_train's log, its
    parameters, its output and the loss curve under ``logs_dir``.  ``device`` is auto/cpu/cuda;
    precision defaults to fp32 on CPU and amp_bf16 on CUDA.  ``source`` says
    what the shards are (``reference`` or ``pool``), recorded in bootstrap.json.
    ``threads`` is the trainer's torch intra-op thread count; 0 picks the
    available cores minus the loader workers (at least 1), which keeps the
    decode workers from fighting the trainer for cores.  Weights are
    bit-identical only for the same thread count (recorded in bootstrap.json).
    """
    start = time.perf_counter()
    shards = _existing_shards(train_shards)
    dev = torch_device(device)
    precision = precision or ("amp_bf16" if dev.startswith("cuda") else "fp32")
    workers = plan_workers(shards, n_samples, settings.batch_size, settings.workers)
    threads = threads if threads > 0 else auto_threads(workers)
    with training_scratch(settings.model, tmp_root, "bootstrap-") as staged:
        argv = build_train_argv(
            model=staged.model_arg, train_data=shards, n_samples=n_samples, batch_size=settings.batch_size,
            epochs=settings.epochs, lr=settings.lr, warmup=settings.warmup, workers=workers, precision=precision,
            seed=settings.seed, logs=staged.logs, device=dev, log_every_n_steps=log_every_n_steps,
        )
        try:
            run = run_open_clip_train(argv, threads=threads, stdout_path=staged.stdout_path, timeout_s=timeout_s)
        except OpenClipTrainError as err:
            raise BootstrapError(f"training the bootstrap encoder ({settings.model}) failed: {err}") from err
        curve = parse_loss_curve(run.log_path, settings.batch_size)
        info = {
            "architecture": settings.model,
            "settings": settings.model_dump(mode="json"),
            "source": source,
            "shards": [str(s) for s in shards],
            "n_samples": n_samples,
            **_run_info(run, curve, dev, precision, threads, workers,
                        _planned_steps(n_samples, settings.batch_size, workers, settings.epochs)),
        }
        out_dir = staged.export(run, out_dir, tmp_root, {"bootstrap.json": info})
        log_copy = run.keep_logs(logs_dir, curve, tmp_root)
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


def _existing_shards(train_shards: Sequence[Path]) -> list[Path]:
    """The training shards as absolute paths; BootstrapError when none is given or one is missing."""
    shards = [Path(s).resolve() for s in train_shards]
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise BootstrapError(f"bootstrap training shards missing: {missing or 'none given'}")
    return shards


def _run_info(run: TrainRun, curve: list[LossPoint], dev: str, precision: str, threads: int, workers: int,
              steps: int) -> dict[str, Any]:
    """How the run went, for ``bootstrap.json``: device, precision, threads,
    workers, steps, first and final loss, wall-clock and CPU seconds."""
    return {
        "device": dev,
        "precision": precision,
        "threads": threads,
        "workers": workers,
        "steps": steps,
        "first_loss": curve[0].loss if curve else None,
        "final_loss": curve[-1].loss if curve else None,
        "train_seconds": round(run.seconds, 3),
        "train_cpu_seconds": round(run.cpu_seconds, 3),
    }


def _planned_steps(n_samples: int, batch_size: int, workers: int, epochs: int) -> int:
    """The steps open_clip_train runs: per epoch, the batches of ``n_samples``
    rounded up to a multiple of the loader workers."""
    steps_per_epoch = math.ceil(n_samples / batch_size)
    if workers > 1:
        steps_per_epoch = math.ceil(steps_per_epoch / workers) * workers
    return steps_per_epoch * epochs
