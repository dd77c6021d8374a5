"""The README's commands, run as a user runs them: `dbprune run` end to end on
a tiny pool (ingest to comparison), again (everything up to date),
`dbprune sql`, `dbprune sample-pool` and `dbprune ui`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from dbprune_assets.core.settings import STRATEGIES

from .conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory):
    from .conftest import write_config

    root = tmp_path_factory.mktemp("cli")
    home = root / "home"
    cfg = write_config(root / "tiny.yaml")
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": "", "DAGSTER_HOME": ""}
    t0 = time.monotonic()
    proc = run_cli("run", "--config", str(cfg), env=env)
    seconds = time.monotonic() - t0
    return home, env, proc, seconds


def test_run_end_to_end(full_run):
    home, _, proc, seconds = full_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    print(f"tiny end-to-end run: {seconds:.0f}s")
    assert "generating the sample pool" in out
    assert "## comparison" in out  # the comparison table closes the run
    assert "where to look" in out
    assert f"  report   {home / 'reports'}" in out  # the summary names the HTML page the run wrote
    # the console holds dbprune's own lines: library warnings and bars are in the home's library log
    assert "No pretrained weights" not in out + proc.stderr and "WARNING:root" not in proc.stderr, proc.stderr[-3000:]
    assert "No pretrained weights loaded" in (home / "logs" / "libraries.log").read_text()
    assert "%|" not in proc.stderr, proc.stderr[-3000:]  # no tqdm bar
    assert (home / "config.yaml").exists() and (home / "dbprune.duckdb").exists()
    for strategy in STRATEGIES:
        sub = home / "subsets" / strategy
        sizes = json.loads((sub / "sizes.json").read_text())
        decisions = pl.read_parquet(home / "tables" / "decisions" / f"{strategy}.parquet")
        assert sum(sizes.values()) == int(decisions["keep"].sum())
        assert (sub / "uids.npy").exists()
        assert (home / "models" / strategy / "open_clip_config.json").exists()
        ev = pl.read_parquet(home / "tables" / "eval" / f"{strategy}.parquet")
        assert set(zip(ev["task"], ev["metric"])) == {
            *(("shapes", m) for m in ("acc1", "acc5", "mean_per_class_recall")),
            *(("shapes_retrieval", f"{d}_retrieval_recall@{k}") for d in ("image", "text") for k in (1, 5, 10)),
            ("shapes_retrieval", "mean_recall@1")}
        assert ev["value"].is_between(0, 1).all()
        results = home / "artefacts" / "eval_scores" / strategy / "seed0" / "eval_results.jsonl"
        assert [json.loads(line)["key"] for line in results.read_text().splitlines()] == ["shapes", "shapes_retrieval"]


def test_models_load_with_open_clip(full_run):
    import open_clip
    import torch

    home = full_run[0]
    from dbprune_assets.core.models.encoders import register_model_configs

    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{home / 'models' / 'dbp'}")
    tok = open_clip.get_tokenizer(f"local-dir:{home / 'models' / 'dbp'}")
    with torch.no_grad():
        t = model.encode_text(tok(["a red circle"]))
    assert t.shape[0] == 1


def test_second_run_is_up_to_date(full_run):
    home, env, _, _ = full_run
    t0 = time.monotonic()
    proc = run_cli("run", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "▶" not in proc.stdout, proc.stdout  # nothing re-ran
    assert proc.stdout.count("up to date") >= 8
    print(f"second run (all up to date): {time.monotonic() - t0:.1f}s")


def test_sql(full_run):
    home, env, _, _ = full_run
    proc = run_cli("sql", "SELECT strategy, count(*) AS n, sum(keep::INT) AS kept FROM decisions GROUP BY 1 ORDER BY 1",
                   "--format", "csv", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()
    assert rows[0] == "strategy,n,kept" and len(rows) == 1 + len(STRATEGIES)
    bad = run_cli("sql", "SELECT * FROM no_such_table", env=env)
    assert bad.returncode != 0 and "no_such_table" in bad.stderr


def readme_sql_examples() -> list[list[str]]:
    """The arguments of every ``dbprune sql`` command in the README's bash
    blocks, as the shell splits them (a command may span lines inside its quotes)."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        lines, i = block.splitlines(), 0
        while i < len(lines):
            if lines[i].lstrip().startswith("dbprune sql "):
                text = lines[i]
                while True:
                    try:
                        words = shlex.split(text, comments=True)
                        break
                    except ValueError:  # a quote not closed yet: the command goes on
                        i += 1
                        text += "\n" + lines[i]
                if not any("…" in w for w in words):  # the README's placeholders
                    found.append(words[2:])
            i += 1
    return found


