"""Model folders: open_clip ``local-dir:`` folders on disk.

A model folder holds ``open_clip_config.json`` (``{"model_cfg",
"preprocess_cfg"}``) beside one weight file (``open_clip_model.safetensors``
when this package writes it); ``open_clip.create_model_and_transforms(
"local-dir:" + folder)`` loads it without this package.  A folder with the
config alone is what ``open_clip_train`` trains from scratch (open_clip builds
a randomly initialised model from it).  This module writes such folders
(atomically), converts ``open_clip_train`` checkpoints into them, finds the
weight file open_clip would load and hashes it: the hash of the weight file's
bytes is an encoder's data version (see docs/design.md).

torch, safetensors and open_clip are imported inside the functions, so
importing this module stays cheap (the Dagster code location imports it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbprune_assets.core.store.atomic import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the model-name prefix open_clip reads a model folder from
LOCAL_DIR = "local-dir:"
#: file names of a model folder written by this package
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
#: weight files open_clip looks for in a folder, most preferred first (as ``open_clip.factory``)
WEIGHT_FILE_ORDER: tuple[str, ...] = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


class ModelDirError(RuntimeError):
    """A model folder or weight file is missing, or a checkpoint does not fit its config."""


def default_preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's default preprocessing for an architecture (size from its vision config)."""
    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size is not None:
        cfg["size"] = size
    return _jsonable(cfg)


def weights_in_dir(folder: Path) -> Path | None:
    """The weight file open_clip would load from a model folder (None when it has none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name in WEIGHT_FILE_ORDER:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))
    found.sort(key=lambda p: p.suffix != ".safetensors")
    return found[0] if found else None


def weights_path(path_or_dir: str | os.PathLike[str]) -> Path:
    """A weight file itself, or the one open_clip would pick in a folder."""
    p = Path(path_or_dir)
    if p.is_dir():
        w = weights_in_dir(p)
        if w is None:
            raise ModelDirError(f"no weight file in {p} (expected one of {', '.join(WEIGHT_FILE_ORDER[:3])})")
        return w
    if not p.is_file():
        raise ModelDirError(f"weights {p} do not exist")
    return p


def weights_hash(path_or_dir: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 (hex) of the weight file's bytes, streamed; a folder hashes its open_clip weight file."""
    h = hashlib.sha256()
    with open(weights_path(path_or_dir), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """Tuples to lists, recursively (what the config looks like after a JSON round trip)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_config_dir(
    folder: Path, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None
) -> Path:
    """Write ``open_clip_config.json`` alone into ``folder`` (created).

    ``open_clip.create_model("local-dir:" + folder)`` then builds a randomly
    initialised model (what ``open_clip_train`` trains from scratch) and
    ``open_clip.get_tokenizer`` picks the tokenizer from the text config.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": _jsonable(model_cfg), "preprocess_cfg": _jsonable(preprocess_cfg or default_preprocess_cfg(model_cfg))}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def _save_state_dict(state_dict: dict[str, "torch.Tensor"], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses shared storage: store a copy
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


def save_local_dir(
    out_dir: Path,
    state_dict: dict[str, "torch.Tensor"] | Any,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any] | None = None,
    tmp_root: Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save weights as a model folder, atomically.

    ``state_dict`` is a state dict or a model (its ``state_dict()``); the folder
    gets ``open_clip_config.json`` and ``open_clip_model.safetensors`` (and any
    ``extra_files`` as text) and loads with
    ``open_clip.create_model_and_transforms("local-dir:" + str(out_dir))``.
    Returns ``out_dir``.
    """
    if hasattr(state_dict, "state_dict"):
        if preprocess_cfg is None:
            preprocess_cfg = getattr(getattr(state_dict, "visual", None), "preprocess_cfg", None)
        state_dict = state_dict.state_dict()
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    out_dir = Path(out_dir)
    with atomic_path(out_dir, tmp_root) as tmp:
        write_config_dir(tmp, model_cfg, preprocess_cfg)
        _save_state_dict(state_dict, tmp / WEIGHTS_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any] | None = None,
    tmp_root: Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Convert an ``open_clip_train`` checkpoint (``epoch_N.pt``) to a model folder.

    The state dict is loaded into a freshly built model first (strict), so a
    checkpoint that does not fit ``model_cfg`` fails here, not at first use.
    """
    import torch
    from open_clip.factory import load_state_dict
    from open_clip.model import CLIP, CustomTextCLIP

    sd = load_state_dict(str(checkpoint), device="cpu", weights_only=True)
    cfg = json.loads(json.dumps(model_cfg))
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    model = (CustomTextCLIP if custom else CLIP)(**cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"checkpoint {checkpoint} does not fit the model config: {e}") from e
    with torch.no_grad():
        return save_local_dir(out_dir, model.state_dict(), model_cfg, preprocess_cfg, tmp_root, extra_files)

