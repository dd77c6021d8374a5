"""The ``dbprune`` command: run, sample-pool, sql, report, ui, daemon, worker.

A failure prints one line (``dbprune: error: …``; OS errors with the file, the
cause and what to do) and exits non-zero; ``-v`` also prints the traceback.
Exit codes: 1 a run failed, 2 bad settings or usage, 75 the home is busy
(another ``dbprune run`` holds its lock, ``--wait``; or, for ``dbprune
daemon``, a daemon already serves its instance).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from dbprune_assets.codelocation import workspace_args
from dbprune_assets.core.store.homepool import HomePoolError, check_home_pool, remember_pool
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.settings import PipelineSettings, SettingsError, build_settings, changed_settings
from dbprune_assets.summary import print_summary


#: exit status when another process holds the home's lock (EX_TEMPFAIL)
EXIT_BUSY = 75
_NO_HOME = "{home} is not a dbprune home yet (no such folder); run `dbprune run` first or set DBPRUNE_HOME"


def _err(msg: str, status: int = 2) -> int:
    print(f"dbprune: error: {msg}", file=sys.stderr)
    return status


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value < 0:  # not a number, NaN or negative
        raise argparse.ArgumentTypeError(f"--wait takes seconds >= 0 or inf, not {text!r}")
    return value


def resolve_settings(layout: Layout, config: Path | None, profile: str | None) -> tuple[PipelineSettings, str]:
    """--config FILE, else the saved config.yaml, else the profile that fits the
    pool; and the line saying which profile that is and why."""
    from dbprune_assets.core.settings import choose_settings

    return choose_settings(config, profile, layout.pool, layout.config_file)


def run_overrides(layout: Layout, settings: PipelineSettings, refit: str | None,
                  centroids_from: str | None) -> PipelineSettings:
    """``--refit`` and ``--centroids-from`` set the settings of the same names
    (saved with the others, so later runs keep them; ``--centroids-from none``
    clears it).  Another home must hold both fits."""
    from dbprune_assets.core.method.fitrecord import record_path
    from dbprune_assets.core.settings import SettingsError

    update: dict[str, object] = {}
    if refit is not None:
        update["refit"] = refit
    if centroids_from is not None:
        source = None if centroids_from.lower() == "none" else Path(centroids_from).expanduser().resolve()
        if source is not None:
            if source == layout.home:
                raise SettingsError(f"--centroids-from {source} is this home; name another home, or leave it out")
            missing = [str(record_path(source, a)) for a in ("dedup_centroids", "centroids")
                       if not record_path(source, a).is_file()]
            if missing:
                raise SettingsError(f"--centroids-from {source}: no fit there ({', '.join(missing)} missing); "
                                    "run dbprune run in that home first, or name the home that has them")
        update["centroids_from"] = str(source) if source else None
    return settings.model_copy(update=update) if update else settings


def preflight(layout: Layout, settings: PipelineSettings) -> None:
    """Checks that need the file system or the registries, before any run starts."""
    from dbprune_assets.core.pool.sources import registry as sources
    from dbprune_assets.core.settings import SettingsError

    sources.check_setting(settings)

    for name, spec in (("cluster_encoder", settings.encoder.cluster_encoder), ("score_encoder", settings.encoder.score_encoder)):
        if spec is None or spec.is_bootstrap:
            continue
        if spec.model.startswith("local-dir:") and not (Path(spec.model[len("local-dir:"):]).expanduser() / "open_clip_config.json").is_file():
            raise SettingsError(
                f"encoder.{name}.model: {spec.model[len('local-dir:'):]} is not an open_clip folder (no such folder, or "
                "no open_clip_config.json in it); set local-dir: to an existing open_clip folder, an open_clip "
                "architecture with a pretrained tag or checkpoint, an hf-hub: id, or model: bootstrap"
            )
        p = spec.pretrained
        if p and ("/" in p or p.endswith((".pt", ".bin", ".safetensors", ".pth"))) and not Path(p).expanduser().exists():
            raise SettingsError(
                f"encoder.{name}.pretrained: checkpoint {p} does not exist; set an existing checkpoint path, "
                "an open_clip pretrained tag, or model: bootstrap"
            )
    folders = [*(settings.eval.datasets or ()), *(p for p in (settings.eval.zeroshot, settings.eval.retrieval) if p)]
    if folders:  # checked before any run: a bad folder would otherwise fail only at eval_scores
        from dbprune_assets.core.models.evaluate import EvalError, find_eval_datasets

        try:
            find_eval_datasets(folders)
        except EvalError as e:
            raise SettingsError(f"eval.datasets: {e}") from None


def ensure_pool(layout: Layout, settings: PipelineSettings, echo=print) -> None:
    """The pool folder as it must be before any run: generated when absent
    (the sample pool), else a folder holding shards."""
    from dbprune_assets.core.store.layout import list_pool_shards

    if layout.pool.exists():
        if not layout.pool.is_dir():
            raise SettingsError(f"the pool {layout.pool} is a file, not a folder: point DBPRUNE_POOL at the folder "
                                "of the shards (img2dataset's NNNNN.tar + NNNNN.parquet, or DataComp's "
                                "<stem>.parquet + <stem>.npz)")
        if not list_pool_shards(layout.pool):
            raise SettingsError(f"the pool {layout.pool} holds no shard (no *.parquet at its top level): point "
                                "DBPRUNE_POOL at the folder of the shards (img2dataset's NNNNN.tar + "
                                "NNNNN.parquet, or DataComp's <stem>.parquet + <stem>.npz), or remove the folder "
                                "to have the sample pool generated there")
        return
    if os.environ.get("DBPRUNE_POOL"):
        raise SettingsError(
            f"DBPRUNE_POOL={layout.pool} does not exist; point it at a folder of img2dataset shards "
            "(NNNNN.tar + NNNNN.parquet) or unset it to use the generated sample pool"
        )
    from dbprune_assets.samplepool import write_sample_pool

    echo(f"generating the sample pool in {layout.pool} …")
    summary = write_sample_pool(layout.pool, settings.pool, tmp_root=layout.tmp)
    echo(f"  {summary}")


def cmd_run(args: argparse.Namespace) -> int:
    """One writer per home: everything from reading the saved settings to the
    last step runs under the home's lock, so a second run refuses (or waits,
    ``--wait``) and never mixes its settings or results with this one's."""
    from dbprune_assets.core.running.homelock import home_lock

    layout = Layout.from_env()
    layout.home.mkdir(parents=True, exist_ok=True)

    def waiting(holder) -> None:
        who = holder.describe() if holder is not None else "another process"
        limit = "as long as it takes" if args.wait == float("inf") else f"up to {args.wait:.0f}s"
        print(f"dbprune: {layout.home} is being written by {who}; waiting ({limit}) …", file=sys.stderr)

    with home_lock(layout.lock_file, wait_s=args.wait, on_wait=waiting):
        return _run_locked(layout, args)


