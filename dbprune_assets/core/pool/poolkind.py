"""What kind of pool a folder holds: the generated sample pool (images), the
generated DataComp-format pool, a user's DataComp metadata pool, or other;
and which of its shards are DataComp metadata shards (no images).

The generators (``samplepool/``) write ``pool_info.json`` with their
``generator`` name; the automatic profile choice (``core/settings/loading.py``)
reads it here, so settings need not import the generators (which import
settings).
The embedding sources (``core/pool/sources/``) ask the same questions of a
pool (``DataCompSource.detect`` is :func:`looks_like_datacomp`).
"""

from __future__ import annotations

import json
from pathlib import Path

#: ``generator`` of the image sample pool's ``pool_info.json``
GENERATOR = "dbprune.sample_pool"
#: ``generator`` of the DataComp-format sample pool's ``pool_info.json``
DATACOMP_GENERATOR = "dbprune.sample_pool.datacomp"


def generator_of(pool_dir: Path) -> str | None:
    """The ``generator`` named in ``pool_dir/pool_info.json``, if any."""
    try:
        value = json.loads((Path(pool_dir) / "pool_info.json").read_text()).get("generator")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def is_sample_pool(pool_dir: Path) -> bool:
    """True when ``pool_dir`` holds a pool written by the image sample pool generator."""
    return generator_of(pool_dir) == GENERATOR


def is_datacomp_pool(pool_dir: Path) -> bool:
    """True when ``pool_dir`` holds a pool written by the DataComp-format generator."""
    return generator_of(pool_dir) == DATACOMP_GENERATOR


def looks_like_datacomp(pool: Path) -> bool:
    """A pool of DataComp metadata shards: an npz beside a parquet and no tar."""
    return any(p.with_suffix(".parquet").is_file() for p in pool.glob("*.npz")) and not any(pool.glob("*.tar"))


def is_datacomp_shard(pool: Path, shard: str) -> bool:
    """A DataComp metadata shard: ``<shard>.npz`` beside its parquet, no ``<shard>.tar`` (no images)."""
    return (pool / f"{shard}.npz").is_file() and not (pool / f"{shard}.tar").exists()


def is_metadata_only(pool: Path, shards: list[str]) -> bool:
    """Whether the pool has no images at all: DataComp metadata shards (an npz
    beside the parquet) and no tar (a metadata shard whose npz is missing is
    still one of them)."""
    return (bool(shards) and not any((pool / f"{s}.tar").exists() for s in shards)
            and any((pool / f"{s}.npz").is_file() for s in shards))


#: the example-image metadata of a pool without images (nothing to draw, nothing wrong)
NO_EXAMPLES = "none: the pool is DataComp metadata without images"

#: what the training stages say on a pool without images
NEEDS_IMAGES = (
    "the pool is DataComp metadata without images, so there is nothing to train on: the subsets are "
    "subsets/<strategy>/uids.npy. Download the images with img2dataset (DataComp's download_upstream.py does it "
    "for the whole pool), then make each subset's shards with DataComp's resharder.py --subset-file "
    "subsets/<strategy>/uids.npy, and train on those")
