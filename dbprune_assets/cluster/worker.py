"""``dbprune worker``: a Celery worker that executes dbprune runs (the task of
:func:`~dbprune_assets.cluster.launcher.make_app`) from queue ``gpu``,
``cpu`` or both, one run at a time by default."""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

from dbprune_assets.cluster.instance import (ENV_BROKER, ENV_POSTGRES, ClusterError, backend_url, check_config,
                                             check_reachable, enabled, mask_url)
from dbprune_assets.cluster.launcher import make_app
from dbprune_assets.cluster.tags import CPU, GPU, QUEUES

Echo = Callable[[str], None]


def default_queues() -> list[str]:
    """Both queues where torch sees a GPU, ``cpu`` otherwise (NVML's count:
    the worker process initialises no CUDA before it forks its pool)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return [GPU, CPU] if torch.cuda.is_available() else [CPU]


def worker_argv(queues: list[str], concurrency: int, name: str | None, loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments of ``dbprune worker``."""
    node = name if name and "@" in name else f"{name or f'dbprune-{os.getpid()}'}@%h"
    return ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--hostname", node,
            "--prefetch-multiplier", "1", "-O", "fair", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def run_worker(queues: list[str] | None, concurrency: int = 1, name: str | None = None, loglevel: str = "INFO",
               echo: Echo = print) -> int:
    """``dbprune worker``: a Celery worker executing dbprune runs from ``queues``."""
    if not enabled():
        raise ClusterError(f"dbprune worker needs {ENV_BROKER} (redis://host:6379/0) and {ENV_POSTGRES} "
                           "(postgresql://user:password@host:5432/database), the same on every machine")
    check_config()
    check_reachable()
    bad = [q for q in queues or [] if q not in QUEUES]
    if bad:
        raise ClusterError(f"--queue {bad[0]}: dbprune has queues {', '.join(QUEUES)}")
    if concurrency < 1:
        raise ClusterError(f"--concurrency {concurrency}: at least 1 run at a time")
    chosen = list(dict.fromkeys(queues)) if queues else default_queues()
    # loaded once here, before the pool processes fork: a run pays no import
    import dbprune_assets.definitions  # noqa: F401

    if GPU in chosen:
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA before the fork
        import open_clip  # noqa: F401
        import torch  # noqa: F401

    broker = os.environ[ENV_BROKER].strip()
    app = make_app(broker, backend_url())
    argv = worker_argv(chosen, concurrency, name, loglevel)
    echo(f"dbprune: worker {argv[argv.index('--hostname') + 1].replace('%h', socket.gethostname())} serves "
         f"queue(s) {', '.join(chosen)}, {concurrency} run(s) at a time; broker {mask_url(broker)}, "
         f"instance {mask_url(os.environ[ENV_POSTGRES])}")
    sys.stdout.flush()
    app.worker_main(argv)
    return 0