def _run_locked(layout: Layout, args: argparse.Namespace) -> int:
    from dbprune_assets.core.store.atomic import write_bytes
    from dbprune_assets.runner import run_pipeline

    try:
        settings, why = resolve_settings(layout, args.config, args.profile)
        settings = run_overrides(layout, settings, args.refit, args.centroids_from)
        preflight(layout, settings)
        moved = check_home_pool(layout, bool(os.environ.get("DBPRUNE_POOL")))
        ensure_pool(layout, settings)
    except (SettingsError, HomePoolError) as e:
        return _err(str(e))
    remember_pool(layout)
    changes = changed_settings(layout.config_file, settings)
    write_bytes(layout.config_file, settings.to_yaml().encode(), layout.tmp)
    print(f"dbprune: home {layout.home}, pool {layout.pool}, profile {settings.profile} "
          f"(settings saved to {layout.config_file})")
    print(f"dbprune: {why}" + (f"\ndbprune: {moved}" if moved else ""))
    if changes:  # --config replaces the saved settings: say what that changes
        print(f"dbprune: settings changed since the last run: {'; '.join(changes[:8])}{' …' if changes[8:] else ''}")
    report = run_pipeline(layout, settings, select=args.select, force=args.force,
                          log_level="DEBUG" if args.verbose > 1 else "INFO" if args.verbose else None)
    print_summary(layout, report)
    return 0 if report.ok else 1


