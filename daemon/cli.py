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
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from daemon import __version__, logs
from daemon.fsops import display as printable
from daemon.media.formats import OUTPUT_FORMATS
from models.errors import UpscaledError

if TYPE_CHECKING:  # imported where a command needs them: `--version` and `--help` start in a tenth of a second
    from sqlalchemy.engine import Engine

    from daemon.config import Settings

# --- output formatting ----------------------------------------------------------------------------------------------
ELLIPSIS = "…"


def terminal_width() -> int | None:
    """The width a table must fit: the terminal's (``$COLUMNS`` where set) when stdout is one, else None: a pipe or
    a file gets whole lines, for grep and ``less -S``."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return printable(str(v))


def _csv_value(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return _json_default(v)
    if isinstance(v, str | bytes | Path):
        return printable(str(v) if not isinstance(v, bytes) else repr(v))
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, dt.datetime):  # the history's times are UTC: said so, in the text itself
        return (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).isoformat()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def fit(widths: list[int], total: int, floors: list[int], first: Sequence[int] = ()) -> list[int]:
    """Column widths that fit ``total`` characters (two spaces between columns): the widest of the ``first``
    columns gives up a character at a time down to its floor, then the widest of all; no column goes below its
    floor. Where even the floors do not fit, the floors."""
    widths = list(widths)
    for group in (list(first), list(range(len(widths)))):
        while group and sum(widths) + 2 * (len(widths) - 1) > total:
            cut = max(group, key=lambda i: widths[i] - floors[i])
            if widths[cut] <= floors[cut]:
                break
            widths[cut] -= 1
    return widths


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + ELLIPSIS


def render(rows: list[dict[str, Any]], fmt: str, width: int | None = None, optional: Sequence[str] = ()) -> str:
    """``rows`` as a table, CSV or JSON. Every string is printable whatever it holds (see :func:`printable`): one
    row is one line in a table and one record in CSV, and no value can drive the terminal. A table fits ``width``
    characters when given (:func:`terminal_width`): its long text columns are cut first, then the widest, each
    with an ellipsis; where that is not enough, the ``optional`` columns are left out, in that order."""
    if fmt == "json":
        clean = [
            {k: (None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v) for k, v in r.items()}
            for r in rows
        ]
        return json.dumps(clean, indent=2, default=_json_default)
    if not rows:
        return "" if fmt == "csv" else "(no rows)"
    keys = list(rows[0].keys())
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([printable(str(c)) for c in keys])
        for r in rows:
            w.writerow([_csv_value(r.get(k)) for k in keys])
        return buf.getvalue().rstrip("\n")
    cells = {k: [_cell(r.get(k)) for r in rows] for k in keys}
    natural = {k: max(len(printable(str(k))), *(len(c) for c in cells[k])) for k in keys}
    # Long text (a file name, an error, a description) gives way first, to 12 characters; the rest to their header.
    floors = {k: min(w, 12 if w > 24 else max(len(str(k)), 4)) for k, w in natural.items()}
    if width is not None:
        for drop in optional:
            if sum(floors[k] for k in keys) + 2 * (len(keys) - 1) <= width:
                break
            if drop in keys:
                keys.remove(drop)
    widths = [natural[k] for k in keys]
    if width is not None:
        widths = fit(widths, width, [floors[k] for k in keys], first=[i for i, k in enumerate(keys) if natural[k] > 24])
    line = "  ".join(_clip(printable(str(k)), w).ljust(w) for k, w in zip(keys, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    for i in range(len(rows)):
        out.append("  ".join(_clip(cells[k][i], w).ljust(w) for k, w in zip(keys, widths, strict=True)).rstrip())
    return "\n".join(out)


def _echo_rows(rows: list[dict[str, Any]], fmt: str, optional: Sequence[str] = ()) -> None:
    click.echo(render(rows, fmt, terminal_width() if fmt == "table" else None, optional))


def _drop_empty(rows: list[dict[str, Any]], keep: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A table's rows without the columns that are empty in every row (but ``keep``)."""
    shown = [k for k in (rows[0] if rows else {}) if k in keep or any(r.get(k) not in (None, "") for r in rows)]
    return [{k: r.get(k) for k in shown} for r in rows]


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
    from daemon.config import load_settings

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
    folders = [settings.inbox, settings.outbox, settings.archive, settings.failed]
    logs.configure(settings.log_level, settings.log_format, folders=folders)
    sys.exit(Service(settings).run())


