"""What reaches the console during ``dbprune run``: dbprune's own lines.

The libraries the steps call speak on their own: open_clip warns on Python's
root logger (``No pretrained weights loaded for model 'dbprune-tiny'``, once
per model it builds, and the first such call would make the root logger print
to stderr), CLIP_benchmark and open_clip_train draw tqdm bars.  Without ``-v``
their log records go to ``$DBPRUNE_HOME/logs/libraries.log`` and their bars
are off: in this process tqdm's default becomes ``disable=True`` (tqdm reads
``TQDM_DISABLE`` only when it is imported), in the training subprocesses
``TQDM_DISABLE`` says the same; dbprune's own bars pass ``disable`` explicitly
and are not affected.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Iterator

#: the file library log records go to, under the home
LIBRARY_LOG = Path("logs") / "libraries.log"


@contextlib.contextmanager
def quiet_libraries(home: Path, verbose: bool) -> Iterator[Path | None]:
    """Within the block, route the root logger's records to the home's library
    log and turn library progress bars off; ``verbose``: change nothing.
    Yields the log's path (None when verbose)."""
    if verbose:
        yield None
        return
    path = Path(home) / LIBRARY_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]  # a basicConfig made earlier
    for h in consoles:
        root.removeHandler(h)
    root.addHandler(handler)
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    from tqdm import std

    bar_init = std.tqdm.__init__
    std.tqdm.__init__ = functools.partialmethod(bar_init, disable=True)  # type: ignore[method-assign]
    try:
        yield path
    finally:
        std.tqdm.__init__ = bar_init  # type: ignore[method-assign]
        root.removeHandler(handler)
        handler.close()
        for h in consoles:
            root.addHandler(h)
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
