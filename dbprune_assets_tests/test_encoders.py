"""Encoders and model folders: resolution, loading (local-dir, checkpoint
path), offline errors, weights hashing, device errors, and one real bootstrap
training run with open_clip_train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from dbprune_assets.core.models import encoders as E  # noqa: E402
from dbprune_assets.core.models import model_dir as M  # noqa: E402
from dbprune_assets.core.running.device import DeviceError  # noqa: E402
from dbprune_assets.samplepool import write_sample_pool  # noqa: E402
from dbprune_assets.core.settings import BootstrapSettings, EncoderSpec, PoolSettings  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    E.register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("dbprune-tiny")
    model.eval()
    return model


def _inputs(model, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn((n, 3, *size), generator=g)
    tokenizer = open_clip.get_tokenizer("dbprune-tiny")
    texts = tokenizer([f"a photo of a red circle number {i}" for i in range(n)])
    return images, texts


def _outputs(model, images, texts):
    with torch.inference_mode():
        return model.encode_image(images), model.encode_text(texts)


def test_tiny_config_is_registered():
    E.register_model_configs()
    E.register_model_configs()  # idempotent
    assert "dbprune-tiny" in open_clip.list_models()
    cfg = E.model_config("dbprune-tiny")
    assert cfg["vision_cfg"]["image_size"] == 32
    tok = open_clip.get_tokenizer("dbprune-tiny")
    assert tok(["a red circle"]).shape == (1, cfg["text_cfg"]["context_length"])


def test_local_dir_roundtrip_identical_outputs(tiny_model, tmp_path):
    out = M.save_local_dir(tmp_path / "enc", tiny_model, E.model_config("dbprune-tiny"), tmp_root=tmp_path / ".tmp")
    assert sorted(p.name for p in out.iterdir()) == [M.CONFIG_FILE, M.WEIGHTS_FILE]
    assert json.loads((out / M.CONFIG_FILE).read_text()).keys() >= {"model_cfg", "preprocess_cfg"}
    images, texts = _inputs(tiny_model)
    want_i, want_t = _outputs(tiny_model, images, texts)

    # plain open_clip reads the folder
    model2, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(out))
    model2.eval()
    got_i, got_t = _outputs(model2, images, texts)
    assert torch.equal(want_i, got_i) and torch.equal(want_t, got_t)

    # and so does load_encoder
    enc = E.load_encoder(EncoderSpec(model="local-dir:" + str(out)), "cpu")
    assert enc.resolved.kind == "local-dir"
    assert enc.embed_dim == E.model_config("dbprune-tiny")["embed_dim"]
    assert enc.weights_path == out / M.WEIGHTS_FILE
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())
    got_i, got_t = _outputs(enc.model, images, texts)
    assert torch.equal(want_i, got_i) and torch.equal(want_t, got_t)
    assert enc.tokenizer(["x"]).shape[1] == E.model_config("dbprune-tiny")["text_cfg"]["context_length"]


@pytest.mark.parametrize("fmt", ["state_dict.pt", "train_ckpt.pt", "weights.safetensors"])
def test_checkpoint_path_loads_through_pretrained(tiny_model, tmp_path, fmt):
    path = tmp_path / fmt
    sd = tiny_model.state_dict()
    if fmt == "state_dict.pt":
        torch.save(sd, path)
    elif fmt == "train_ckpt.pt":  # what open_clip_train writes (DDP prefix included)
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    r = E.resolve_encoder(EncoderSpec(model="dbprune-tiny", pretrained=str(path)), tmp_path / "unused")
    assert r.kind == "checkpoint" and r.weights_path == path.resolve()
    enc = E.load_encoder(r, "cpu")
    images, texts = _inputs(tiny_model)
    want, got = _outputs(tiny_model, images, texts), _outputs(enc.model, images, texts)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert enc.weights_hash() == M.weights_hash(path)


def test_missing_checkpoint_names_setting(tmp_path):
    with pytest.raises(E.EncoderError, match=r"encoder\.score_encoder\.pretrained.*does not exist"):
        E.resolve_encoder(
            EncoderSpec(model="dbprune-tiny", pretrained=str(tmp_path / "nope.pt")), tmp_path, setting="encoder.score_encoder"
        )


def test_unknown_tag_names_setting(tmp_path):
    with pytest.raises(E.EncoderError) as err:
        E.load_encoder(EncoderSpec(model="ViT-B-32", pretrained="no_such_tag_b79k"), "cpu")
    msg = str(err.value)
    assert "encoder.cluster_encoder.pretrained" in msg and "bootstrap" in msg and "laion2b_s34b_b79k" in msg


def test_unknown_architecture_and_missing_pretrained(tmp_path):
    with pytest.raises(E.EncoderError, match=r"encoder\.cluster_encoder\.model: unknown open_clip architecture"):
        E.resolve_encoder(EncoderSpec(model="ViT-Nope-99", pretrained="x"), tmp_path)
    with pytest.raises(E.EncoderError, match=r"encoder\.cluster_encoder\.pretrained is not set.*bootstrap"):
        E.resolve_encoder(EncoderSpec(model="ViT-B-32"), tmp_path)


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """Offline Hugging Face Hub with an empty cache: fails at once, never waits on the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_unavailable_hf_hub_offline_raises_encoder_error(hub_offline):
    spec = EncoderSpec(model="hf-hub:dbprune-test/no-such-clip")
    with pytest.raises(E.EncoderError) as err:
        E.load_encoder(spec, "cpu", setting="encoder.score_encoder")
    msg = str(err.value)
    assert "encoder.score_encoder.model" in msg and "bootstrap or a local checkpoint path" in msg
    assert "offline" in msg