@main.command("check-config")
@click.option(
    "--no-weights",
    is_flag=True,
    help="Do not count missing weights as an error (a staging host that fetches them later).",
)
@click.pass_context
def check_config(ctx: click.Context, no_weights: bool) -> None:
    """Check the configuration as `run` would, without starting.

    Lists this node's devices and workers, and each rule with its weights; the default rule is marked when the file
    does not name one. Exits 1 when a rule's weights are missing (unless --no-weights), with the command that
    fetches them.

    Example: upscaled check-config
    """
    from daemon.hints import Hints
    from daemon.rules import implicit_default
    from daemon.service import check_devices
    from models.weights import entry_for, needs_weights, present

    written = _settings(ctx)
    check_devices(written)  # a GPU that is not there stops `run` too
    settings = written.resolve_devices()
    hints = Hints.of(settings)
    folders = (
        "all rule folders"
        if settings.serve_folders is None
        else ", ".join(f or "(default)" for f in settings.serve_folders)
    )
    devices = ", ".join(settings.devices())
    if written.devices() != settings.devices():
        devices += f" (device = {json.dumps(written.device)})"
    lines = [f"  node {settings.node()}: {settings.worker_count()} worker(s) on each of {devices}; serves {folders}"]
    missing: list[str] = []
    implicit = implicit_default(settings)
    others = ", ".join(r.folder for r in settings.rules) or "none"
    for rule in settings.all_rules():
        entry = entry_for(rule.model, settings.weights_dir)  # omdb: entries were checked by _settings
        if not needs_weights(entry):
            weights = "no weights needed"
        elif present(settings.weights_dir, entry):
            weights = "weights present"
        else:
            weights = f"WEIGHTS MISSING: run `{hints.fetch([rule.model])}`"
            missing.append(rule.model)
        note = (
            f' (implicit: no rule in the file has folder = "", so every file outside the rule folders ({others}) '
            "gets this built-in one)"
            if implicit is not None and rule.folder == ""
            else ""
        )
        unavailable = rule.backend().available()  # shown, not an error: a node may leave this folder to others
        if unavailable:
            note += f"; BACKEND UNAVAILABLE: {unavailable}"
        lines.append(
            f"  {rule.folder or '(default)'}: {rule.model} x{rule.final_scale:g} {rule.mode}"
            f" -> {rule.format or 'same format'}; {weights}; licence {entry.license}{note}"
        )
    ok = not missing or no_weights
    click.echo(f"{settings.config_file}: {'OK' if ok else 'weights missing'}")
    click.echo("\n".join(lines))
    if missing and no_weights:
        click.echo(f"  (--no-weights: the weights of {', '.join(dict.fromkeys(missing))} are missing; jobs of those")
        click.echo("  rules fail until they are fetched)")
    if not ok:
        raise click.ClickException(
            f"the weights of {', '.join(dict.fromkeys(missing))} are missing, so their rules' jobs would fail: "
            f"run `{hints.fetch(missing)}` (or pass --no-weights on a host that fetches them later)"
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

    The inputs are left where they are. In a table, what was not done is said under it, one file a line, whole.

    Example: upscaled process photo.jpg --model fsrcnn --scale 4 --out upscaled/
    """
    from daemon.config import Rule
    from daemon.oneshot import process as process_files
    from models.weights import entry_for

    settings = _settings(ctx, check_paths=False).resolve_devices()
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
    if fmt == "table":
        _echo_rows([{k: v for k, v in r.items() if k != "error"} for r in reports], fmt)
        for r in reports:  # the reasons whole, where a table column would cut them
            if r.get("error"):
                click.echo(f"{r['file']}: {r['state']}: {printable(r['error'])}")
    else:
        _echo_rows(reports, fmt)
    if any(r["state"] == "failed" for r in reports):
        sys.exit(1)


_SOURCE_HELP = "Only jobs from here: watch (the service), cli (`upscaled process`), bench, or all."


def _sources(source: str) -> tuple[str, ...] | None:
    return None if source == "all" else (source,)


@main.command("history")
@click.option("--model", default=None, help="Only this model id.")
@click.option("--folder", default=None, help="Only this rule folder ('' for the default rule).")
@click.option("--status", type=click.Choice(["pending", "running", "done", "failed"]), default=None)
@click.option("--since", default=None, help="Only jobs newer than this: 90s, 30m, 2h, 7d or an ISO date.")
@click.option(
    "--source", type=click.Choice(["all", "watch", "cli", "bench"]), default="all", show_default=True,
    help=_SOURCE_HELP,
)  # fmt: skip
@click.option("--limit", type=int, default=50, show_default=True)
@output_options
@click.pass_context
def history_cmd(
    ctx: click.Context,
    model: str | None,
    folder: str | None,
    status: str | None,
    since: str | None,
    source: str,
    limit: int,
    fmt: str,
) -> None:
    """List jobs, newest first, with their sizes, times and main metrics.

    The table fits the terminal and shows what the jobs have: sizes in -> out, the total and the model seconds,
    the metrics of their mode (psnr_y, ssim_y in benchmark mode; lr_psnr_y, brisque when upscaling), a failed job's
    reason. Times are UTC. JSON and CSV have every column, `output_path` only where one was written.

    Example: upscaled history --model fsrcnn --since 2h --format json
    """
    from daemon.history import history

    rows = history(_engine(ctx), model, folder, status, since, limit, _sources(source))
    if fmt == "table":  # on a narrow terminal these go first
        _echo_rows(_history_table(rows), fmt, optional=("model_s", "total_s", "created (UTC)", "in -> out"))
    else:
        _echo_rows(rows, fmt)


def _history_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``history`` as the table shows them: the sizes in -> out, the model with its final scale (and
    ``bench`` for a benchmark-mode job), and one ``result`` column: a done job's main metrics (those of its mode),
    the reason of a failed one (or of a pending one's last try); without the columns no job here has."""
    from daemon.history import MAIN_METRICS

    out = []
    for r in rows:
        size_in = f"{r['input_width']}x{r['input_height']}" if r["input_width"] else ""
        size_out = f"{r['output_width']}x{r['output_height']}" if r["output_width"] and r["state"] == "done" else ""
        quality = [f"{m} {_cell(r[m])}" for m in MAIN_METRICS.get(r["mode"], ()) if r.get(m) is not None]
        out.append(
            {
                "id": r["id"],
                "state": r["state"],
                "folder": r["folder"] or "(default)",
                "file": r["file"],
                "model": f"{r['model']} x{r['outscale']:g}" + (" bench" if r["mode"] == "benchmark" else ""),
                "in -> out": f"{size_in} -> {size_out}" if size_out else size_in,
                "total_s": r["total_s"],
                "model_s": r["infer_s"],
                "created (UTC)": r["created_at"].strftime("%Y-%m-%d %H:%M") if r["created_at"] else None,
                "result": f"{r['error_kind']}: {r['error']}"
                if r["state"] != "done" and r["error"]
                else "  ".join(quality),
            }
        )
    return _drop_empty(out, keep=("id", "state", "folder", "file", "model", "created (UTC)"))


def _engine(ctx: click.Context) -> Engine:
    """A read-only engine on the history: readers never create, migrate or change the database."""
    from daemon.store import make_engine

    settings = _settings(ctx, check_paths=False)
    try:
        return make_engine(settings.database, readonly=True)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc}: the service has not run with this configuration yet") from None


