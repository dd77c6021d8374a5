"""Per-strategy CLIP training with the real ``open_clip_train`` at equal compute.

``train_clip`` trains ``TrainSettings.model`` from scratch on one strategy's
exported subset (``subsets/<strategy>/``, a brace pattern of webdataset tars)
by running ``open_clip_train.main`` in a subprocess, through the runner of
:mod:`dbprune_assets.core.models.oc_train` (which registers the project's model
configs and seeds open_clip_train's sample-shuffle buffer).  Several GPUs are
used through ``torchrun --nproc_per_node N`` when ``n_gpus > 1``.  The method
and the reasons for the choices below are in docs/design.md.

Equal compute
-------------
Every strategy sees the same number of samples, whatever its subset size, as
DataComp trains its subsets: sampling *with replacement*
(``--dataset-resampled``) with a fixed number of steps.  open_clip_train runs,
per epoch, ``ceil(ceil(N / G) / W) * W`` steps for ``--train-num-samples N``,
global batch ``G`` (per-device batch x devices) and ``W`` loader workers, so
:func:`plan_training` picks

* total steps ``S`` = the multiple of ``max(1, W) x epochs`` nearest to
  ``samples_seen / G`` (at least one such multiple); ``epochs`` defaults to 1:
  with resampling an "epoch" is only a checkpoint interval, not a pass over
  the subset (DataComp uses 8 for its checkpoints),
* ``--train-num-samples`` = ``(S / epochs) * G`` (per epoch), which open_clip_train
  turns back into exactly ``S / epochs`` steps,

from ``samples_seen``, the batch, the workers and the device count only, never
from the subset size.  The samples actually seen (``S x G``) are recorded and
checked against the steps open_clip_train logged.  The sample profile's
20 000 samples at batch 128 give 156 steps = 19 968 samples for every strategy.

DataComp scales
---------------
``train.scale`` (:mod:`dbprune_assets.core.models.scales`) sets the model, global
batch, learning rate, samples seen, warmup and AdamW beta2 to DataComp's
values for that scale; they reach open_clip_train as ``--model``,
``--batch-size`` (per device), ``--lr``, ``--train-num-samples`` (through the
plan above), ``--warmup`` and ``--beta2``.  ``train_result.json`` records the
scale, and a note names every value the settings changed from it (such a run
is not comparable with that scale's leaderboard).  DataComp's small scale
plans 3124 steps x 4096 = 12 795 904 samples with 4 workers (the nearest
multiple of the workers to 3125).

Where things land
-----------------
``out_dir`` (the caller passes ``models/<strategy>/seed<k>/``) becomes an
open_clip ``local-dir:`` folder, atomically: ``open_clip_config.json``
(``{"model_cfg", "preprocess_cfg"}``), ``open_clip_model.safetensors`` and
``train_result.json`` (steps, global batch, samples seen, seconds,
samples/s, the loss curve, the argv).  The run of the first of
``settings.train_seeds`` is also published as the strategy's canonical model
in the parent folder ``models/<strategy>/`` (the same three files, hard-linked
when possible, each replaced atomically), so
``open_clip.create_model_and_transforms("local-dir:models/<strategy>")`` loads
it; the other seeds stay in their ``seed<k>/`` sub-folders, and a
``CANONICAL`` file names the seed folder it came from.  ``logs_dir`` gets
open_clip_train's ``out.log``, ``params.txt``, ``stdout.log`` and
``loss_curve.json``.

Determinism and speed
---------------------
On CPU the same subset, seed, worker count and thread count give bit-identical
weights (the launcher seeds the sample shuffle; measured: two runs, same final
loss and zero-shot accuracy to the last digit).  Without ``threads`` the run
takes the cores the loader workers leave
(:func:`dbprune_assets.core.running.device.auto_threads`): on a 2-core machine torch's
default of 2 threads beside a decoding worker measured ~9x slower steps
(oversubscription).  Under torchrun every rank shuffles its own resampled
shard stream; the launcher's shuffle seed does not include the rank.

torch and open_clip are imported inside functions (cheap module import).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbprune_assets.core.store.atomic import atomic_path, write_bytes
from dbprune_assets.core.running.device import auto_threads, cuda_device_count, torch_device
from dbprune_assets.core.models.model_dir import CONFIG_FILE, LOCAL_DIR, WEIGHTS_FILE, weights_hash
from dbprune_assets.core.models.oc_train import (
    LossPoint,
    OpenClipTrainError,
    ScratchModel,
    TrainRun,
    build_train_argv,
    curve_json,
    parse_loss_curve,
    run_open_clip_train,
    training_scratch,
)
from dbprune_assets.core.models.scales import deviations
from dbprune_assets.core.settings import TrainSettings

RESULT_FILE = "train_result.json"
#: files that make up a published model folder (the canonical copy gets these)
MODEL_FILES: tuple[str, ...] = (WEIGHTS_FILE, CONFIG_FILE, RESULT_FILE)


class TrainError(RuntimeError):
    """Training a per-strategy model failed; the message carries the log's tail."""


