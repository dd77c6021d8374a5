"""Shards in parallel inside one step: a bounded pool of threads, results in
shard order.

A per-shard step (ingest, both assignment steps, stored embeddings) hands its
per-shard work to :func:`ordered_map` and keeps everything else (commit
markers, metadata, log lines, progress) on the calling thread, in shard
order, so a step's outputs are those of a one-at-a-time run byte for byte.
Threads, not processes: the work is parquet, numpy, faiss and image decoding,
which release the GIL, and threads need no fork (a Celery pool process may
not have children; a run may be executed in one).  At most ``parallel``
shards are in work and one more is held by the caller, so memory is bounded
by ``parallel + 1`` shards' working sets, whatever the pool's size.

``compute.parallel_shards``: ``auto`` (the cores this process may use), or a
number; :func:`shard_threads` shares ``compute.threads`` among the shards in
work, so faiss never runs more threads than there are cores.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from dbprune_assets.core.running.device import available_cores

T = TypeVar("T")
R = TypeVar("R")


def resolve_parallel(setting: int | str, shards: int, cores: int | None = None) -> int:
    """Shards in work at once for ``compute.parallel_shards`` (``auto``: the
    ``cores`` this process may use), never more than the step's ``shards``, at least 1."""
    wanted = (cores if cores is not None else available_cores()) if setting == "auto" else int(setting)
    return max(1, min(wanted, shards))


def shard_threads(threads: int, parallel: int, cores: int | None = None) -> int:
    """Compute threads for each of ``parallel`` shards in work: ``compute.threads``
    (0: the ``cores`` this process may use) shared among them, at least 1."""
    if parallel <= 1:
        return threads  # one shard at a time: the setting as it is (0 still means auto below)
    total = threads if threads > 0 else (cores if cores is not None else available_cores())
    return max(1, total // parallel)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], parallel: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for each of ``items``, in their order, with at most
    ``parallel`` calls of ``fn`` running at once (in threads; ``parallel`` 1:
    in the calling thread, one after another).  The first exception, in item
    order, is raised; the calls not started are cancelled and those running
    are waited for, so no thread outlives the step."""
    if parallel <= 1:
        for item in items:
            yield item, fn(item)
        return
    source = iter(items)
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="dbprune-shard") as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= parallel:
                    break
            while pending:
                item, future = pending.popleft()
                result = future.result()
                for nxt in source:  # one in, one out: never more than `parallel` in work
                    pending.append((nxt, pool.submit(fn, nxt)))
                    break
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()
