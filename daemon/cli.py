r"""The ``upscaled`` command line: a thin layer over the library.

Commands parse options, call :mod:`daemon.service`, :mod:`daemon.history` or :mod:`models.weights`, and turn
:class:`~models.errors.UpscaledError` into a clean ``click`` error. Every listing command takes
``--format table|json|csv``.

What the history holds was partly written by strangers: file names come from whoever drops a file in the inbox. So
every value printed is made printable first (:func:`printable`: a terminal escape, a newline or a byte that is not
UTF-8 is shown as ``\x1b``, ``\n``, ``\xff``), in tables and CSV alike; JSON escapes them itself. Every command
that loads the settings applies their ``umask`` before it creates anything, as the service does, and the readers
(``history``, ``stats``, ``report``, ``query``, ``nodes``, ``web``) open the database read-only: they never create,
migrate or change it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from daemon import __version__, logs
from daemon.config import Rule, Settings, load_settings
from daemon.fsops import display as printable
from daemon.media.formats import OUTPUT_FORMATS
from models.errors import UpscaledError


# --- output formatting ----------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    s = printable(str(v))
    return s if len(s) <= 60 else s[:57] + "..."


def _csv_value(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return _json_default(v)
    if isinstance(v, str | bytes | Path):
        return printable(str(v) if not isinstance(v, bytes) else repr(v))
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """``rows`` as a table, CSV or JSON. Every string is printable whatever it holds (see :func:`printable`): one
    row is one line in a table and one record in CSV, and no value can drive the terminal."""
    if fmt == "json":
        clean = [
            {k: (None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v) for k, v in r.items()}
            for r in rows
        ]
        return json.dumps(clean, indent=2, default=_json_default)
    if not rows:
        return "" if fmt == "csv" else "(no rows)"
    cols = [printable(str(c)) for c in rows[0].keys()]
    keys = list(rows[0].keys())
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_csv_value(r.get(k)) for k in keys])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def output_options(fn: Callable) -> Callable:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json", "csv"]),
        default="table",
        show_default=True,
        help="Output format.",
    )(fn)


def _settings(ctx: click.Context, check_paths: bool = True) -> Settings:
    """The settings, with their ``umask`` applied to this process before anything is created (a database, a report,
    a weight file, an output), as the service applies it.

    Raises:
        click.ClickException: the configuration is missing or invalid.
    """
    try:
        settings = load_settings(ctx.obj.get("config"), check_paths=check_paths)
    except UpscaledError as exc:
        raise click.ClickException(printable(str(exc), keep_newlines=True)) from None
    os.umask(int(settings.umask, 8))
    return settings


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UpscaledError as exc:  # messages may quote a stranger's file name: printable, our line breaks kept
            raise click.ClickException(printable(str(exc), keep_newlines=True)) from None


# --- commands -------------------------------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    envvar="UPSCALED_CONFIG",
    help="The settings file (default: $UPSCALED_CONFIG, else ./settings.toml).",
)
@click.version_option(__version__, prog_name="upscaled")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """upscaled: a watch-folder image upscaling service with a queryable history.

    Example: upscaled run
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    from daemon import failpoints

    try:
        failpoints.arm()  # only under the test switch UPSCALED_FAILPOINTS_TEST=1; nothing otherwise
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the service in the foreground until SIGTERM or SIGINT.

    Example: UPSCALED_CONFIG=/etc/upscaled/settings.toml upscaled run
    """
    from daemon.service import Service

    settings = _settings(ctx)
    logs.configure(settings.log_level, settings.log_format)
    sys.exit(Service(settings).run())


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Check the configuration as `run` would, without starting.

    Example: upscaled check-config
    """
    from daemon.service import check_devices
    from models.weights import entry_for, needs_weights, present

    settings = _settings(ctx)
    check_devices(settings)  # a GPU that is not there stops `run` too
    click.echo(f"{settings.config_file}: OK")
    folders = (
        "all rule folders"
        if settings.serve_folders is None
        else ", ".join(f or "(default)" for f in settings.serve_folders)
    )
    click.echo(
        f"  node {settings.node()}: {settings.worker_count()} worker(s) on each of "
        f"{', '.join(settings.devices())}; serves {folders}"
    )
    for rule in settings.all_rules():
        entry = entry_for(rule.model, settings.weights_dir)  # omdb: entries were checked by _settings
        weights = (
            "weights present"
            if present(settings.weights_dir, entry)
            else f"WEIGHTS MISSING: run `upscaled weights fetch {rule.model}`"
        )
        click.echo(
            f"  {rule.folder or '(default)'}: {rule.model} x{rule.final_scale:g} {rule.mode}"
            f" -> {rule.format or 'same format'}; {weights if needs_weights(entry) else 'no weights needed'}"
            f"; licence {entry.license}"
        )


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="Model id (see `upscaled models`).")
@click.option("--scale", type=float, default=None, help="The model's native scale (default: its first).")
@click.option("--outscale", type=float, default=None, help="Final scale, if different from --scale.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder for the outputs.",
)
@click.option("--mode", type=click.Choice(["upscale", "benchmark"]), default="upscale", show_default=True)
@click.option(
    "--output-format",
    type=click.Choice(OUTPUT_FORMATS),
    default=None,
    help="Output format (default: the input's).",
)
@click.option("--no-metrics", is_flag=True, help="Record stage times only.")
@click.option("--force", is_flag=True, help="Redo files already processed with the same settings.")
@output_options
@click.pass_context
def process(
    ctx: click.Context,
    files: tuple[Path, ...],
    model: str,
    scale: float | None,
    outscale: float | None,
    out_dir: Path,
    mode: str,
    output_format: str | None,
    no_metrics: bool,
    force: bool,
    fmt: str,
) -> None:
    """Upscale FILES once, through the service's pipeline, recorded in the same history.

    The inputs are left where they are.

    Example: upscaled process photo.jpg --model fsrcnn --scale 4 --out upscaled/
    """
    from daemon.oneshot import process as process_files
    from models.weights import entry_for

    settings = _settings(ctx, check_paths=False)
    logs.configure(settings.log_level, settings.log_format, stream=sys.stderr)  # stdout is the report
    entry = entry_for(model, settings.weights_dir)  # an omdb: model's scale is in its cached entry
    if scale is None:
        scale = entry.scales[0] if isinstance(entry.scales, tuple) and entry.scales else 2.0
    try:
        rule = Rule(
            model=model,
            scale=scale,
            outscale=outscale,
            mode=mode,
            format=output_format,
            metrics=[] if no_metrics else None,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc).split("\n", 1)[-1]) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = process_files(settings, list(files), rule, out_dir, force=force)
    click.echo(render(reports, fmt))
    if any(r["state"] == "failed" for r in reports):
        sys.exit(1)