@main.command()
@click.option("--model", default=None, help="Only this model id.")
@click.option("--folder", default=None, help="Only this rule folder ('' for the default rule).")
@click.option("--since", default=None, help="Only jobs newer than this: 90s, 30m, 2h, 7d or an ISO date.")
@click.option(
    "--source", type=click.Choice(["all", "watch", "cli", "bench"]), default="all", show_default=True,
    help=_SOURCE_HELP,
)  # fmt: skip
@output_options
@click.pass_context
def stats(ctx: click.Context, model: str | None, folder: str | None, since: str | None, source: str, fmt: str) -> None:
    """Per model, scale and folder: jobs, failures, seconds per job and mean metrics.

    \b
    scale, outscale  the model's native scale, and the output's final one (as in the jobs table)
    mean_s, p50_s, p95_s  a done job's total: claim to commit (decode, model and its load
                          for the first job, encode, write; a benchmark job's metrics too)
    p50_infer_s      the model alone: compare this with `bench`'s s_per_image (there the
                     median of warm runs, the load timed apart)
    mean_psnr_y, mean_ssim_y  against the ground truth (benchmark mode); higher is better
    mean_brisque     no reference; lower is better
    mean_lr_psnr_y   the output downscaled back, against the input; higher is better

    Example: upscaled stats --since 7d
    """
    from daemon.history import stats as compute

    rows = compute(_engine(ctx), model, folder, since, _sources(source))
    _echo_rows(_drop_empty(rows, keep=("model", "scale", "outscale")) if fmt == "table" else rows, fmt)


