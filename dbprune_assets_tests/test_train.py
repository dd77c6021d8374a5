"""Per-strategy training: the equal-compute plan (checked against
open_clip_train's own step count), and real open_clip_train runs on two
exported-subset-like webdatasets of different sizes that must see the same
samples and land as loadable open_clip folders."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

from dbprune_assets.core.running.device import auto_threads
from dbprune_assets.core.models.encoders import model_config
from dbprune_assets.core.store.export import train_data_spec
from dbprune_assets.samplepool import write_sample_pool
from dbprune_assets.core.settings import PoolSettings, TrainSettings
from dbprune_assets.core.models.train import (
    RESULT_FILE,
    TrainError,
    plan_training,
    read_train_result,
    train_clip,
)
from dbprune_assets.core.pool.wds import iter_samples, write_tar


@pytest.mark.parametrize(
    ("samples_seen", "batch", "workers", "world", "epochs", "steps", "seen", "epochs_used"),
    [
        (20000, 128, 1, 1, 1, 156, 19968, 1),  # the sample profile
        (20000, 128, 4, 1, 1, 156, 19968, 1),  # 156.25 steps -> 39 x 4 workers
        (20000, 128, 3, 1, 1, 156, 19968, 1),
        (20000, 128, 1, 1, 8, 160, 20480, 8),  # a multiple of 8 epochs: 156.25 -> 20 x 8
        (128_000_000, 4096, 4, 8, 8, 31264, 128_057_344, 8),  # the paper profile on 8 GPUs: 977 x 4 x 8
        (100, 127, 2, 2, 1, 2, 256, 1),  # at least one step per worker; batch rounded up to 2 x 64
    ],
)
def test_plan(samples_seen, batch, workers, world, epochs, steps, seen, epochs_used) -> None:
    p = plan_training(samples_seen, batch, workers, world, epochs)
    assert (p.steps, p.samples_seen, p.epochs) == (steps, seen, epochs_used)
    assert p.samples_seen == p.steps * p.global_batch
    assert p.steps % max(1, workers) == 0 and p.steps == p.epochs * p.steps_per_epoch
    assert p.open_clip_train_steps() == p.steps


@pytest.mark.parametrize(
    ("workers", "cores", "processes", "threads"),
    [(1, 2, 1, 1), (0, 2, 1, 2), (1, 16, 1, 15), (4, 16, 2, 4), (2, 2, 4, 1), (0, 8, 3, 2)],
)
def test_auto_threads_per_process(workers: int, cores: int, processes: int, threads: int) -> None:
    """The cores left beside each process's loader workers, shared by the processes, at least 1."""
    assert auto_threads(workers, cores=cores, processes=processes) == threads


def _subset(folder: Path, samples: list[tuple[str, dict[str, bytes]]], shard_size: int) -> tuple[str, int]:
    """An exported-subset-like folder: NNNNN.tar + sizes.json."""
    folder.mkdir(parents=True)
    sizes = {}
    for i in range(0, len(samples), shard_size):
        name = f"{i // shard_size:05d}.tar"
        sizes[name] = write_tar(folder / name, samples[i : i + shard_size])
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return train_data_spec(folder)


@pytest.fixture(scope="module")
def subsets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, int]]:
    root = tmp_path_factory.mktemp("trainpool")
    write_sample_pool(root / "pool", PoolSettings(shards=1, samples_per_shard=20, reference_samples=240, eval_per_class=1))
    samples: list[tuple[str, dict[str, bytes]]] = []
    for tar in sorted((root / "pool" / "reference").glob("*.tar")):
        samples += list(iter_samples(tar))
    assert len(samples) == 240
    return {
        "big": _subset(root / "subsets" / "big", samples, 100),  # 240 samples in 3 shards
        "small": _subset(root / "subsets" / "small", samples[:20], 100),  # 20: fewer than a batch of 32
    }


def _settings(**kw) -> TrainSettings:
    base = dict(model="dbprune-tiny", samples_seen=200, batch_size=32, lr=1e-3, warmup=2, precision="amp_bf16", workers=1, train_seeds=(0, 1))
    base.update(kw)
    return TrainSettings(**base)