@main.command("history")
@click.option("--model", default=None, help="Only this model id.")
@click.option("--folder", default=None, help="Only this rule folder ('' for the default rule).")
@click.option("--status", type=click.Choice(["pending", "running", "done", "failed"]), default=None)
@click.option("--since", default=None, help="Only jobs newer than this: 90s, 30m, 2h, 7d or an ISO date.")
@click.option("--limit", type=int, default=50, show_default=True)
@output_options
@click.pass_context
def history_cmd(
    ctx: click.Context,
    model: str | None,
    folder: str | None,
    status: str | None,
    since: str | None,
    limit: int,
    fmt: str,
) -> None:
    """List jobs, newest first, with their times and main metrics.

    Example: upscaled history --model fsrcnn --since 2h --format json
    """
    from daemon.history import history

    engine = _engine(ctx)
    click.echo(render(history(engine, model, folder, status, since, limit), fmt))


def _engine(ctx: click.Context):  # noqa: ANN202
    """A read-only engine on the history: readers never create, migrate or change the database."""
    from daemon.store import make_engine

    settings = _settings(ctx, check_paths=False)
    try:
        return make_engine(settings.database, readonly=True)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc}: the service has not run with this configuration yet") from None


@main.command()
@click.option("--model", default=None)
@click.option("--folder", default=None)
@click.option("--since", default=None, help="90s, 30m, 2h, 7d or an ISO date.")
@output_options
@click.pass_context
def stats(ctx: click.Context, model: str | None, folder: str | None, since: str | None, fmt: str) -> None:
    """Per model and folder: jobs, failures, mean/p50/p95 seconds and mean metrics.

    Example: upscaled stats --since 7d
    """
    from daemon.history import stats as compute

    click.echo(render(compute(_engine(ctx), model, folder, since), fmt))


