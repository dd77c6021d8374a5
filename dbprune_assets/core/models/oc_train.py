"""The open_clip_train runner: train an open_clip model from scratch in a subprocess.

Both the bootstrap encoder (:mod:`dbprune_assets.core.models.bootstrap`) and the
per-strategy models (:mod:`dbprune_assets.core.models.train`) train with the real
``open_clip_train``, through this module:

* :func:`training_scratch` stages the architecture in a scratch folder: a
  model folder holding only ``open_clip_config.json``, passed as ``--model
  local-dir:<folder>``, from which open_clip builds a randomly initialised
  model and ``get_tokenizer`` reads the text config;
* :func:`build_train_argv` writes open_clip_train's arguments;
* :func:`run_open_clip_train` runs ``python -m dbprune_assets.core.models.oc_train
  [--threads N] -- ARGV`` (behind ``torchrun --nproc_per_node N`` for several
  GPUs) and reports a failure with the tail of its output;
* :meth:`ScratchModel.export` turns the final checkpoint into a model folder
  and :meth:`TrainRun.keep_logs` keeps the log, the parameters and the loss
  curve (:func:`parse_loss_curve`).

The launcher (this module's ``__main__``, run in the subprocess) registers the
project's model configs, makes open_clip_train's sample shuffle seeded, sets
the trainer's threads and hands ``argv`` to ``open_clip_train.main``
unchanged.

Determinism: given ``--seed``, the same shards, device, thread count and
worker count give bit-identical weights on CPU.  open_clip_train seeds
torch/numpy/random (model init, the DataLoader worker seeds, hence the
augmentation) and its shard shuffle, but draws its sample-shuffle buffer RNG
from the clock; the launcher replaces that with one seeded by (seed, worker,
pass).  CPU kernels are deterministic for a fixed number of intra-op threads
(``threads`` sets ``torch.set_num_threads`` and OMP/MKL_NUM_THREADS in the
subprocess); another thread count can change float summation order, hence the
last bits.  On CUDA open_clip_train enables cudnn.benchmark and TF32, so GPU
runs are repeatable only approximately.  Under torchrun every rank shuffles
its own stream; the shuffle seed does not include the rank.  Training
progress is open_clip_train's own log (``out.log``).  See docs/design.md.

torch and open_clip are imported inside the functions (cheap module import).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from dbprune_assets.core.store.atomic import scratch_dir, write_bytes, write_json
from dbprune_assets.core.models.encoders import model_config
from dbprune_assets.core.models.model_dir import LOCAL_DIR, default_preprocess_cfg, export_checkpoint, write_config_dir

LAUNCHER_MODULE = "dbprune_assets.core.models.oc_train"
RUN_NAME = "train"
#: open_clip_train's files a run keeps in its logs folder
KEPT_LOGS: tuple[str, ...] = ("out.log", "params.txt", "stdout.log")


class OpenClipTrainError(RuntimeError):
    """An open_clip_train run could not be set up, failed or timed out."""


class LossPoint(NamedTuple):
    """One logged training step; unpacks as ``(step, loss, epoch)``."""

    step: int  # optimiser steps done (1-based, over all epochs)
    loss: float  # the logged loss of that step (total loss; not the running average)
    epoch: int


def curve_json(curve: Sequence[LossPoint]) -> dict[str, Any]:
    """A loss curve as JSON (``loss_curve.json``, ``train_result.json``)."""
    return {"columns": ["step", "loss", "epoch"], "points": [list(p) for p in curve]}


@dataclass
class TrainRun:
    """What one ``open_clip_train`` subprocess left behind (in a scratch folder)."""

    argv: list[str]
    command: list[str]  # the whole command line that ran
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

    def keep_logs(self, logs_dir: Path, curve: Sequence[LossPoint], tmp_root: Path) -> Path | None:
        """Copy the run's ``out.log``, ``params.txt`` and ``stdout.log`` into
        ``logs_dir`` and write ``loss_curve.json`` there; returns the kept ``out.log``."""
        sources = {"out.log": self.log_path, "params.txt": self.run_dir / "params.txt", "stdout.log": self.stdout_path}
        for name in KEPT_LOGS:
            if sources[name].is_file():
                write_bytes(Path(logs_dir) / name, sources[name].read_bytes(), tmp_root=tmp_root)
        write_json(Path(logs_dir) / "loss_curve.json", curve_json(curve), tmp_root=tmp_root)
        return Path(logs_dir) / "out.log" if self.log_path.is_file() else None


# ---------------------------------------------------------------------------
# the scratch folder: the architecture to train, logs, output


@dataclass(frozen=True)
class ScratchModel:
    """An architecture staged for training from scratch in a scratch folder:
    ``model_arg`` is ``--model`` (``local-dir:`` of a folder holding only the
    config), ``logs`` is ``--logs`` (open_clip_train writes ``<logs>/<name>/``),
    ``stdout_path`` takes the subprocess' output."""

    architecture: str
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    model_arg: str
    logs: Path
    stdout_path: Path

    def export(self, run: TrainRun, out_dir: Path, tmp_root: Path, extra_files: dict[str, dict[str, Any]]) -> Path:
        """The run's final checkpoint as a model folder ``out_dir`` (atomically),
        with ``extra_files`` written beside the weights as JSON."""
        assert run.checkpoint is not None  # run_open_clip_train raised otherwise
        texts = {name: json.dumps(data, indent=2, sort_keys=True) + "\n" for name, data in extra_files.items()}
        return export_checkpoint(run.checkpoint, Path(out_dir), self.model_cfg, self.preprocess_cfg,
                                 tmp_root=Path(tmp_root), extra_files=texts)


