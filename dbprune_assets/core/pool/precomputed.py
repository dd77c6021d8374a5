"""Moved: the precomputed embedding sources are ``core/pool/sources/``
(``datacomp.py``, ``clip_retrieval.py``), and the pool-kind questions below
are :mod:`dbprune_assets.core.pool.poolkind`'s.  This module keeps the names
callers import from here."""

from dbprune_assets.core.pool.poolkind import NEEDS_IMAGES, is_metadata_only  # noqa: F401  (re-exported)