def cmd_sample_pool(args: argparse.Namespace) -> int:
    from dbprune_assets.samplepool import write_datacomp_pool, write_sample_pool

    layout = Layout.from_env()
    out = Path(args.out).resolve() if args.out else layout.pool
    if args.format == "datacomp":
        images_only = [f for f, v in (("--image-size", args.image_size), ("--reference-samples", args.reference_samples))
                       if v is not None]
        if images_only:
            return _err(f"{' and '.join(images_only)} do not apply to --format datacomp (it writes embeddings, "
                        "no images and no reference split); drop them or use --format webdataset")
    over = {k: v for k, v in {
        "shards": args.shards, "samples_per_shard": args.samples_per_shard, "concepts": args.concepts,
        "image_size": args.image_size, "reference_samples": args.reference_samples, "seed": args.seed,
    }.items() if v is not None}
    try:
        base = build_settings({}, profile="sample").pool
        pool_settings = base.model_copy(update=over)
        type(base).model_validate(pool_settings.model_dump())
    except Exception as e:  # pydantic ValidationError
        return _err(str(e))
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            return _err(f"{out} exists and is not empty; pass --overwrite to replace it")
    from dbprune_assets.core.running.homelock import home_lock

    # a pool inside the home is written under its lock, like a run
    with home_lock(layout.lock_file) if out.is_relative_to(layout.home) else contextlib.nullcontext():
        write = write_datacomp_pool if args.format == "datacomp" else write_sample_pool
        summary = write(out, pool_settings, tmp_root=layout.tmp if not args.out else None)
    print(summary)
    return 0


