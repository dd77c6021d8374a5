"""Every embedding source by name: ``embeddings.source`` picks one here.

The pipeline gets its source with ``get(settings.embeddings.source)`` and asks
it what to do (``base.py``); adding a source is a module beside this one with
an :class:`~.base.EmbeddingSource` subclass and one ``register`` line below.
"""

from __future__ import annotations

from pathlib import Path

from dbprune_assets.core.pool.sources.base import EmbeddingSource
from dbprune_assets.core.pool.sources.clip_retrieval import ClipRetrievalSource
from dbprune_assets.core.pool.sources.compute import ComputeSource
from dbprune_assets.core.pool.sources.datacomp import DataCompSource
from dbprune_assets.core.settings import PipelineSettings, SettingsError

_SOURCES: dict[str, EmbeddingSource] = {}


def register(source: EmbeddingSource) -> EmbeddingSource:
    """Make ``source`` the one ``embeddings.source: <source.name>`` picks; a
    name already taken by another source is an error."""
    held = _SOURCES.get(source.name)
    if held is not None and held is not source:
        raise ValueError(f"embedding source {source.name!r} is registered already ({type(held).__name__}); "
                         "unregister it first or choose another name")
    _SOURCES[source.name] = source
    return source


def unregister(name: str) -> None:
    """Forget the source named ``name`` (tests that register a toy source)."""
    _SOURCES.pop(name, None)


def names() -> list[str]:
    """The registered sources' names, in registration order."""
    return list(_SOURCES)


def get(name: str) -> EmbeddingSource:
    """The source ``embeddings.source: name`` picks; an unknown name is a
    ``ValueError`` naming the registered ones."""
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(f"embeddings.source is {name!r}, which is no embedding source; the registered ones are "
                         f"{', '.join(names())}") from None


def check_setting(settings: PipelineSettings) -> None:
    """The ``embeddings.source`` check every run makes before it starts (the
    settings cannot make it themselves: the sources read the settings), as a
    :class:`~dbprune_assets.core.settings.SettingsError` naming the setting."""
    if settings.embeddings.source not in _SOURCES:
        raise SettingsError(f"embeddings.source: {settings.embeddings.source!r} is no embedding source; allowed: "
                            f"{', '.join(names())} (a new source is a module under core/pool/sources/ and a line in "
                            "its registry.py)")


def detect(pool: Path) -> str | None:
    """The name of the first registered source that recognises ``pool`` as its
    own kind (:meth:`~.base.EmbeddingSource.detect`), else None."""
    return next((name for name, source in _SOURCES.items() if source.detect(pool)), None)


register(ComputeSource())
register(DataCompSource())
register(ClipRetrievalSource())