@pytest.mark.slow
def test_train_two_subsets_equal_samples_seen(tmp_path: Path, subsets: dict[str, tuple[str, int]]) -> None:
    import open_clip
    import torch

    settings = _settings(scale="debug", beta2=0.95)  # DataComp's debug scale, every value overridden
    home = tmp_path / "home"
    results = {}
    for strategy, (pattern, n) in subsets.items():
        results[strategy] = train_clip(
            pattern, n, home / "models" / strategy / "seed0", settings, 0, "cpu",
            home / "logs" / strategy / "seed0", home / ".tmp", threads=1,
        )
    big, small = results["big"], results["small"]
    assert (big.n_samples, small.n_samples) == (240, 20)
    # equal compute whatever the subset size: round(200 / 32) = 6 steps x 32
    for r in (big, small):
        assert r.steps == 6 and r.global_batch == 32 and r.samples_seen == 192 == r.steps * r.global_batch
        assert r.requested_samples_seen == 200
        assert [p.step for p in r.loss_curve] == list(range(1, 7))
        assert all(math.isfinite(p.loss) and p.loss > 0 for p in r.loss_curve)
        assert r.precision == "fp32" and any("fp32" in n for n in r.notes)  # amp_bf16 asked, CPU gets fp32
        assert "--dataset-resampled" in r.argv
        assert r.argv[r.argv.index("--train-num-samples") + 1] == "192"
        assert r.argv[r.argv.index("--epochs") + 1] == "1"
        assert r.argv[r.argv.index("--zeroshot-frequency") + 1] == "0"
        assert r.argv[r.argv.index("--beta2") + 1] == "0.95"
        assert "beta2: 0.95" in (r.log_path.parent / "params.txt").read_text().splitlines()  # open_clip_train's args
        assert r.scale == "debug" and r.to_json()["scale"] == "debug"
        assert any("train.scale debug, but model 'dbprune-tiny' (DataComp debug: 'ViT-B-32')" in n
                   and "beta2 0.95 (DataComp debug: 0.98)" in n and "not comparable" in n for n in r.notes)
        assert r.seconds > 0 and r.samples_per_s > 0
        assert r.log_path is not None and r.log_path.is_file()
        assert (r.log_path.parent / "loss_curve.json").is_file()
    assert any("fewer than one batch" in n for n in small.notes)
    assert big.weights_hash != small.weights_hash

    # the seed folder and the canonical models/<strategy>/ load with open_clip
    for folder in (home / "models" / "big" / "seed0", home / "models" / "big"):
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(folder))
        model.eval()
        with torch.no_grad():
            emb = model.encode_image(torch.zeros(1, 3, 32, 32))
        assert emb.shape == (1, model_config("dbprune-tiny")["embed_dim"])
        res = read_train_result(folder)
        assert res["samples_seen"] == 192 and res["steps"] == 6 and res["global_batch"] == 32
        assert len(res["loss_curve"]["points"]) == 6 and res["argv"] == big.argv
    assert big.canonical_dir == home / "models" / "big"
    assert (home / "models" / "big" / "CANONICAL").read_text().strip() == "seed0"
    canon = open_clip.create_model("local-dir:" + str(home / "models" / "big"))
    seed0 = open_clip.create_model("local-dir:" + str(home / "models" / "big" / "seed0"))
    assert all(torch.equal(a, b) for a, b in zip(canon.state_dict().values(), seed0.state_dict().values()))
    assert big.final_loss is not None and big.first_loss is not None

    from dbprune_assets.defs.plots import loss_curve_png

    png = loss_curve_png({"big": big.loss_curve, "small": small.loss_curve})
    assert png[:4] == b"\x89PNG"


@pytest.mark.slow
def test_train_failure_reports_the_log_tail(tmp_path: Path, subsets: dict[str, tuple[str, int]]) -> None:
    pattern, n = subsets["small"]
    with pytest.raises(TrainError, match="timed out") as err:
        train_clip(pattern, n, tmp_path / "m" / "seed1", _settings(), 1, "cpu", tmp_path / "logs", tmp_path / ".tmp",
                   threads=1, timeout_s=0.5)
    assert "last output" in str(err.value)
    assert not (tmp_path / "m" / "seed1").exists() and not (tmp_path / "m" / RESULT_FILE).exists()


