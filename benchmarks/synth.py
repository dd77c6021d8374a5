"""Synthetic embedding shards shared by the benchmarks.

``<work>/shards/NNNNN.emb.npy`` (float16 unit vectors, d = :data:`D`) and
``NNNNN.uid.npy`` (32-hex uids, ``S32``), plus whatever a benchmark adds
beside them (``NNNNN.<what>.npy``).  Importing this module also puts the
repository root on ``sys.path``, so a benchmark run as a script imports
``dbprune_assets`` from the checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

D = 512


def shard_path(work: Path, name: str, what: str) -> Path:
    """``work/shards/<name>.<what>.npy``."""
    return work / "shards" / f"{name}.{what}.npy"


def shard_names(work: Path) -> list[str]:
    return sorted(p.name[: -len(".emb.npy")] for p in (work / "shards").glob("*.emb.npy"))


def save_shard(work: Path, index: int, x: np.ndarray, rng: np.random.Generator) -> None:
    """Write shard ``index`` (name ``NNNNN``): ``x`` as float16 and random 32-hex uids."""
    name = f"{index:05d}"
    shard_path(work, name, "emb").parent.mkdir(parents=True, exist_ok=True)
    np.save(shard_path(work, name, "emb"), x.astype(np.float16))
    uid = rng.integers(0, 2**63, size=(len(x), 2), dtype=np.uint64)
    np.save(shard_path(work, name, "uid"), np.array([f"{h:016x}{l:016x}" for h, l in uid.tolist()], dtype="S32"))