@contextlib.contextmanager
def training_scratch(architecture: str, tmp_root: Path, prefix: str) -> Iterator[ScratchModel]:
    """A scratch folder under ``tmp_root`` (removed afterwards) with
    ``architecture``'s config staged for open_clip_train."""
    model_cfg = model_config(architecture)
    preprocess_cfg = default_preprocess_cfg(model_cfg)
    with scratch_dir(Path(tmp_root), prefix) as scratch_s:
        scratch = Path(scratch_s)
        arch_dir = write_config_dir(scratch / "arch", model_cfg, preprocess_cfg)
        if "coca" in str(arch_dir).lower():  # open_clip_train picks CoCa's loss from the model name
            raise OpenClipTrainError(f"the temp folder path {arch_dir} contains 'coca', which open_clip_train misreads")
        yield ScratchModel(architecture, model_cfg, preprocess_cfg, LOCAL_DIR + str(arch_dir),
                           scratch / "logs", scratch / "stdout.log")


# ---------------------------------------------------------------------------
# argv, subprocess, log parsing


def train_data_arg(train_data: Sequence[Path | str] | str) -> str:
    """``--train-data`` value: a pattern string as is, a list joined with ``::``."""
    if isinstance(train_data, (str, os.PathLike)):
        return str(train_data)
    paths = [str(Path(p)) for p in train_data]
    if not paths:
        raise OpenClipTrainError("no training shards given")
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
    name: str = RUN_NAME,
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


def launcher_command(argv: Sequence[str], threads: int = 0, nproc: int = 1) -> list[str]:
    """The command line that runs open_clip_train on ``argv`` through the launcher;
    with ``nproc > 1`` behind ``torchrun --standalone --nproc_per_node nproc`` (one node)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}"] if nproc > 1 else []
    return [sys.executable, *torchrun, "-m", LAUNCHER_MODULE, "--threads", str(int(threads)), "--", *argv]


def run_open_clip_train(
    argv: Sequence[str],
    *,
    threads: int = 0,
    stdout_path: Path,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    nproc: int = 1,
) -> TrainRun:
    """Run ``open_clip_train.main`` on ``argv`` in a subprocess (through the launcher).

    ``nproc > 1`` runs that many processes under torchrun (open_clip_train's
    DDP wrapper needs as many CUDA devices).  ``threads`` > 0 fixes the
    trainer's CPU threads.  stdout/stderr go to ``stdout_path``.  Raises
    :class:`OpenClipTrainError` with the output's tail (the failing rank's
    lines under torchrun) when it fails, times out or leaves no final checkpoint.
    """
    argv = list(argv)
    run_dir = Path(_arg(argv, "--logs")) / _arg(argv, "--name")
    cmd = launcher_command(argv, threads, nproc)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env.setdefault("WANDB_MODE", "disabled")
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            child_env[var] = str(int(threads))
    # the launcher must import this package even when it is not installed
    pkg_root = str(Path(__file__).resolve().parents[3])
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
    ckpt = run_dir / "checkpoints" / f"epoch_{int(_arg(argv, '--epochs'))}.pt"
    run = TrainRun(argv, cmd, rc, seconds, cpu_seconds, run_dir, run_dir / "out.log", stdout_path,
                   ckpt if ckpt.is_file() else None)
    if rc != 0 or run.checkpoint is None:
        why = f"timed out after {timeout_s:.0f} s" if rc == -9 else f"exit status {rc}"
        if rc == 0:
            why = f"no final checkpoint {ckpt}"
        what = "torchrun open_clip_train" if nproc > 1 else "open_clip_train"
        tail: Callable[[TrainRun], str] = _torchrun_tail if nproc > 1 else TrainRun.tail
        raise OpenClipTrainError(f"{what} failed ({why}); last output:\n{tail(run)}")
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
        raise OpenClipTrainError(f"open_clip_train arguments lack {flag}") from None


def _torchrun_tail(run: TrainRun, n_rank: int = 30, n_last: int = 8) -> str:
    """The workers' own last lines (torchrun prefixes them ``[rankN]:``) and then
    torchrun's summary; its traceback alone would hide the cause."""
    if not run.stdout_path.is_file():
        return run.tail()
    lines = run.stdout_path.read_text(errors="replace").splitlines()
    ranked = [ln for ln in lines if ln.startswith("[rank")]
    first = next((ln.split("]:", 1)[0] for ln in ranked if "Error" in ln), None)
    if first is not None:
        ranked = [ln for ln in ranked if ln.startswith(first + "]:")]
        last_err = max(i for i, ln in enumerate(ranked) if "Error" in ln)
        ranked = ranked[: last_err + 1]
    return "\n".join(ranked[-n_rank:] + ["..."] + lines[-n_last:])


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
    """``[--threads N] [--] ARGV``: open_clip_train on ARGV with the project's
    model configs, a seeded sample shuffle and N torch threads (0 = torch's default)."""
    threads = 0
    if args[:1] == ["--threads"]:
        threads, args = int(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    from dbprune_assets.core.running.device import torch_threads
    from dbprune_assets.core.models.encoders import register_model_configs

    register_model_configs()
    _seed_sample_shuffle(int(args[args.index("--seed") + 1]) if "--seed" in args else 0)
    from open_clip_train.main import main

    with torch_threads(threads):
        rc = main(args)
    return 0 if rc in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