@pytest.mark.parametrize(
    ("scale", "per_device", "lr", "warmup", "beta2", "model"),
    [("small", "4096", "0.0005", "500", "0.98", "ViT-B-32"), ("xlarge", "90112", "0.001", "10000", "0.95", "ViT-L-14")],
)
def test_scale_values_reach_open_clip_train_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scale: str,
                                                 per_device: str, lr: str, warmup: str, beta2: str, model: str) -> None:
    """train.scale's values are the arguments open_clip_train gets (no run: the runner is replaced)."""
    from dbprune_assets.core.models import train as train_mod
    from dbprune_assets.core.models.oc_train import OpenClipTrainError

    seen: dict[str, list[str]] = {}

    def fake_run(argv, **_):
        seen["argv"] = list(argv)
        raise OpenClipTrainError("not run in this test")

    monkeypatch.setattr(train_mod, "run_open_clip_train", fake_run)
    monkeypatch.setattr(train_mod, "training_scratch", _fake_scratch)
    settings = TrainSettings(scale=scale, workers=4)
    with pytest.raises(TrainError, match="not run in this test"):
        train_clip(str(tmp_path / "00000.tar"), 10, tmp_path / "m" / "seed0", settings, 0, "cpu", tmp_path / "l", tmp_path / "t")
    argv = seen["argv"]
    arg = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert (arg("--batch-size"), arg("--lr"), arg("--warmup"), arg("--beta2")) == (per_device, lr, warmup, beta2)
    assert arg("--model") == f"local-dir:{model}"  # the staged architecture (faked here)
    plan = plan_training(settings.samples_seen, int(per_device), 4)
    assert arg("--train-num-samples") == str(plan.samples_per_epoch)
    if scale == "small":  # 12.8M / 4096 = 3125 steps -> 3124 (a multiple of the 4 workers)
        assert (plan.steps, plan.samples_seen) == (3124, 12_795_904)


class _FakeScratch:
    def __init__(self, architecture: str, root: Path) -> None:
        self.model_arg, self.logs, self.stdout_path = f"local-dir:{architecture}", root / "logs", root / "stdout.log"


def _fake_scratch(architecture: str, tmp_root: Path, prefix: str):
    import contextlib

    return contextlib.nullcontext(_FakeScratch(architecture, Path(tmp_root)))


def test_train_rejects_empty_subset(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="empty"):
        train_clip(str(tmp_path / "00000.tar"), 0, tmp_path / "m", _settings(), 0, "cpu", tmp_path / "l", tmp_path / "t")


def test_train_needs_cuda_for_several_gpus(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(TrainError, match="needs CUDA"):
        train_clip(str(tmp_path / "00000.tar"), 10, tmp_path / "m", _settings(), 0, "cpu", tmp_path / "l", tmp_path / "t", n_gpus=2)


def test_plan_matches_open_clip_train(subsets: dict[str, tuple[str, int]]) -> None:
    """open_clip_train's own get_wds_dataset turns the plan back into its steps."""
    from open_clip_train.data import get_wds_dataset

    pattern, _ = subsets["big"]
    for samples_seen, batch, workers in ((200, 32, 1), (1000, 32, 2), (20000, 128, 1), (777, 16, 2)):
        p = plan_training(samples_seen, batch, workers)
        args = Namespace(
            train_data=pattern, dataset_resampled=True, train_num_samples=p.samples_per_epoch,
            train_data_upsampling_factors=None, seed=0, batch_size=p.per_device_batch, world_size=1, workers=workers,
        )
        info = get_wds_dataset(args, lambda x: x, is_train=True, epoch=0, tokenizer=lambda t: [t])
        assert info.dataloader.num_batches * p.epochs == p.steps
        assert info.dataloader.num_samples == p.samples_per_epoch
