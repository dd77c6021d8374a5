"""Encoders: resolve an encoder setting and load it with open_clip.

An encoder setting (``EncoderSpec``) names one of

* an open_clip architecture with a pretrained tag
  (``model: ViT-B-32, pretrained: laion2b_s34b_b79k``),
* an architecture with a local checkpoint (``pretrained: /path/ckpt.pt`` or
  ``.safetensors`` / ``.bin``; a state dict, or an ``open_clip_train``
  checkpoint with a ``state_dict`` entry),
* a Hugging Face Hub model (``model: hf-hub:ORG/REPO``),
* an open_clip folder (``model: local-dir:/path``: ``open_clip_config.json``
  holding ``{"model_cfg", "preprocess_cfg"}`` beside the weights
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
* ``bootstrap``: the small CLIP that ``core.models.bootstrap`` trains, saved as such a
  folder at ``Layout.encoder_dir``.

Without network access nothing can be downloaded: weights already in the
Hugging Face / open_clip cache are used (a quick probe switches the Hub client
offline when it cannot be reached: :mod:`dbprune_assets.core.models.hub`),
anything else raises ``EncoderError``
naming the setting to change.  Model folders themselves (writing, weight
files, the weights hash that is the encoder asset's data version) are
:mod:`dbprune_assets.core.models.model_dir`; the device is chosen by
:mod:`dbprune_assets.core.running.device`.  See docs/design.md.

torch and open_clip are imported inside the functions, so importing this
module stays cheap (the Dagster code location imports it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from dbprune_assets.core.models.hub import hf_weights_path, hub_offline_when_unreachable
from dbprune_assets.core.models.model_dir import CONFIG_FILE, LOCAL_DIR, WEIGHT_FILE_ORDER, weights_hash, weights_in_dir
from dbprune_assets.core.running.device import torch_device
from dbprune_assets.core.settings import EncoderSpec

#: the project's own open_clip architecture configs (``dbprune-tiny``)
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "model_configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
HF_HUB = "hf-hub:"

Kind = Literal["bootstrap", "local-dir", "hf-hub", "tag", "checkpoint"]


class EncoderError(RuntimeError):
    """An encoder cannot be resolved or loaded; the message names the setting to change."""


# ---------------------------------------------------------------------------
# registry


_REGISTERED = False


def register_model_configs() -> None:
    """Make the project's architectures (``dbprune-tiny``) known to open_clip.

    Idempotent; call before ``open_clip.create_model*`` / ``get_tokenizer`` with
    one of these names (``load_encoder`` and the training launcher do).
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import open_clip
    from open_clip import factory

    if MODEL_CONFIG_DIR not in [Path(p) for p in factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    _REGISTERED = True


def model_config(name: str) -> dict[str, Any]:
    """The open_clip model config of a registered architecture (a copy)."""
    register_model_configs()
    import open_clip

    cfg = open_clip.get_model_config(name.replace("/", "-"))
    if cfg is None:
        raise EncoderError(f"unknown open_clip architecture {name!r}; known: {_some(open_clip.list_models())}")
    return cfg


# ---------------------------------------------------------------------------
# resolution


@dataclass(frozen=True)
class ResolvedEncoder:
    """Where an encoder comes from, in the terms ``open_clip.create_model`` takes.

    ``model_name`` is what open_clip gets as its model name (an architecture,
    ``hf-hub:ORG/REPO`` or ``local-dir:/abs/path``) and ``pretrained`` its
    ``pretrained`` argument (a tag, a checkpoint path, or None).
    """

    kind: Kind
    model_name: str
    pretrained: str | None
    setting: str = "encoder.cluster_encoder"
    #: the local weight file when known without fetching anything
    weights_path: Path | None = None

    @property
    def name(self) -> str:
        """A short human-readable name (logs, metadata, errors)."""
        if self.kind == "bootstrap":
            return f"bootstrap ({self.model_name})"
        if self.kind == "tag":
            return f"{self.model_name}/{self.pretrained}"
        if self.kind == "checkpoint":
            return f"{self.model_name} @ {self.pretrained}"
        return self.model_name

    @property
    def local_dir(self) -> Path | None:
        if self.model_name.startswith(LOCAL_DIR):
            return Path(self.model_name[len(LOCAL_DIR):])
        return None

    def identity(self) -> dict[str, Any]:
        """JSON-able description (for fingerprints and asset metadata)."""
        return {"kind": self.kind, "model": self.model_name, "pretrained": self.pretrained}


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or value.startswith(("~", "."))
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _model_folder(model: str) -> Path | None:
    """The model folder a ``model`` setting names (``local-dir:/path`` or a
    folder path), else None."""
    if model.startswith(LOCAL_DIR):
        return Path(model[len(LOCAL_DIR):]).expanduser()
    if _looks_like_path(model) and Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    return None


def _some(names: list[str], n: int = 12) -> str:
    names = list(names)
    more = f", … ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def resolve_encoder(spec: EncoderSpec, bootstrap_dir: Path, *, setting: str = "encoder.cluster_encoder") -> ResolvedEncoder:
    """Turn an encoder setting into an open_clip model name + pretrained source.

    Checks what can be checked without loading: the architecture is known,
    the tag exists for it, a checkpoint path or ``local-dir:`` folder exists.
    ``setting`` is the settings path of ``spec`` (``encoder.cluster_encoder`` or
    ``encoder.score_encoder``), used in error messages.
    """
    model = spec.model.strip()
    pretrained = spec.pretrained.strip() if spec.pretrained else None
    if spec.is_bootstrap:
        if pretrained:
            raise EncoderError(
                f"{setting}.pretrained must be null when {setting}.model is 'bootstrap' "
                f"(got {pretrained!r}); to use a checkpoint set {setting}.model to its architecture"
            )
        folder = Path(bootstrap_dir).expanduser().resolve()
        return ResolvedEncoder("bootstrap", LOCAL_DIR + str(folder), None, setting, weights_in_dir(folder))

    if model.startswith(HF_HUB):
        if pretrained:
            raise EncoderError(
                f"{setting}.pretrained must be null when {setting}.model is an hf-hub id "
                f"(open_clip takes the weights from the repository); got {pretrained!r}"
            )
        if not model[len(HF_HUB):].strip("/"):
            raise EncoderError(f"{setting}.model: empty id after 'hf-hub:'; expected 'hf-hub:ORG/REPO'")
        return ResolvedEncoder("hf-hub", model, None, setting)

    schema_dir = _model_folder(model)
    if schema_dir is not None:
        schema_dir = schema_dir.resolve()
        if pretrained:
            raise EncoderError(
                f"{setting}.pretrained must be null when {setting}.model is an open_clip folder ({schema_dir}); "
                "the weights are taken from the folder"
            )
        if not (schema_dir / CONFIG_FILE).is_file():
            raise EncoderError(
                f"{setting}.model: {schema_dir} is not an open_clip folder (no {CONFIG_FILE}); "
                "set model: bootstrap or a local checkpoint path"
            )
        return ResolvedEncoder("local-dir", LOCAL_DIR + str(schema_dir), None, setting, weights_in_dir(schema_dir))

    register_model_configs()
    import open_clip

    arch = model.replace("/", "-")
    if open_clip.get_model_config(arch) is None:
        raise EncoderError(
            f"{setting}.model: unknown open_clip architecture {model!r} (known: {_some(open_clip.list_models())}); "
            "or use 'hf-hub:ORG/REPO', 'local-dir:/path', or set model: bootstrap"
        )
    if not pretrained:
        raise EncoderError(
            f"{setting}.pretrained is not set: {model} would be randomly initialised. Set a pretrained tag "
            f"(known for {model}: {_some(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}), "
            f"a local checkpoint path, or set {setting}.model: bootstrap"
        )
    if os.path.isfile(pretrained) or _looks_like_path(pretrained):
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            raise EncoderError(
                f"{setting}.pretrained: checkpoint {path} does not exist; "
                "set it to an existing checkpoint file or set model: bootstrap"
            )
        return ResolvedEncoder("checkpoint", arch, str(path), setting, path)
    if not open_clip.get_pretrained_cfg(arch, pretrained):
        raise EncoderError(
            f"{setting}.pretrained: {pretrained!r} is neither a known open_clip tag for {model} "
            f"(known: {_some(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}) nor an existing file; "
            f"set {setting}.pretrained to a tag or a local checkpoint path, or set {setting}.model: bootstrap"
        )
    return ResolvedEncoder("tag", arch, pretrained, setting)


def local_source_files(spec: EncoderSpec) -> list[Path]:
    """The local files an encoder setting takes its weights from, found without
    loading anything: an open_clip folder's config and weight file, or a
    checkpoint file.  None for ``bootstrap`` (the encoder asset makes it),
    pretrained tags and ``hf-hub:`` ids.  Their signatures are part of the
    encoder's fingerprint, so replacing a checkpoint in place is noticed."""
    if spec.is_bootstrap:
        return []
    folder = _model_folder(spec.model.strip())
    if folder is not None:
        weights = weights_in_dir(folder)
        return [folder / CONFIG_FILE] + ([weights] if weights is not None else [])
    p = spec.pretrained.strip() if spec.pretrained else None
    if p and (os.path.isfile(p) or _looks_like_path(p)):
        return [Path(p).expanduser()]
    return []


# ---------------------------------------------------------------------------
# loading


@dataclass
class LoadedEncoder:
    """An open_clip model ready to embed: eval mode, no grads."""

    model: Any  # open_clip CLIP / CustomTextCLIP
    preprocess: Callable[[Any], Any]  # PIL image -> CHW float tensor
    tokenizer: Callable[..., Any]  # list[str] -> LongTensor [n, context_length]
    embed_dim: int
    name: str
    device: str
    resolved: ResolvedEncoder
    #: the weight file the model was loaded from (None when unknown)
    weights_path: Path | None = None
    _hash: str | None = field(default=None, repr=False)

    def to(self, device: str) -> "LoadedEncoder":
        """Move the model to ``device`` (in place) and return self."""
        device = torch_device(device)
        if device != self.device:
            self.model.to(device)
            self.device = device
        return self

    def weights_hash(self) -> str | None:
        """sha256 of the weight file (cached); None when the file is unknown."""
        if self._hash is None and self.weights_path is not None:
            self._hash = weights_hash(self.weights_path)
        return self._hash

    def same_model(self, other: "LoadedEncoder | None") -> bool:
        return other is None or other is self or (other.resolved.identity() == self.resolved.identity())


def _fetch_hint(r: ResolvedEncoder) -> str:
    return (
        f"set {r.setting}.model: bootstrap or a local checkpoint path "
        f"({r.setting}.model: <architecture>, {r.setting}.pretrained: /path/to/checkpoint; "
        f"or {r.setting}.model: 'local-dir:/path/to/open_clip_folder')"
    )


def load_encoder(
    spec_or_resolved: EncoderSpec | ResolvedEncoder,
    device: str = "auto",
    *,
    bootstrap_dir: Path | None = None,
    setting: str = "encoder.cluster_encoder",
) -> LoadedEncoder:
    """Load an encoder for inference (eval mode, ``requires_grad`` off) on ``device``.

    An ``EncoderSpec`` is resolved first (``bootstrap_dir`` is then needed for
    ``bootstrap``).  Raises ``EncoderError`` naming the setting to change when
    weights cannot be fetched (offline and not cached) or do not fit.
    """
    if isinstance(spec_or_resolved, ResolvedEncoder):
        r = spec_or_resolved
    else:
        if spec_or_resolved.is_bootstrap and bootstrap_dir is None:
            raise EncoderError("load_encoder: bootstrap_dir is needed to load the bootstrap encoder")
        r = resolve_encoder(spec_or_resolved, Path(bootstrap_dir or "."), setting=setting)

    register_model_configs()
    dev = torch_device(device)
    weights = _folder_weights(r) if r.kind in ("bootstrap", "local-dir") else r.weights_path
    model, preprocess, tokenizer, weights = _create_model(r, dev, weights)
    model.eval()
    model.requires_grad_(False)
    dim = embed_dim_of(model)
    return LoadedEncoder(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        embed_dim=dim,
        name=r.name,
        device=dev,
        resolved=r,
        weights_path=Path(weights) if weights else None,
    )


def _folder_weights(r: ResolvedEncoder) -> Path:
    """The weight file of a ``bootstrap`` / ``local-dir`` encoder's folder;
    EncoderError when the folder has no config (the bootstrap encoder not
    trained yet) or no weights."""
    folder = r.local_dir
    assert folder is not None
    if not (folder / CONFIG_FILE).is_file():
        if r.kind == "bootstrap":
            raise EncoderError(
                f"the bootstrap encoder has not been trained yet ({folder} has no {CONFIG_FILE}); "
                "materialise the encoder asset first"
            )
        raise EncoderError(f"{r.setting}.model: {folder} is not an open_clip folder (no {CONFIG_FILE})")
    weights = weights_in_dir(folder)
    if weights is None:
        what = "the bootstrap encoder folder" if r.kind == "bootstrap" else f"{r.setting}.model"
        raise EncoderError(
            f"{what}: no weights in {folder} (expected one of {', '.join(WEIGHT_FILE_ORDER[:3])}); "
            "a folder without weights would give a randomly initialised model"
        )
    return weights


def _create_model(r: ResolvedEncoder, dev: str, weights: Path | None) -> tuple[Any, Any, Any, Path | None]:
    """open_clip's model, preprocess and tokenizer of ``r`` on ``dev``, and the
    weight file (``weights``, or the one a tag or hf-hub id was fetched to).
    Fetches go through the Hub offline when it cannot be reached; any failure
    is an EncoderError naming the setting to change."""
    import open_clip

    hub = hub_offline_when_unreachable() if r.kind in ("tag", "hf-hub") else contextlib.nullcontext(False)
    with hub as offline:
        try:
            if r.kind == "tag":
                # fetch (or find in the cache) first, to know the weight file
                weights = Path(open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(r.model_name, r.pretrained)))
            model, _, preprocess = open_clip.create_model_and_transforms(r.model_name, pretrained=r.pretrained, device=dev)
            tokenizer = open_clip.get_tokenizer(r.model_name)
            if r.kind == "hf-hub":
                weights = hf_weights_path(r.model_name[len(HF_HUB):])
        except EncoderError:
            raise
        except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/OSError/hub errors
            cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if r.kind in ("tag", "hf-hub"):
                state = "offline and not in the local cache" if offline else "download failed"
                raise EncoderError(f"cannot fetch the weights of {r.name} ({state}; {cause}); {_fetch_hint(r)}") from e
            raise EncoderError(
                f"cannot load {r.name} ({cause}); check {r.setting}.model and {r.setting}.pretrained "
                "(the checkpoint must match the architecture)"
            ) from e
    return model, preprocess, tokenizer, weights


