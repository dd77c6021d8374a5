"""What kind of pool a folder holds: the generated sample pool (images), the
generated DataComp-format pool, a user's DataComp metadata pool, or other.

The generators (``samplepool/``) write ``pool_info.json`` with their
``generator`` name; the automatic profile choice (``core/settings.py``) reads
it here, so settings need not import the generators (which import settings).
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