@main.command()
@click.argument("sql")
@click.option("-p", "--param", "params", type=(str, str), multiple=True, help="A named parameter: -p name value.")
@output_options
@click.pass_context
def query(ctx: click.Context, sql: str, params: tuple[tuple[str, str], ...], fmt: str) -> None:
    """Run one read-only SQL statement against the history.

    Tables: jobs, metrics, bench_runs, meta. Views: job_metrics, model_summary, recent_jobs. The connection is
    read-only: a statement that would write is refused, and says so.

    Example: upscaled query "SELECT model_id, AVG(t_total) FROM jobs WHERE folder = :f GROUP BY 1" -p f photos
    """
    from daemon.history import query as run_query

    settings = _settings(ctx, check_paths=False)
    _echo_rows(run_query(settings.database, sql, dict(params)), fmt)


@main.command()
@click.argument("targets", nargs=-1)
@click.option("--failed", "every_failed", is_flag=True, help="Every failed job whose input is in failed/.")
@click.option("--kind", default=None, help="Every failed job of this error kind (weights-missing, decode, ...).")
@click.option("--force", is_flag=True, help="Retry a weights-missing job even while its weights are still missing.")
@output_options
@click.pass_context
def retry(
    ctx: click.Context, targets: tuple[str, ...], every_failed: bool, kind: str | None, force: bool, fmt: str
) -> None:
    """Move failed inputs back from failed/ into the inbox, for the service to run their jobs again.

    TARGETS are job ids, or files and folders under failed/ (every failed input in them). Each input goes back to
    its place in the inbox (a name taken there gets -1), never over another file, and only if it is still this
    job's input (its sha256 is checked); its .error.json is removed. The service takes it in like any new file and
    runs the failed job again, whether it runs now or starts later. A job that failed for missing weights is left
    where it is while they are still missing (--force moves it anyway). Exits 1 if any could not be moved.

    Example: upscaled retry --kind weights-missing
    """
    from daemon.retry import retry as move_back
    from daemon.retry import select_jobs
    from daemon.store import SqlStore

    settings = _settings(ctx)
    ids = [int(t) for t in targets if t.isascii() and t.isdigit()]
    paths = [Path(t) for t in targets if not (t.isascii() and t.isdigit())]
    if not targets and not every_failed and not kind:
        raise click.UsageError("name job ids or paths under failed/, or pass --failed or --kind KIND")
    for p in paths:
        if settings.failed not in Path(os.path.abspath(p)).parents and Path(os.path.abspath(p)) != settings.failed:
            raise click.BadParameter(f"{p} is not under failed/ ({settings.failed})", param_hint="TARGETS")
    try:
        store = SqlStore(settings.database, readonly=True)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc}: the service has not run with this configuration yet") from None
    try:
        chosen = select_jobs(store, settings, ids, paths, every_failed, kind)
        outcomes = move_back(store, settings, chosen, force=force)
    finally:
        store.close()
    if not outcomes:
        click.echo("no failed job matches: nothing to retry", err=True)
        return
    _echo_rows([o.__dict__ for o in outcomes], fmt)
    moved = sum(o.state == "moved" for o in outcomes)
    if moved:
        click.echo(
            f"{moved} input(s) back in the inbox: the service runs their jobs again as it sees them "
            f"(`upscaled history --status pending`).",
            err=True,
        )
    if moved < len(outcomes):
        sys.exit(1)


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
    _echo_rows(rows, fmt)


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
    _echo_rows([omdb.row(m) for m in found], fmt)


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
        _echo_rows([details], fmt)


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
    _echo_rows([r.__dict__ for r in reports], fmt)
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
    _echo_rows([r.__dict__ for r in reports], fmt)
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
    from models.devices import resolve_auto

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
    device = resolve_auto(device)  # the run, its jobs and its report name the device it ran on
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

        _echo_rows(frontier(result.summary), fmt)
    elif fmt == "json":
        click.echo(json.dumps(result.to_json(), indent=2, default=_json_default))
    else:
        _echo_rows(result.summary, fmt)