def embed_dim_of(model: Any) -> int:
    """Output dimension of ``model.encode_image`` (from the vision tower, else one dummy forward)."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    import torch

    size = getattr(model.visual, "image_size", (224, 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    param = next(model.parameters())
    with torch.inference_mode():
        out = model.encode_image(torch.zeros((1, 3, *size), device=param.device, dtype=param.dtype))
    return int(out.shape[-1])


# ---------------------------------------------------------------------------
# checks against stored embeddings


def check_embedding_dim(expected: int, got: int, where: str, checkpoint: str | None = None) -> None:
    """Raise when stored embeddings (``got`` columns, in ``where``) do not fit the
    encoder (``expected`` = its embed dim; ``checkpoint`` names it)."""
    if int(expected) == int(got):
        return
    enc = f"encoder {checkpoint}" if checkpoint else "the encoder"
    raise EncoderError(
        f"embedding dimension mismatch: {where} holds {got}-dim embeddings but {enc} produces "
        f"{expected}-dim ones; the stored embeddings were written by another encoder: re-materialise "
        "the embeddings for this shard (or restore the encoder that wrote them)"
    )


def check_encoder_against_embeddings(encoder: LoadedEncoder, npy_path: Path) -> None:
    """``check_embedding_dim`` for a stored ``.npy`` (reads only its header)."""
    import numpy as np

    with open(npy_path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = reader(f)
    got = shape[1] if len(shape) == 2 else -1
    where = f"{npy_path} (shape {tuple(shape)})"
    check_embedding_dim(encoder.embed_dim, got, where, checkpoint=f"{encoder.name} [{encoder.weights_path}]")


def parameter_count(architecture: str) -> int:
    """Parameters of an open_clip ``architecture``, counted on torch's meta
    device (no memory is allocated, no weights are read)."""
    import open_clip
    import torch

    register_model_configs()
    with torch.device("meta"):
        model = open_clip.create_model(architecture, pretrained=None, device="meta")
    return sum(p.numel() for p in model.parameters())


#: float32 copies of the weights one training writes: the checkpoint (weights and
#: AdamW's two moments), the converted model folder and the strategy's copy of it
TRAINING_WEIGHT_COPIES = 5


def require_training_space(folder: Path, architecture: str, what: str, runs: int = 1) -> None:
    """Fail before ``runs`` trainings of ``architecture`` when the volume of
    ``folder`` cannot hold what they write (:data:`TRAINING_WEIGHT_COPIES`
    float32 copies of the weights each, plus the run's floor), naming the need
    and the free space."""
    from dbprune_assets.core.running.oserrors import MIN_FREE_BYTES, require_free_space

    try:
        n = parameter_count(architecture)
    except Exception:  # an architecture open_clip cannot build here fails later, with its own message
        return
    require_free_space(folder, runs * n * 4 * TRAINING_WEIGHT_COPIES + MIN_FREE_BYTES, what)