@main.command()
@click.argument("sql")
@click.option("-p", "--param", "params", type=(str, str), multiple=True, help="A named parameter: -p name value.")
@output_options
@click.pass_context
def query(ctx: click.Context, sql: str, params: tuple[tuple[str, str], ...], fmt: str) -> None:
    """Run one read-only SQL statement against the history.

    Tables: jobs, metrics, bench_runs, meta. Views: job_metrics, model_summary, recent_jobs.

    Example: upscaled query "SELECT model_id, AVG(t_total) FROM jobs WHERE folder = :f GROUP BY 1" -p f photos
    """
    from daemon.history import query as run_query

    settings = _settings(ctx, check_paths=False)
    click.echo(render(run_query(settings.database, sql, dict(params)), fmt))


@main.group(invoke_without_command=True)
@output_options
@click.pass_context
def models(ctx: click.Context, fmt: str) -> None:
    """List every catalogue model, its scales, licence, and whether its weights are here.

    `models search` and `models show` look through OpenModelDB's entries (omdb:<id> models).

    Example: upscaled models --format json
    """
    if ctx.invoked_subcommand is not None:
        return
    from models.catalog import ENTRIES
    from models.weights import needs_weights, present

    settings = _settings(ctx, check_paths=False)
    rows = []
    for e in ENTRIES:
        scales = "any" if isinstance(e.scales, str) else ",".join(f"x{s}" for s in e.scales) or "-"
        weights = ("present" if present(settings.weights_dir, e) else "missing") if needs_weights(e) else "-"
        rows.append(
            dict(
                id=e.id, backend=e.backend, scales=scales, weights=weights, license=e.license, description=e.description
            )
        )
    click.echo(render(rows, fmt))


@models.command("search")
@click.argument("text", required=False, default="")
@click.option("--tag", default=None, help="Only entries with this tag (photo, anime, restoration, ...).")
@click.option("--arch", default=None, help="Only this architecture (esrgan, compact, span, realplksr, ...).")
@click.option("--scale", type=int, default=None, help="Only this scale.")
@click.option("--update", is_flag=True, help="Refresh the cached index from model_index_url first.")
@output_options
@click.pass_context
def models_search(
    ctx: click.Context, text: str, tag: str | None, arch: str | None, scale: int | None, update: bool, fmt: str
) -> None:
    """List the OpenModelDB entries of the cached index that match TEXT (every word) and the filters.

    The index is downloaded from model_index_url when none is cached (or with --update). Each row says whether the
    file has a direct link (`upscaled weights fetch omdb:<id>` gets it) or needs a browser.

    Example: upscaled models search nomos --tag photo --scale 4
    """
    from models import omdb

    settings = _settings(ctx, check_paths=False)
    index = omdb.load_index(settings.weights_dir)
    if index is None or update:
        index = omdb.refresh(settings.weights_dir, settings.model_index_url)
    found = omdb.search(index, text, tag=tag, arch=arch, scale=scale)
    click.echo(render([omdb.row(m) for m in found], fmt))


@models.command("show")
@click.argument("model_id")
@output_options
@click.pass_context
def models_show(ctx: click.Context, model_id: str, fmt: str) -> None:
    """Show one OpenModelDB entry of the cached index: licence, architecture, scale, file, sha256, link.

    Example: upscaled models show omdb:4x-Nomos8kSC
    """
    from models import omdb

    settings = _settings(ctx, check_paths=False)
    model, index = omdb.model_for(model_id, settings.weights_dir)
    details = omdb.details(model, index, settings.weights_dir)
    if fmt == "table":
        click.echo(
            "\n".join(f"{k:>22}  {printable(str(v), keep_newlines=k == 'description')}" for k, v in details.items())
        )
    else:
        click.echo(render([details], fmt))


@main.group()
def weights() -> None:
    """Fetch and verify model weights.

    Example: upscaled weights fetch fsrcnn --mirror /srv/mirror/weights
    """