@main.command()
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the HTML file (default: upscaled-report.html in the state folder: the SQLite "
    "database's folder, else $XDG_STATE_HOME/upscaled).",
)
@click.option("--since", default=None, help="Only jobs newer than this: 90s, 30m, 2h, 7d or an ISO date.")
@click.option("--include-bench", is_flag=True, help="Count `upscaled bench` runs too (left out by default).")
@click.pass_context
def report(ctx: click.Context, out: Path | None, since: str | None, include_bench: bool) -> None:
    """Write a self-contained HTML report of the service's history, and print where.

    Throughput over time, job time per model, failures by reason, and metric distributions per folder and rule.

    Example: upscaled report --since 7d --out report.html
    """
    from bench.report import history_report

    settings = _settings(ctx, check_paths=False)
    path = (out or state_dir(settings) / "upscaled-report.html").absolute()
    summary = history_report(_engine(ctx), path, since=since, include_bench=include_bench)
    click.echo(
        f"{path}: {summary['jobs']} jobs ({summary['done']} done, {summary['failed']} failed), "
        f"{summary['figures']} figures"
    )


def state_dir(settings: Settings) -> Path:
    """Where the service keeps its state: the SQLite database's folder (``var/`` of the shipped settings), else
    ``$XDG_STATE_HOME/upscaled`` (``~/.local/state/upscaled``). Made if missing."""
    db = settings.sqlite_path()
    if db is not None and str(db) != ":memory:":
        folder = db.parent
    else:
        folder = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "upscaled"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    _echo_rows([n.flat() for n in rows], fmt)


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    help="host:port to serve on; a port alone means 127.0.0.1:PORT ([::1]:8080 for IPv6; port 0 picks a free "
    "one). Keep it on localhost and put a reverse proxy with authentication in front to reach it from elsewhere.",
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
    from daemon.config import load_settings
    from daemon.hints import Hints
    from daemon.web.serve import serve

    hints = None
    if database is None:
        settings = _settings(ctx, check_paths=False)
        database, level, hints = settings.database, settings.log_level, Hints.of(settings)
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
        hints=hints,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
