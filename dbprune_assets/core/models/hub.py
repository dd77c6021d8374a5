"""The Hugging Face Hub, for encoders named by a pretrained tag or ``hf-hub:`` id.

Without network access nothing can be downloaded: a quick probe
(:func:`hub_offline_when_unreachable`) switches the Hub client offline when it
cannot be reached, so cached weights are served at once and anything else
fails at once instead of retrying for tens of seconds per file.

huggingface_hub and open_clip are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check that the Hugging Face endpoint can be reached (a proxy counts as yes)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub is an open_clip dependency
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_when_unreachable() -> Iterator[bool]:
    """Switch huggingface_hub to offline mode while the Hub cannot be reached.

    Offline, ``hf_hub_download`` serves cached files at once (or fails at once)
    instead of retrying for tens of seconds per file.  Yields whether offline.
    """
    try:
        from huggingface_hub import constants
    except Exception:  # pragma: no cover
        yield False
        return
    if constants.HF_HUB_OFFLINE:
        yield True
        return
    if _hub_reachable():
        yield False
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False


def hf_weights_path(model_id: str) -> Path | None:
    """The cached weight file of an hf-hub model (after open_clip fetched it)."""
    try:
        import open_clip

        return Path(open_clip.pretrained.download_pretrained_from_hf(model_id))
    except Exception:  # noqa: BLE001
        return None