@weights.command("fetch")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every catalogue model with weight files.")
@click.option("--mirror", default=None, help="A folder or base URL laid out like weights/ (default: the setting).")
@click.option("--force", is_flag=True, help="Download again even if a good copy is present.")
@click.option(
    "--trust-unhashed",
    is_flag=True,
    help="Accept files the catalogue publishes no sha256 for (EDSR, ai-forever's Real-ESRGAN): what the "
    "source serves is recorded with its hash, logged, and held to from then on.",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=1),
    default=None,
    help="Seconds each download may take in all (default: 120, or longer for large files).",
)
@output_options
@click.pass_context
def weights_fetch(
    ctx: click.Context,
    ids: tuple[str, ...],
    all_: bool,
    mirror: str | None,
    force: bool,
    trust_unhashed: bool,
    deadline: float | None,
    fmt: str,
) -> None:
    """Download weights into weights_dir and check their sha256.

    A file without a published sha256 is refused unless --trust-unhashed is given. Downloads are capped at the
    catalogued size (with a margin) and a deadline. omdb:<id> refreshes the cached OpenModelDB index from
    model_index_url, then fetches the entry's file. Exits 1 if any file could not be fetched or verified.

    Example: upscaled weights fetch fsrcnn espcn brisque omdb:4x-Nomos8kSC --mirror ../shared/weights
    """
    from models.catalog import ENTRIES
    from models.weights import fetch

    settings = _settings(ctx, check_paths=False)
    if not ids and not all_:
        raise click.UsageError("name model ids, or pass --all")
    chosen = [e.id for e in ENTRIES if e.files] if all_ else list(ids)
    if mirror and "://" not in mirror:
        mirror = str(Path(mirror).resolve())
    logs.configure(settings.log_level, settings.log_format, stream=sys.stderr)  # stdout is the report
    reports = fetch(
        settings.weights_dir,
        chosen,
        mirror or settings.weights_mirror or None,
        force=force,
        trust_unhashed=trust_unhashed,
        index_url=settings.model_index_url,
        deadline=deadline,
    )
    for r in reports:
        if r.status == "recorded":  # the user's word stood in for a published hash: say so where it is kept
            logs.get().warning(
                "weights.trusted_unhashed",
                model=r.model_id,
                path=r.path,
                detail=r.detail,
                note="no published sha256; accepted on --trust-unhashed and recorded in recorded-sha256.json",
            )
    click.echo(render([r.__dict__ for r in reports], fmt))
    if any(r.status == "failed" for r in reports):
        sys.exit(1)


@weights.command("verify")
@click.argument("ids", nargs=-1)
@output_options
@click.pass_context
def weights_verify(ctx: click.Context, ids: tuple[str, ...], fmt: str) -> None:
    """Check the weight files that are present against their sha256.

    present: matches the published sha256; trusted: matches the one recorded with --trust-unhashed; unverified:
    nothing to check it against. Exits 1 on a mismatch or an unverified file; missing files are listed but are not
    an error.

    Example: upscaled weights verify
    """
    from models.weights import verify

    settings = _settings(ctx, check_paths=False)
    reports = verify(settings.weights_dir, list(ids) or None)
    click.echo(render([r.__dict__ for r in reports], fmt))
    if any(r.status in ("mismatch", "unverified") for r in reports):
        sys.exit(1)