def _stopped(msg: str, status: int) -> None:
    """Say why a query was stopped and exit at once: DuckDB's own threads may
    still be winding the interrupted query down, and must not meet the
    interpreter's shutdown."""
    _err(msg, status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def cmd_sql(args: argparse.Namespace) -> int:
    import polars as pl

    from dbprune_assets.core.store.catalog import QueryRefused, QueryTimeout, ensure_catalog, query

    layout = Layout.from_env()
    if not layout.home.is_dir():
        return _err(_NO_HOME.format(home=layout.home))
    try:
        ensure_catalog(layout, timeout_s=5)  # writes the catalog only when a view is out of date
        table = query(layout, args.query, query_timeout_s=args.timeout)  # read-only, sandboxed; never waits on the lock
    except QueryRefused as e:
        return _err(f"SQL refused: {e}")
    except QueryTimeout as e:
        _stopped(f"SQL stopped: {e}", 124)
    except KeyboardInterrupt:
        _stopped("SQL stopped: interrupted (Ctrl-C)", 130)
    except OSError:
        raise  # explained by main()
    except Exception as e:
        return _err(f"SQL failed: {e}")
    df = pl.from_arrow(table)
    if args.format == "csv":
        sys.stdout.write(df.write_csv())
    else:
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(df)
    return 0


def _serve_env(layout: Layout) -> None:
    """The environment the Dagster processes of ``dbprune ui`` and ``dbprune daemon`` serve this home in."""
    # refused (HomePoolError) when the home holds another pool's results: the pool sensor would drop them
    if moved := check_home_pool(layout, bool(os.environ.get("DBPRUNE_POOL"))):
        print(f"dbprune: {moved}", flush=True)
    remember_pool(layout)
    os.environ["DAGSTER_HOME"] = str(layout.dagster_home)
    os.environ["DBPRUNE_HOME"] = str(layout.home)
    os.environ["DBPRUNE_POOL"] = str(layout.pool)
    # their `python -m` would put the current folder first on sys.path: a gql.py or dagster/ there
    # would replace Dagster's own modules
    os.environ["PYTHONSAFEPATH"] = "1"


def cmd_ui(args: argparse.Namespace) -> int:
    """``dagster dev`` (webserver and daemon) on this home's instance; the
    webserver alone when a daemon already serves the instance (Dagster
    supports one daemon per instance)."""
    from dbprune_assets import servers
    from dbprune_assets.cluster.instance import dagster_instance

    if taken := servers.port_taken(args.host, args.port):
        return _err(f"cannot serve the UI on {args.host}:{args.port}: {taken} (another `dbprune ui` or "
                    "program listens there): pick another port with --port", EXIT_BUSY)
    layout = Layout.from_env()
    instance = dagster_instance(layout)  # creates the instance folder and its dagster.yaml
    try:
        seen = servers.running_daemon(instance)
    finally:
        instance.dispose()
    _serve_env(layout)  # dagster dev serves this instance
    if seen is not None:
        print(servers.ui_alone_line(seen, layout.dagster_home), flush=True)
    print(f"dbprune: Dagster UI on http://{args.host}:{args.port} (instance {layout.dagster_home})", flush=True)
    rc = servers.supervise(servers.ui_argv(args.host, args.port, with_daemon=seen is None,
                                           location=workspace_args(layout)))  # the location the runs name
    if seen is None:
        servers.forget_stopped_daemon(layout.dagster_home)  # its daemon stopped with it
    if rc:
        print(servers.ended_line("the Dagster UI", rc), file=sys.stderr, flush=True)
    return rc


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker executing dbprune runs (README "Many machines")."""
    from dbprune_assets.cluster.instance import ClusterError
    from dbprune_assets.cluster.worker import run_worker

    try:
        return run_worker(args.queue, concurrency=args.concurrency, name=args.name, loglevel=args.loglevel)
    except ClusterError as e:
        return _err(str(e))


def cmd_daemon(args: argparse.Namespace) -> int:
    """``dagster-daemon run`` on this home's instance: sensors, schedules and
    backfills launched from the UI (``dbprune run`` itself needs no daemon).
    Refused (exit status 75) while a daemon already serves the instance:
    ``dbprune ui`` runs one, and Dagster supports one per instance."""
    from dbprune_assets import servers
    from dbprune_assets.cluster.instance import ClusterError, dagster_instance

    layout = Layout.from_env()
    try:
        instance = dagster_instance(layout)  # writes the instance's dagster.yaml; a database or broker that is down stops here
    except ClusterError as e:
        return _err(str(e))
    try:
        seen = servers.running_daemon(instance)
    finally:
        instance.dispose()
    if seen is not None:
        return _err(servers.daemon_refusal(seen, layout.dagster_home), EXIT_BUSY)
    _serve_env(layout)
    print(f"dbprune: Dagster daemon on instance {layout.dagster_home}", flush=True)
    rc = servers.supervise(servers.daemon_argv(location=workspace_args(layout)))
    servers.forget_stopped_daemon(layout.dagster_home)
    if rc:
        print(servers.ended_line("the Dagster daemon", rc), file=sys.stderr, flush=True)
    return rc


def cmd_report(args: argparse.Namespace) -> int:
    from dbprune_assets.core.report.page import write_report
    from dbprune_assets.defs.common import with_fact
    from dbprune_assets.definitions import asset_nodes

    layout = Layout.from_env()
    if not layout.home.is_dir():
        return _err(_NO_HOME.format(home=layout.home))
    page = write_report(layout, with_fact(asset_nodes(), "plots"), args.name)
    print(page)
    if args.open:
        import webbrowser

        # a browser started from here opens file:// URLs; from the web UI's pages it refuses them
        if not webbrowser.open(page.as_uri()):
            print(f"dbprune: no browser found on this machine: open {page} in one (it is one self-contained "
                  "file; copy it where a browser runs)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbprune", description="Density-Based Pruning of image-text pools (Dagster).")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="materialise the asset graph (skips up-to-date partitions)")
    r.add_argument("--config", type=Path, help="YAML of pipeline settings (a profile plus overrides)")
    r.add_argument("--profile", choices=["paper", "sample"], help="start from this profile (default: the one that fits the pool)")
    r.add_argument("--select", help="asset selection, as `dagster asset materialize --select` (e.g. '*pruned_subset')")
    r.add_argument("--force", action="store_true", help="redo selected partitions even when up to date (a k-means "
                   "fit made before is still kept as refit says: add --refit always to fit again)")
    r.add_argument("--refit", choices=["auto", "always", "never"],
                   help="once clusters exist, added shards are assigned to them: always refits, never keeps the "
                        "fits, auto (default) refits when the drift alarm fires (sets the setting refit)")
    r.add_argument("--centroids-from", metavar="HOME",
                   help="use another home's SemDeDup and DBP fits (sets centroids_from; 'none' clears it)")
    r.add_argument("--wait", type=_wait_seconds, default=0.0, metavar="SECONDS",
                   help="when another dbprune run writes the same home, wait up to SECONDS for it "
                        "(inf: as long as it takes; default 0: refuse at once, exit status 75)")
    r.add_argument("-v", "--verbose", action="count", default=0,
                   help="also print Dagster's log lines (-vv: debug); they are always in each run's log (dbprune ui)")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("sample-pool", help="write the synthetic sample pool (img2dataset layout, or DataComp metadata)")
    s.add_argument("--out", help="folder (default $DBPRUNE_POOL or $DBPRUNE_HOME/pool)")
    s.add_argument("--format", choices=["webdataset", "datacomp"], default="webdataset",
                   help="webdataset: images in img2dataset shards (default); datacomp: DataComp metadata shards "
                        "(<stem>.parquet + <stem>.npz with b32/l14 CLIP embeddings), no images, no encoder needed")
    s.add_argument("--shards", type=int)
    s.add_argument("--samples-per-shard", type=int)
    s.add_argument("--concepts", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--reference-samples", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_sample_pool)

    from dbprune_assets.core.store.sandbox import ALLOWED_WORDS, DEFAULT_TIMEOUT_S

    q = sub.add_parser("sql", help="query the DuckDB catalog (read-only)",
                       description=f"Read-only SQL over the catalog's views: {ALLOWED_WORDS}.")
    q.add_argument("query")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"stop the query after this many seconds (default {DEFAULT_TIMEOUT_S:g}); Ctrl-C stops it too")
    q.add_argument("--format", choices=["table", "csv"], default="table")
    q.add_argument("--max-rows", type=int, default=50, help="rows the table shows (default 50; csv prints all)")
    q.set_defaults(fn=cmd_sql)

    u = sub.add_parser("ui", help="the Dagster UI on the same instance as dbprune run")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=3000)
    u.set_defaults(fn=cmd_ui)

    w = sub.add_parser("worker", help="a Celery worker that executes dbprune runs (needs DBPRUNE_BROKER and DBPRUNE_POSTGRES_URL)")
    w.add_argument("--queue", action="append", choices=["gpu", "cpu"],
                   help="a queue to serve; repeat for both (default: gpu and cpu where torch sees a GPU, else cpu)")
    w.add_argument("--concurrency", type=int, default=1, help="runs at a time (default 1: a run uses the GPU or every core)")
    w.add_argument("--name", help="Celery node name, NAME or NAME@HOST (default dbprune-<pid>@<host name>)")
    w.add_argument("--loglevel", default="INFO", help="Celery's log level (default INFO)")
    w.set_defaults(fn=cmd_worker)

    dmn = sub.add_parser("daemon", help="the Dagster daemon on the same instance (sensors, schedules, UI backfills)")
    dmn.set_defaults(fn=cmd_daemon)

    rep = sub.add_parser("report", help="write one static HTML page of the run: plots, clusters, examples, comparison")
    rep.add_argument("--name", help="file name under $DBPRUNE_HOME/reports/ (default: the current time)")
    rep.add_argument("--open", action="store_true", help="then open it in this machine's web browser ($BROWSER)")
    rep.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; any error becomes one line (``-v``: and its traceback)."""
    from dbprune_assets.core.running.homelock import HomeBusy
    from dbprune_assets.core.running.oserrors import explain

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except HomeBusy as e:
        return _err(str(e), EXIT_BUSY)
    except (HomePoolError, SettingsError) as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return _err("interrupted", 130)
    except BrokenPipeError:  # the reader left (`dbprune sql … | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if getattr(args, "verbose", 0):
            import traceback

            traceback.print_exc()
        hint = "" if getattr(args, "verbose", 0) or args.command != "run" else " (run with -v for the traceback)"
        return _err((explain(e, Layout.from_env().home) or f"{type(e).__name__}: {e}") + hint, 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