def test_known_tag_offline_raises_encoder_error(hub_offline):
    spec = EncoderSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert E.resolve_encoder(spec, Path(".")).kind == "tag"
    with pytest.raises(E.EncoderError) as err:
        E.load_encoder(spec, "cpu")
    msg = str(err.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in msg
    assert "encoder.cluster_encoder.model: bootstrap or a local checkpoint path" in msg


def test_local_dir_and_bootstrap_errors(tmp_path):
    with pytest.raises(E.EncoderError, match="not an open_clip folder"):
        E.resolve_encoder(EncoderSpec(model=f"local-dir:{tmp_path}"), tmp_path)
    with pytest.raises(E.EncoderError, match="has not been trained yet"):
        E.load_encoder(EncoderSpec(model="bootstrap"), "cpu", bootstrap_dir=tmp_path / "bootstrap")
    with pytest.raises(E.EncoderError, match=r"pretrained must be null"):
        E.resolve_encoder(EncoderSpec(model="bootstrap", pretrained="x"), tmp_path)
    # a config without weights would silently be a random model: refuse
    M.write_config_dir(tmp_path / "cfg_only", E.model_config("dbprune-tiny"))
    with pytest.raises(E.EncoderError, match="no weights"):
        E.load_encoder(EncoderSpec(model=f"local-dir:{tmp_path / 'cfg_only'}"), "cpu")


def test_cuda_without_gpu_is_a_device_error(tiny_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    out = M.save_local_dir(tmp_path / "enc", tiny_model, E.model_config("dbprune-tiny"), tmp_root=tmp_path / ".tmp")
    spec = EncoderSpec(model=f"local-dir:{out}")
    with pytest.raises(DeviceError, match="compute.device is 'cuda' but no CUDA device is available"):
        E.load_encoder(spec, "cuda")
    enc = E.load_encoder(spec, "auto")
    assert enc.device == "cpu"
    with pytest.raises(DeviceError, match="compute.device is 'cuda'"):
        enc.to("cuda")


def test_weights_hash_changes_with_weights(tiny_model, tmp_path):
    cfg = E.model_config("dbprune-tiny")
    a = M.save_local_dir(tmp_path / "a", tiny_model, cfg, tmp_root=tmp_path / ".tmp")
    a2 = M.save_local_dir(tmp_path / "a2", tiny_model, cfg, tmp_root=tmp_path / ".tmp")
    h = M.weights_hash(a)
    assert len(h) == 64 and h == M.weights_hash(a / M.WEIGHTS_FILE) == M.weights_hash(a2)
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["logit_scale"] += 1e-3
    b = M.save_local_dir(tmp_path / "b", sd, cfg, tmp_root=tmp_path / ".tmp")
    assert M.weights_hash(b) != h
    with pytest.raises(M.ModelDirError):
        M.weights_hash(tmp_path / "nothing")


def test_check_embedding_dim(tiny_model, tmp_path):
    E.check_embedding_dim(64, 64, "x")
    with pytest.raises(E.EncoderError, match=r"embeddings/img_emb/00003\.npy holds 512-dim.*ckpt\.pt.*64-dim"):
        E.check_embedding_dim(64, 512, "embeddings/img_emb/00003.npy", checkpoint="ckpt.pt")
    out = M.save_local_dir(tmp_path / "enc", tiny_model, E.model_config("dbprune-tiny"), tmp_root=tmp_path / ".tmp")
    enc = E.load_encoder(EncoderSpec(model=f"local-dir:{out}"), "cpu")
    npy = tmp_path / "00007.npy"
    np.save(npy, np.zeros((3, enc.embed_dim + 1), np.float16))
    with pytest.raises(E.EncoderError, match=r"00007\.npy.*" + str(out).replace(".", r"\.")):
        E.check_encoder_against_embeddings(enc, npy)
    np.save(npy, np.zeros((0, enc.embed_dim), np.float16))
    E.check_encoder_against_embeddings(enc, npy)


# ---------------------------------------------------------------------------
# the real bootstrap training (open_clip_train in a subprocess)


def _reference_shards(root: Path, n: int) -> list[Path]:
    """A tiny clean reference split: the sample-pool generator's."""
    settings = PoolSettings(shards=1, samples_per_shard=40, concepts=6, reference_samples=n, eval_per_class=1)
    summary = write_sample_pool(root / "pool", settings, tmp_root=root / ".tmp")
    shards = sorted(summary.reference_dir.glob("*.tar"))
    assert shards
    return shards


def test_bootstrap_trains_with_open_clip_train_and_loads(tmp_path):
    from dbprune_assets.core.models.bootstrap import train_bootstrap
    from dbprune_assets.core.models.oc_train import build_train_argv, parse_loss_curve

    n = 256
    shards = _reference_shards(tmp_path / "src", n)
    settings = BootstrapSettings(epochs=2, batch_size=64, lr=2e-3, warmup=2, workers=1, seed=0)
    results = []
    for run in ("a", "b"):
        results.append(
            train_bootstrap(
                shards, n, tmp_path / f"enc_{run}", settings, "cpu",
                logs_dir=tmp_path / f"logs_{run}", tmp_root=tmp_path / ".tmp", threads=1, timeout_s=240,
            )
        )
    res = results[0]
    steps_per_epoch = n // settings.batch_size
    assert res.steps == steps_per_epoch * settings.epochs
    assert [p.step for p in res.loss_curve] == list(range(1, res.steps + 1))
    losses = [p.loss for p in res.loss_curve]
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < losses[0]  # it learns something even in 8 steps
    assert res.final_loss == losses[-1] and res.seconds > 0 and res.device == "cpu" and res.precision == "fp32"
    # deterministic given seed (same device, same thread count)
    assert res.weights_hash == results[1].weights_hash
    assert [p.loss for p in results[1].loss_curve] == losses
    # the folder is a plain open_clip local-dir
    names = {p.name for p in res.out_dir.iterdir()}
    assert {M.CONFIG_FILE, M.WEIGHTS_FILE, "bootstrap.json"} <= names
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(res.out_dir))
    enc = E.load_encoder(EncoderSpec(model="bootstrap"), "cpu", bootstrap_dir=res.out_dir)
    assert enc.resolved.kind == "bootstrap" and enc.weights_hash() == res.weights_hash
    images, texts = _inputs(model)
    model.eval()
    a, b = _outputs(model, images, texts), _outputs(enc.model, images, texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # logs kept, scratch cleaned
    assert (tmp_path / "logs_a" / "out.log").is_file()
    assert parse_loss_curve(tmp_path / "logs_a" / "out.log", settings.batch_size) == res.loss_curve
    assert not any((tmp_path / ".tmp").iterdir())
    # the argv builder is generic (reused for per-strategy training)
    argv = build_train_argv(
        model="ViT-B-32", train_data=shards, n_samples=n, batch_size=8, epochs=1, lr=1e-3, warmup=0, workers=0,
        precision="amp_bf16", seed=3, logs=tmp_path, name="x", device="cuda",
    )
    assert argv[argv.index("--train-data") + 1] == "::".join(str(s) for s in shards)
    assert argv[argv.index("--precision") + 1] == "amp_bf16"


def test_bootstrap_rejects_batch_larger_than_data(tmp_path):
    from dbprune_assets.core.models.bootstrap import BootstrapError, plan_workers

    with pytest.raises(BootstrapError, match="encoder.bootstrap.batch_size"):
        plan_workers([tmp_path / "0.tar"], 100, 128, 1)