@main.command()
@click.option(
    "--dataset",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="HR images in DIR/HR (or directly in DIR); shipped LR images in DIR/LR_bicubic/X{s}.",
)
@click.option(
    "--models",
    "models_",
    default="bicubic,fsrcnn,espcn,lapsrn",
    show_default=True,
    help="Comma-separated model ids; those that cannot run a scale are skipped, and say why.",
)
@click.option("--scales", default="2,3,4", show_default=True, help="Comma-separated integer scales.")
@click.option(
    "--downscale",
    type=click.Choice(["auto", "shipped", "matlab-bicubic", "cv2-cubic", "area"]),
    default="auto",
    show_default=True,
    help="How the LR images are made: auto uses the shipped LR_bicubic/X{s} images where the dataset "
    "has them all, else matlab-bicubic.",
)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the `device` setting).")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Timed runs per image; the median is kept.",
)
@click.option("--no-brisque", is_flag=True, help="Leave out BRISQUE (the slowest metric).")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a self-contained HTML report here.",
)
@click.option(
    "--frontier",
    "show_frontier",
    is_flag=True,
    help="Print quality against cost instead: per scale, PSNR-Y, SSIM-Y, BRISQUE and s/MP, and which models no "
    "other beats on both quality and speed.",
)
@output_options
@click.pass_context
def bench(
    ctx: click.Context,
    dataset: Path,
    models_: str,
    scales: str,
    downscale: str,
    device: str | None,
    repeat: int,
    no_brisque: bool,
    report_path: Path | None,
    show_frontier: bool,
    fmt: str,
) -> None:
    """Compare models on a dataset with the papers' protocol: one row per model and scale.

    Measures psnr_y, ssim_y (BT.601 Y, border shaved by the scale), psnr_rgb, ssim_rgb, mse_rgb, BRISQUE and the
    warm time per image, the model load timed apart. The run and its rows go into the history (source "bench").
    Progress goes to stderr: a bar on a terminal, log lines otherwise.

    Example: upscaled bench --dataset ../shared/datasets/Set5 --models bicubic,fsrcnn,espcn --report bench.html
    """
    import shlex

    from bench.run import BenchSettings, run_bench
    from daemon.config import check_device
    from daemon.store import SqlStore

    settings = _settings(ctx, check_paths=False)
    try:
        scale_list = tuple(int(v) for v in scales.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers such as 2,3,4, got {scales!r}", param_hint="--scales"
        ) from None
    try:
        device = check_device(device) if device else settings.default_device
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    model_list = tuple(dict.fromkeys(m.strip() for m in models_.split(",") if m.strip()))
    bench_settings = BenchSettings(
        dataset=dataset,
        models=model_list,
        scales=tuple(dict.fromkeys(scale_list)),
        weights_dir=settings.weights_dir,
        downscale=downscale,
        device=device,
        repeat=repeat,
        brisque=not no_brisque,
        max_pixels=settings.max_pixels,
    )
    store = SqlStore(settings.database)
    try:
        result = run_bench(bench_settings, store)
    finally:
        store.close()
    if report_path is not None:
        from bench.report import bench_report

        bench_report(result, report_path, command="upscaled " + shlex.join(sys.argv[1:]))
        if result.run_id is not None:  # the web view's /bench links each run to its report
            store = SqlStore(settings.database, upgrade=False)
            try:
                store.set_bench_report(result.run_id, str(report_path.resolve()))
            finally:
                store.close()
        click.echo(f"report: {report_path}", err=True)
    if show_frontier:
        from bench.run import frontier

        click.echo(render(frontier(result.summary), fmt))
    elif fmt == "json":
        click.echo(json.dumps(result.to_json(), indent=2, default=_json_default))
    else:
        click.echo(render(result.summary, fmt))


@main.command()
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("upscaled-report.html"),
    show_default=True,
    help="Where to write the HTML file.",
)
@click.option("--since", default=None, help="Only jobs newer than this: 90s, 30m, 2h, 7d or an ISO date.")
@click.option("--include-bench", is_flag=True, help="Count `upscaled bench` runs too (left out by default).")
@click.pass_context
def report(ctx: click.Context, out: Path, since: str | None, include_bench: bool) -> None:
    """Write a self-contained HTML report of the service's history.

    Throughput over time, job time per model, failures by reason, and metric distributions per folder and rule.

    Example: upscaled report --since 7d --out report.html
    """
    from bench.report import history_report

    summary = history_report(_engine(ctx), out, since=since, include_bench=include_bench)
    click.echo(
        f"{out}: {summary['jobs']} jobs ({summary['done']} done, {summary['failed']} failed), "
        f"{summary['figures']} figures"
    )