def test_every_sql_example_of_the_readme_runs(full_run):
    """Each ``dbprune sql`` example the README shows runs on a home the
    README's ``dbprune run`` made (DuckDB keywords quoted where they must be)."""
    home, env, proc, _ = full_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    examples = readme_sql_examples()
    assert len(examples) >= 6 and any("decision_runs" in " ".join(e) for e in examples)
    for args in examples:
        got = run_cli("sql", *args, env=env)
        assert got.returncode == 0, f"dbprune sql {args}: {got.stderr}"


def test_sample_pool_command(tmp_path: Path):
    out = tmp_path / "pool"
    proc = run_cli("sample-pool", "--out", str(out), "--shards", "1", "--samples-per-shard", "20",
                   "--concepts", "4", "--image-size", "24", "--reference-samples", "16")
    assert proc.returncode == 0, proc.stderr
    assert (out / "00000.tar").exists() and (out / "00000.parquet").exists()
    assert pl.read_parquet(out / "00000.parquet").height == 20
    again = run_cli("sample-pool", "--out", str(out))
    assert again.returncode != 0 and "--overwrite" in again.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_same_instance(full_run):
    home, env, _, _ = full_run
    import os
    import shutil

    port = _free_port()
    exe = shutil.which("dbprune") or str(Path(sys.executable).parent / "dbprune")
    proc = subprocess.Popen([exe, "ui", "--port", str(port)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        body = None
        while time.monotonic() < deadline:
            try:
                q = json.dumps({"query": "{ runsOrError { ... on Runs { results { runId status } } } }"}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=q,
                                             headers={"Content-Type": "application/json"})
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
                break
            except Exception:
                time.sleep(1)
        assert body is not None, "the UI did not come up"
        runs = body["data"]["runsOrError"]["results"]
        assert runs and all(r["status"] == "SUCCESS" for r in runs)  # the runs dbprune run made
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _model_files(home: Path) -> dict[str, list[tuple[str, int]]]:
    """Each strategy's model files with their modification times (ns)."""
    return {st: sorted((str(p.relative_to(home)), p.stat().st_mtime_ns) for p in (home / "models" / st).rglob("*")
                       if p.is_file()) for st in STRATEGIES}


def _kept_sets(home: Path) -> dict[str, frozenset]:
    return {st: frozenset(pl.read_parquet(home / "tables" / "decisions" / f"{st}.parquet").filter(pl.col("keep"))
                          .select("shard", "uid").iter_rows()) for st in STRATEGIES}


def test_another_tau_retrains_only_the_strategies_whose_subset_changed(full_run, tmp_path: Path):
    """dbp.tau changes dbp's quotas alone (M and the SSP quotas do not depend on
    it): after `--select '*pruned_subset'` the summary says which models are
    out of date, and the next run retrains those and keeps the others."""
    from .conftest import write_config

    home, env, _, _ = full_run
    models, kept = _model_files(home), _kept_sets(home)
    cfg = write_config(tmp_path / "tau.yaml", dbp={"k": 4, "l": 2, "niter": 10, "sample_size": 10000, "tau": 5.0})
    subsets = run_cli("run", "--config", str(cfg), "--select", "*pruned_subset", env=env)
    assert subsets.returncode == 0, subsets.stderr[-2000:]
    changed = {st for st, new in _kept_sets(home).items() if new != kept[st]}
    assert changed <= {"dbp"}, changed
    if changed:
        assert f"the comparison below is NOT current: the subsets of {', '.join(sorted(changed))} changed" \
            in subsets.stdout, subsets.stdout[-3000:]
    again = run_cli("run", env=env)  # the saved settings are now tau.yaml's
    assert again.returncode == 0, again.stderr[-2000:]
    retrained = {st for st, files in _model_files(home).items() if files != models[st]}
    assert retrained == changed, (retrained, changed)
    assert "NOT current" not in again.stdout
    print(f"tau 0.05 -> 5.0 changed the kept set of {sorted(changed) or 'no strategy'}; retrained {sorted(retrained)}")