# ---------------------------------------------------------------------------
# the plan: equal samples seen for every strategy


@dataclass(frozen=True)
class TrainPlan:
    """How many steps, epochs and samples per epoch give ``samples_seen``."""

    requested_samples_seen: int
    per_device_batch: int
    world_size: int
    workers: int
    steps: int
    epochs: int

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.steps // self.epochs

    @property
    def samples_per_epoch(self) -> int:
        """``--train-num-samples``."""
        return self.steps_per_epoch * self.global_batch

    @property
    def samples_seen(self) -> int:
        return self.steps * self.global_batch

    def open_clip_train_steps(self) -> int:
        """The steps open_clip_train will run for this plan (its own formula)."""
        g = self.global_batch
        w = max(1, self.workers)
        per_epoch = math.ceil(math.ceil(self.samples_per_epoch / g) / w) * w
        return per_epoch * self.epochs


def plan_training(samples_seen: int, batch_size: int, workers: int, world_size: int = 1, epochs: int = 1) -> TrainPlan:
    """Steps and epochs that make ``steps x global batch`` as close to
    ``samples_seen`` as open_clip_train allows; depends on nothing else (in
    particular not on the subset size), so every strategy gets the same plan.

    ``batch_size`` is the global batch; with ``world_size`` devices each gets
    ``ceil(batch_size / world_size)`` (so the global batch is rounded up to a
    multiple of the device count).  ``workers`` are loader workers per device.
    """
    if samples_seen <= 0 or batch_size <= 0 or world_size <= 0 or epochs <= 0 or workers < 0:
        raise ValueError(
            f"plan_training: samples_seen={samples_seen}, batch_size={batch_size}, world_size={world_size}, "
            f"epochs={epochs} must be > 0 and workers={workers} >= 0"
        )
    per_device = -(-batch_size // world_size)
    g = per_device * world_size
    unit = max(1, workers) * epochs
    units = max(1, int(math.floor(samples_seen / (g * unit) + 0.5)))
    plan = TrainPlan(samples_seen, per_device, world_size, workers, units * unit, epochs)
    assert plan.open_clip_train_steps() == plan.steps
    return plan


# ---------------------------------------------------------------------------
# the result


@dataclass
class TrainResult:
    """What :func:`train_clip` did; ``to_json()`` is ``train_result.json``."""

    out_dir: Path
    model_name: str  # "local-dir:<out_dir>"
    canonical_dir: Path | None  # models/<strategy>/ when this run was published there
    architecture: str
    scale: str | None  # DataComp's scale named by train.scale (its values may be overridden: see notes)
    seed: int
    n_samples: int  # the subset's size (samples available, not samples seen)
    steps: int
    epochs: int
    steps_per_epoch: int
    per_device_batch: int
    global_batch: int
    world_size: int
    workers: int
    samples_seen: int  # steps x global batch: equal for every strategy
    requested_samples_seen: int
    seconds: float  # the open_clip_train subprocess (start-up included)
    total_seconds: float  # the whole call (plus checkpoint conversion, copies)
    samples_per_s: float  # samples_seen / seconds
    device: str
    precision: str
    threads: int
    weights_hash: str
    loss_curve: list[LossPoint]
    argv: list[str]
    command: list[str]
    log_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def first_loss(self) -> float | None:
        return self.loss_curve[0].loss if self.loss_curve else None

    @property
    def final_loss(self) -> float | None:
        return self.loss_curve[-1].loss if self.loss_curve else None

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "scale": self.scale,
            "seed": self.seed,
            "n_samples": self.n_samples,
            "steps": self.steps,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "per_device_batch": self.per_device_batch,
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "workers": self.workers,
            "samples_seen": self.samples_seen,
            "requested_samples_seen": self.requested_samples_seen,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 2),
            "device": self.device,
            "precision": self.precision,
            "threads": self.threads,
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "loss_curve": curve_json(self.loss_curve),
            "argv": list(self.argv),
            "command": list(self.command),
            "notes": list(self.notes),
        }

    def metadata(self) -> dict[str, Any]:
        """Flat, JSON-able summary (asset metadata)."""
        d = self.to_json()
        d.pop("loss_curve")
        d.pop("command")
        d["argv"] = " ".join(self.argv)
        d["out_dir"] = str(self.out_dir)
        d["canonical_dir"] = str(self.canonical_dir) if self.canonical_dir else None
        d["weights_hash"] = self.weights_hash
        d["total_seconds"] = round(self.total_seconds, 3)
        return d