@main.group()
def db() -> None:
    """Manage the database schema (Alembic migrations, SQLite and PostgreSQL alike).

    Example: upscaled db upgrade
    """


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Migrate the database to the newest schema, keeping every row; a database of before is adopted.

    Safe while daemons run and when several run it at once (one waits for the other). `upscaled run` does the
    same at start-up.

    Example: UPSCALED_CONFIG=/etc/upscaled/settings.toml upscaled db upgrade
    """
    from daemon.store import SqlStore, safe_url

    settings = _settings(ctx, check_paths=False)
    store = SqlStore(settings.database, upgrade=False)
    try:
        before, after = store.upgrade()
    finally:
        store.close()
    click.echo(
        f"{safe_url(settings.database)}: "
        + (f"at {after} already" if before == after else f"upgraded from {before or 'empty'} to {after}")
    )


@db.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Delete jobs that ended before this: 90d, 12w, 36h, or an ISO date (UTC).",
)
@click.option(
    "--keep-summary/--no-keep-summary",
    default=True,
    show_default=True,
    help="Keep the deleted jobs' counts and means in model_summary.",
)
@click.pass_context
def db_prune(ctx: click.Context, older_than: str, keep_summary: bool) -> None:
    """Delete the history of jobs that ended (done or failed) before a date, with their metrics and hook runs.

    Pending and running jobs stay. Bench runs left without jobs and nodes silent since then go too. Short
    transactions: safe while daemons run. A file dropped again after its job was pruned is processed again.

    Example: upscaled db prune --older-than 90d
    """
    from daemon.history import parse_since
    from daemon.store import SqlStore

    before = parse_since(older_than)
    store = SqlStore(_settings(ctx, check_paths=False).database)
    try:
        pruned = store.prune(before, keep_summary=keep_summary)
    finally:
        store.close()
    kept = "model_summary keeps their counts and means" if keep_summary else "model_summary forgets them"
    click.echo(
        f"deleted {pruned.jobs} jobs that ended before {before:%Y-%m-%d %H:%M} UTC ({pruned.metrics} metrics, "
        f"{pruned.hook_runs} hook runs), {pruned.bench_runs} bench runs and {pruned.nodes} nodes; {kept}"
    )


@main.command()
@click.option("--all", "all_", is_flag=True, help="Also list stopped nodes and nodes whose heartbeat is stale.")
@click.option(
    "--window",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    help="Seconds over which jobs_per_min is counted.",
)
@output_options
@click.pass_context
def nodes(ctx: click.Context, all_: bool, window: float, fmt: str) -> None:
    """List the daemons (nodes) on this database: heartbeat age, current jobs and throughput.

    A node is live while its heartbeat is younger than `stale_seconds`; a stale node's running jobs are taken over
    by the others.

    Example: upscaled nodes --all --format json
    """
    from daemon.store import SqlStore

    settings = _settings(ctx, check_paths=False)
    try:
        store = SqlStore(settings.database, readonly=True)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc}: the service has not run with this configuration yet") from None
    try:
        rows = store.nodes(settings.stale_seconds, window_s=window, include_gone=all_)
    finally:
        store.close()
    click.echo(render([n.flat() for n in rows], fmt))


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    help="host:port to serve on ([::1]:8080 for IPv6; port 0 picks a free one). Keep it on localhost and "
    "put a reverse proxy with authentication in front to reach it from elsewhere.",
)
@click.option("--database", default=None, help="A SQLAlchemy URL (default: the `database` setting).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Thumbnails and converted images (default: $XDG_CACHE_HOME/upscaled/web).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="A Host name to answer besides localhost (the name a reverse proxy passes); repeatable.",
)
@click.option("--root-path", default="", help="The path prefix a reverse proxy serves it under, e.g. /upscaled.")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.pass_context
def web(
    ctx: click.Context,
    listen: str,
    database: str | None,
    cache_dir: Path | None,
    allowed_hosts: tuple[str, ...],
    root_path: str,
    access_log: bool,
) -> None:
    """Serve a read-only web view of the history: jobs with a before/after slider, stats, bench runs.

    The database is opened read-only; only files named by job rows are served.

    Example: upscaled web --listen 127.0.0.1:8080
    """
    from daemon.web.serve import serve

    if database is None:
        settings = _settings(ctx, check_paths=False)
        database, level = settings.database, settings.log_level
    else:
        level = "info"
        try:  # the thumbnails it writes follow the settings' umask where there are settings
            os.umask(int(load_settings(ctx.obj.get("config"), check_paths=False).umask, 8))
        except UpscaledError:
            pass
    serve(
        database,
        listen,
        cache_dir=cache_dir,
        allowed_hosts=allowed_hosts,
        root_path=root_path,
        log_level="warning" if level == "info" and not access_log else level,
        access_log=access_log,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