def read_train_result(model_dir: Path) -> dict[str, Any]:
    """``train_result.json`` of a trained model folder (seed folder or canonical)."""
    path = Path(model_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training result; materialise trained_model first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------
# training


def train_clip(
    train_data: str,
    n_samples: int,
    out_dir: Path,
    settings: TrainSettings,
    seed: int,
    device: str,
    logs_dir: Path,
    tmp_root: Path,
    n_gpus: int = 0,
    *,
    threads: int = 0,
    epochs: int = 1,
    log_every_n_steps: int = 1,
    timeout_s: float | None = None,
    canonical: bool | None = None,
) -> TrainResult:
    """Train ``settings.model`` from scratch on ``train_data`` with open_clip_train.

    ``train_data`` is the brace pattern of the subset's tars and ``n_samples``
    its size (:func:`dbprune_assets.core.store.export.train_data_spec`).  The run
    sees :func:`plan_training`'s samples (``settings.samples_seen`` rounded to
    whole steps), sampled with replacement.  ``device`` is auto/cpu/cuda; on
    CPU the precision is fp32 whatever ``settings.precision`` says.  With
    ``n_gpus > 1`` (CUDA) the run uses ``torchrun --nproc_per_node n_gpus`` and
    ``settings.batch_size`` stays the *global* batch.  ``threads`` > 0 fixes
    torch's CPU threads in the subprocess (determinism).

    ``canonical``: also publish the model as ``out_dir.parent`` (the strategy's
    folder); ``None`` = when ``out_dir`` is named ``seed<seed>`` and ``seed`` is
    the first of ``settings.train_seeds``.  Raises :class:`TrainError` with the
    tail of open_clip_train's output when it fails.
    """
    start = time.perf_counter()
    out_dir, logs_dir, tmp_root = Path(out_dir), Path(logs_dir), Path(tmp_root)
    if not train_data:
        raise TrainError("train_clip: no training data (empty pattern)")
    if n_samples <= 0:
        raise TrainError(f"train_clip: the subset {train_data} is empty; there is nothing to train on")
    dev = torch_device(device)
    world = int(n_gpus) if n_gpus and n_gpus > 1 else 1
    if world > 1:
        if not dev.startswith("cuda"):
            raise TrainError(f"train_clip: n_gpus={n_gpus} needs CUDA, the device is {dev}")
        if cuda_device_count() < world:
            raise TrainError(f"train_clip: n_gpus={n_gpus} but only {cuda_device_count()} CUDA devices are visible")
    return _train(
        train_data, n_samples, out_dir, settings, seed, dev, logs_dir, tmp_root, world,
        threads=threads, epochs=epochs, log_every_n_steps=log_every_n_steps, timeout_s=timeout_s,
        canonical=canonical, start=start,
    )


@dataclass(frozen=True)
class _RunSetup:
    """How one training runs: the device, ``nproc`` processes, torch's CPU
    threads, the precision, the plan, and notes on what differs from the
    settings."""

    dev: str
    nproc: int
    threads: int
    precision: str
    plan: TrainPlan
    notes: list[str]


def _run_setup(settings: TrainSettings, dev: str, nproc: int, threads: int, epochs: int, n_samples: int) -> _RunSetup:
    """Threads (0: the cores the loader workers leave, on CPU), precision (fp32
    off CUDA) and :func:`plan_training`'s plan, with a note for each value
    that differs from the settings or makes the run unusual."""
    notes: list[str] = []
    if threads <= 0 and not dev.startswith("cuda"):
        threads = auto_threads(settings.workers, processes=nproc)
    precision = settings.precision
    if not dev.startswith("cuda") and precision != "fp32":
        notes.append(f"precision {precision} requested; fp32 used on {dev}")
        precision = "fp32"
    plan = plan_training(settings.samples_seen, settings.batch_size, settings.workers, nproc, epochs)
    if plan.global_batch != settings.batch_size:
        notes.append(f"global batch {settings.batch_size} rounded up to {plan.global_batch} for {nproc} devices")
    if plan.samples_seen != settings.samples_seen:
        notes.append(
            f"samples seen {plan.samples_seen} = {plan.steps} steps x {plan.global_batch} "
            f"(requested {settings.samples_seen}, rounded to whole steps)"
        )
    if n_samples < plan.global_batch:
        notes.append(f"the subset holds {n_samples} samples, fewer than one batch of {plan.global_batch}: batches repeat samples")
    if settings.warmup >= plan.steps:
        notes.append(f"warmup {settings.warmup} >= {plan.steps} steps: the learning rate never reaches {settings.lr}")
    if settings.scale is not None and (changed := deviations(settings.model_dump())):
        notes.append(f"train.scale {settings.scale}, but {', '.join(changed)}: not comparable with DataComp's "
                     f"{settings.scale} leaderboard")
    return _RunSetup(dev, nproc, threads, precision, plan, notes)


def _run_training(train_data: str, settings: TrainSettings, seed: int, setup: _RunSetup, staged: ScratchModel,
                  log_every_n_steps: int, timeout_s: float | None) -> tuple[TrainRun, list[str], list[LossPoint]]:
    """Run open_clip_train in the scratch folder ``staged`` as ``setup``
    plans; returns the run, its argv and its loss curve.  TrainError when it
    fails or logs another number of steps than the plan."""
    plan = setup.plan
    argv = build_train_argv(
        model=staged.model_arg, train_data=str(train_data), n_samples=plan.samples_per_epoch,
        batch_size=plan.per_device_batch, epochs=plan.epochs, lr=settings.lr, warmup=settings.warmup,
        beta2=settings.beta2, workers=settings.workers, precision=setup.precision, seed=seed, logs=staged.logs,
        device=setup.dev, save_frequency=0, log_every_n_steps=log_every_n_steps, extra=["--dataset-resampled"],
    )
    try:
        run = run_open_clip_train(argv, threads=setup.threads, stdout_path=staged.stdout_path, timeout_s=timeout_s,
                                  nproc=setup.nproc)
    except OpenClipTrainError as err:
        raise TrainError(f"training {settings.model} (seed {seed}) on {train_data} failed: {err}") from err
    curve = parse_loss_curve(run.log_path, plan.global_batch)
    logged_steps = curve[-1].step if curve else 0
    if logged_steps != plan.steps:
        raise TrainError(
            f"open_clip_train logged {logged_steps} steps, the plan was {plan.steps} "
            f"({plan.epochs} epochs x {plan.steps_per_epoch}); last output:\n{run.tail()}"
        )
    return run, argv, curve


def _new_result(out_dir: Path, settings: TrainSettings, seed: int, n_samples: int, setup: _RunSetup, run: TrainRun,
                argv: list[str], curve: list[LossPoint]) -> TrainResult:
    """The result of a finished run (weights hash, canonical folder and total
    time filled in later)."""
    plan = setup.plan
    return TrainResult(
        out_dir=out_dir,
        model_name=LOCAL_DIR + str(out_dir.resolve()),
        canonical_dir=None,
        architecture=settings.model,
        scale=settings.scale,
        seed=int(seed),
        n_samples=int(n_samples),
        steps=plan.steps,
        epochs=plan.epochs,
        steps_per_epoch=plan.steps_per_epoch,
        per_device_batch=plan.per_device_batch,
        global_batch=plan.global_batch,
        world_size=setup.nproc,
        workers=settings.workers,
        samples_seen=plan.samples_seen,
        requested_samples_seen=settings.samples_seen,
        seconds=run.seconds,
        total_seconds=0.0,
        samples_per_s=plan.samples_seen / run.seconds if run.seconds > 0 else float("nan"),
        device=setup.dev,
        precision=setup.precision,
        threads=int(setup.threads),
        weights_hash="",
        loss_curve=curve,
        argv=list(argv),
        command=[str(c) for c in run.command],
        notes=setup.notes,
    )


def _train(
    train_data: str,
    n_samples: int,
    out_dir: Path,
    settings: TrainSettings,
    seed: int,
    dev: str,
    logs_dir: Path,
    tmp_root: Path,
    nproc: int,
    *,
    threads: int,
    epochs: int,
    log_every_n_steps: int,
    timeout_s: float | None,
    canonical: bool | None,
    start: float,
) -> TrainResult:
    """``train_clip`` after the checks; ``nproc`` processes (torchrun when > 1;
    open_clip_train's DDP wrapper needs CUDA devices then)."""
    setup = _run_setup(settings, dev, nproc, threads, epochs, n_samples)
    with training_scratch(settings.model, tmp_root, "train-") as staged:
        run, argv, curve = _run_training(train_data, settings, seed, setup, staged, log_every_n_steps, timeout_s)
        result = _new_result(out_dir, settings, seed, n_samples, setup, run, argv, curve)
        # argv paths point into the scratch folder, which is removed: record them as they ran
        staged.export(run, out_dir, tmp_root, {RESULT_FILE: result.to_json()})
        log_copy = run.keep_logs(logs_dir, curve, tmp_root)
    result.log_path = log_copy
    result.weights_hash = weights_hash(out_dir)
    if canonical is None:
        canonical = out_dir.name == f"seed{seed}" and int(seed) == int(settings.train_seeds[0])
    if canonical:
        result.canonical_dir = publish_canonical(out_dir, out_dir.parent, tmp_root)
    result.total_seconds = time.perf_counter() - start
    return result


def publish_canonical(seed_dir: Path, strategy_dir: Path, tmp_root: Path) -> Path:
    """Make ``strategy_dir`` (``models/<strategy>/``) an open_clip folder holding
    the model of ``seed_dir``: its weights, config and ``train_result.json``,
    each hard-linked (copied across file systems) and renamed into place; the
    weights first, so the folder never pairs a config with missing weights."""
    seed_dir, strategy_dir = Path(seed_dir), Path(strategy_dir)
    strategy_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        src = seed_dir / name
        if not src.is_file():
            raise TrainError(f"{src}: missing; cannot publish {seed_dir} as {strategy_dir}")
        with atomic_path(strategy_dir / name, tmp_root) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
    write_bytes(strategy_dir / "CANONICAL", f"{seed_dir.name}\n".encode(), tmp_root=tmp_root)
    return strategy_dir

