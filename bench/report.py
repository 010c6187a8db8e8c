"""Self-contained HTML reports: the ``upscaled bench`` comparison and the service's own history.

A report is one HTML file that needs nothing else: the CSS is inline, every figure and image crop is a PNG embedded
as a ``data:`` URI, and there is no script and no external address, so it opens offline, from a mail attachment or
a CI artifact alike. Figures are drawn by matplotlib on its Agg canvas (no pyplot state, no display needed).

- :func:`bench_report` (``upscaled bench --report``): PSNR-Y against seconds per megapixel (log time axis) for every
  model and scale; a table per scale with the best value of each column marked; for each image and scale, the same
  zoomed region (the one with the most detail) from the HR image, the LR input and every model, side by side.
- :func:`history_report` (``upscaled report``): throughput over time, the distribution of job time per model,
  failures by reason, and the distribution of each metric per folder and rule, plus the ``stats`` table.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from sqlalchemy import text
from sqlalchemy.engine import Engine

from bench.run import HIGHER_IS_BETTER, PROTOCOL, QUALITY_METRICS, BenchResult
from daemon.fsops import Root
from daemon.history import parse_since, stats
from models.errors import UpscaledError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HISTORY_METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "mse_rgb", "brisque", "lr_psnr_y", "lr_ssim_y")
_TABLE_COLS = (*QUALITY_METRICS, "brisque", "load_s", "s_per_image", "s_per_mp")
_DIGITS = {
    "psnr_y": 2,
    "psnr_rgb": 2,
    "ssim_y": 4,
    "ssim_rgb": 4,
    "mse_rgb": 1,
    "brisque": 1,
    "load_s": 3,
    "s_per_image": 4,
    "s_per_mp": 4,
}
_CROP_ZOOM = 2  # crops are shown at twice their size, pixelated, so that single pixels can be told apart

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #1d2433; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d8dde6; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .88rem; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #e4e7ee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
thead th { background: #f3f5f9; }
td.wrap { white-space: normal; max-width: 48rem; text-align: left; }
td.best { font-weight: 700; background: #e3f4e6; }
td.best::after { content: " \\2605"; color: #2f8f46; }
.meta { color: #5a6477; font-size: .9rem; }
.meta code, p code { background: #f3f5f9; padding: 0 .25rem; }
figure.chart { margin: 1rem 0; } figure.chart img { max-width: 100%; height: auto; }
.strip { display: flex; flex-wrap: wrap; gap: .6rem; margin: .4rem 0 1.4rem; }
.strip figure { margin: 0; text-align: center; font-size: .78rem; }
.strip img { image-rendering: pixelated; border: 1px solid #c9ced8; display: block; }
.empty { color: #8a93a5; font-style: italic; }
"""


class ReportError(UpscaledError):
    """A report that cannot be written: its folder cannot be made."""

    kind = "report"


# --- building blocks ------------------------------------------------------------------------------------------------
def png_data_uri(img: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of a uint8 RGB (or grey) array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_data_uri(fig: Figure, dpi: int = 110) -> str:
    """Render a matplotlib figure to a PNG ``data:`` URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{_DIGITS.get(col, 3)}f}"
    return _esc(v)


def _chart(uri: str, alt: str) -> str:
    return f'<figure class="chart"><img src="{uri}" alt="{_esc(alt)}"></figure>'


def _page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _write(path: Path, page: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot make the folder of the report {path}: {exc.strerror or exc}") from exc
    try:
        with Root(path.parent) as folder:
            folder.write_atomic(path.name, page.encode("utf-8"))
    except UpscaledError as exc:
        raise ReportError(f"cannot write the report {path}: {exc}") from exc
    return path


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str], best: dict[str, set[int]] | None = None) -> str:
    texts = {c for c in cols if any(isinstance(r.get(c), str) for r in rows)}
    head = "".join(f'<th class="{"text" if i == 0 or c in texts else ""}">{_esc(c)}</th>' for i, c in enumerate(cols))
    body = []
    for r_i, r in enumerate(rows):
        cells = []
        for c_i, c in enumerate(cols):
            classes = []
            if c_i == 0 or c in texts:
                classes.append("wrap" if len(str(r.get(c) or "")) > 40 else "text")
            if best and r_i in best.get(c, set()):
                classes.append("best")
            cells.append(f'<td class="{" ".join(classes)}">{_fmt(c, r.get(c))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def best_rows(rows: Sequence[dict[str, Any]], cols: Iterable[str]) -> dict[str, set[int]]:
    """Per column, the indices of the rows holding its best value (ties all marked; ``None`` ignored).

    Which way is better comes from :data:`daemon.bench.HIGHER_IS_BETTER`; columns it does not know are left out.
    """
    out: dict[str, set[int]] = {}
    for c in cols:
        if c not in HIGHER_IS_BETTER:
            continue
        vals = [
            (i, float(r[c])) for i, r in enumerate(rows) if isinstance(r.get(c), int | float) and math.isfinite(r[c])
        ]
        if len(vals) < 2:
            continue
        target = (max if HIGHER_IS_BETTER[c] else min)(v for _, v in vals)
        out[c] = {i for i, v in vals if math.isclose(v, target, rel_tol=1e-12, abs_tol=1e-12)}
    return out


# --- the bench report -----------------------------------------------------------------------------------------------
# Why a model can score below plain bicubic, by backend, said in the report where it happens (docs/bench.md has the
# same explanation, with the figures of both kernels).
WHY_BELOW_BICUBIC = {
    "opencv": "OpenCV's FSRCNN, ESPCN and LapSRN were trained on LR images made with OpenCV's bicubic resize, "
    "which does not antialias. On LR made the papers' way (MATLAB bicubic, antialiased) they gain little over "
    "bicubic at x3 and x4, and can fall just below it; on --downscale cv2-cubic LR they gain 0.7 to 1.2 dB at x2 "
    "(docs/bench.md).",
    "classical": "a plainer interpolation than bicubic: below it is expected.",
}
WHY_BELOW_OTHER = (
    "the model was trained for another degradation than this run's LR (another kernel, or noise and blur), or for "
    "looks rather than PSNR (a GAN): PSNR against the ground truth penalises both (docs/bench.md)."
)


def below_bicubic(summary: Sequence[dict[str, Any]]) -> list[str]:
    """One line per model whose PSNR-Y is below bicubic's at the same scale and LR, with the reason its backend
    gives (:data:`WHY_BELOW_BICUBIC`): "x4, matlab-bicubic LR: fsrcnn 28.41 dB < bicubic 28.43 dB: ..."."""
    out = []
    for r in summary:
        base = next(
            (b for b in summary if b["model"] == "bicubic" and b["scale"] == r["scale"] and b.get("lr") == r.get("lr")),
            None,
        )
        if base is None or r["model"] == "bicubic" or r.get("psnr_y") is None or base.get("psnr_y") is None:
            continue
        if r["psnr_y"] < base["psnr_y"]:
            why = WHY_BELOW_BICUBIC.get(r.get("backend") or "", WHY_BELOW_OTHER)
            if r.get("backend") == "opencv" and r.get("lr") == "cv2-cubic":
                why = WHY_BELOW_OTHER
            out.append(
                f"x{r['scale']}, {r.get('lr')} LR: {r['model']} {r['psnr_y']:.2f} dB < bicubic "
                f"{base['psnr_y']:.2f} dB: {why}"
            )
    return out


def quality_time_figure(summary: Sequence[dict[str, Any]]) -> Figure | None:
    """PSNR-Y against seconds per megapixel (log axis): one point per model and scale, a marker per scale."""
    points = [r for r in summary if r.get("psnr_y") is not None and r.get("s_per_mp")]
    if not points:
        return None
    fig = _figure(10.0, 5.5)
    ax = fig.add_subplot()
    models = sorted({r["model"] for r in points})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    markers = dict(zip(sorted({r["scale"] for r in points}), "os^Dvp*hX", strict=False))
    for r in points:
        ax.scatter(
            r["s_per_mp"],
            r["psnr_y"],
            color=colours[r["model"]],
            marker=markers.get(r["scale"], "o"),
            s=55,
            edgecolor="black",
            linewidth=0.5,
            zorder=3,
        )
        ax.annotate(
            f"{r['model']} x{r['scale']}",
            (r["s_per_mp"], r["psnr_y"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7.5,
        )
    ax.set_xscale("log")
    ax.set_xlabel("seconds per megapixel of output (warm, log scale)")
    ax.set_ylabel("PSNR-Y (dB), border shaved by the scale")
    ax.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[m], marker="o", linestyle="", label=m) for m in models]
    handles += [Line2D([], [], color="grey", marker=mk, linestyle="", label=f"x{s}") for s, mk in markers.items()]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("Quality against time")
    return fig


def bench_report(result: BenchResult, path: Path, command: str | None = None) -> Path:
    """Write the HTML report of ``result`` to ``path`` (atomically) and return the path.

    Raises:
        ReportError, OutputError, DiskFullError: the file cannot be written.
    """
    s = result.settings
    body = [
        f"<h1>upscaled bench: {_esc(s.get('dataset_name', ''))}</h1>",
        f'<p class="meta">Run {_esc(result.run_id if result.run_id is not None else "(not recorded)")}, '
        f"started {_esc(result.started_at)} on <b>{_esc(result.cpu)}</b>, device <code>{_esc(s.get('device'))}"
        f"</code>. Dataset <code>{_esc(s.get('dataset'))}</code> ({len(s.get('images', []))} images). "
        f"LR images: {_esc(', '.join(f'x{k}: {v}' for k, v in s.get('lr_sources', {}).items()))}.</p>",
    ]
    if command:
        body.append(f'<p class="meta">Command: <code>{_esc(command)}</code></p>')
    # 1. Quality against time.
    body.append("<h2>Quality against time</h2>")
    fig = quality_time_figure(result.summary)
    body.append(
        _chart(figure_data_uri(fig), "PSNR-Y against seconds per megapixel")
        if fig
        else '<p class="empty">No model ran, so there is nothing to plot.</p>'
    )
    # 2. One table per scale, best value per column marked.
    body.append("<h2>Results per model and scale</h2>")
    body.append(
        '<p class="meta">Means over the images. '
        + "; ".join(f"<b>{_esc(k)}</b>: {_esc(v)}" for k, v in PROTOCOL.items())
        + "; <b>load_s</b>: model load, timed apart. &#9733; marks the best value of each column at that scale.</p>"
    )
    cols = ["model", "lr", "status", "images", *_TABLE_COLS, "device"]
    for scale in sorted({r["scale"] for r in result.summary}):
        rows = [r for r in result.summary if r["scale"] == scale and r["status"] != "skipped"]
        body.append(f"<h3>x{scale}</h3>")
        body.append(
            _table(rows, cols, best_rows(rows, _TABLE_COLS))
            if rows
            else '<p class="empty">No model ran at this scale.</p>'
        )
    below = below_bicubic(result.summary)
    if below:
        body.append(
            '<h3>Below bicubic</h3><ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in below) + "</ul>"
        )
    skipped = result.skipped
    if skipped:
        body.append("<h3>Skipped</h3>")
        body.append(_table(skipped, ["model", "scale", "reason"]))
    # 3. Side-by-side crops.
    body.append("<h2>Side by side</h2>")
    body.append(
        f'<p class="meta">The same region of each image (the {_esc("square")} with the most detail), '
        f"shown at {_CROP_ZOOM}x with visible pixels: the HR ground truth, the LR input enlarged with nearest "
        "neighbour, and every model's output, with its PSNR-Y on the whole image.</p>"
    )
    if not result.crops:
        body.append('<p class="empty">No crops: no model ran.</p>')
    for cs in result.crops:
        x, y, w, h = cs.box
        body.append(f'<h3>{_esc(cs.image)} x{cs.scale} <span class="meta">region x={x} y={y} {w}x{h}</span></h3>')
        figs = []
        for label, tile, psnr_y in cs.tiles:
            cap = _esc(label) + (f"<br>{psnr_y:.2f} dB" if psnr_y is not None else "")
            figs.append(
                f'<figure><img src="{png_data_uri(tile)}" width="{tile.shape[1] * _CROP_ZOOM}" '
                f'height="{tile.shape[0] * _CROP_ZOOM}" alt="{_esc(label)}"><figcaption>{cap}</figcaption>'
                "</figure>"
            )
        body.append('<div class="strip">' + "".join(figs) + "</div>")
    body.append("<h2>Settings</h2><pre>" + _esc(json.dumps(s, indent=2)) + "</pre>")
    return _write(path, _page(f"upscaled bench: {s.get('dataset_name', '')}", body))


# --- the history report ---------------------------------------------------------------------------------------------
def _bucket(span_s: float) -> tuple[float, str]:
    for seconds, label in (
        (60, "minute"),
        (600, "10 minutes"),
        (3600, "hour"),
        (6 * 3600, "6 hours"),
        (86400, "day"),
        (7 * 86400, "week"),
    ):
        if span_s / seconds <= 60:
            return seconds, label
    return 30 * 86400, "30 days"


def _as_dt(v: Any) -> dt.datetime | None:
    if v is None or isinstance(v, dt.datetime):
        return v
    return dt.datetime.fromisoformat(str(v))


def throughput_figure(jobs: Sequence[dict[str, Any]]) -> Figure | None:
    """Jobs finished per time bucket (bucket chosen from the span), done and failed stacked."""
    ends = [
        (t, j["state"])
        for j in jobs
        if j["state"] in ("done", "failed") and (t := _as_dt(j["finished_at"])) is not None
    ]
    if not ends:
        return None
    t0 = min(t for t, _ in ends)
    t1 = max(t for t, _ in ends)
    size, label = _bucket((t1 - t0).total_seconds())
    start = dt.datetime.fromtimestamp(math.floor(t0.replace(tzinfo=dt.UTC).timestamp() / size) * size, dt.UTC)
    n = int((t1.replace(tzinfo=dt.UTC) - start).total_seconds() // size) + 1
    done, failed = np.zeros(n), np.zeros(n)
    for t, state in ends:
        i = int((t.replace(tzinfo=dt.UTC) - start).total_seconds() // size)
        (done if state == "done" else failed)[i] += 1
    x = [start + dt.timedelta(seconds=size * i) for i in range(n)]
    width = dt.timedelta(seconds=size * 0.9)
    fig = _figure(9, 3.8)
    ax = fig.add_subplot()
    # matplotlib plots datetimes on a date axis; its type stubs take numbers only.
    ax.bar(x, done, width=width, align="edge", color="#3d7fc1", label="done")  # type: ignore[arg-type]
    ax.bar(x, failed, width=width, align="edge", bottom=done, color="#d1495b", label="failed")  # type: ignore[arg-type]
    ax.set_ylabel(f"jobs per {label}")
    ax.set_xlabel("finished (UTC)")
    ax.legend(fontsize=8)
    ax.set_title(f"Throughput: {int(done.sum())} done, {int(failed.sum())} failed")
    fig.autofmt_xdate()
    return fig


def job_time_figure(jobs: Sequence[dict[str, Any]]) -> Figure | None:
    """Box plot of total job seconds per model (done jobs), log axis when the spread is wide."""
    per_model: dict[str, list[float]] = defaultdict(list)
    for j in jobs:
        if j["state"] == "done" and j["t_total"] is not None:
            per_model[j["model_id"]].append(float(j["t_total"]))
    if not per_model:
        return None
    names = sorted(per_model)
    fig = _figure(9, 0.6 + 0.45 * len(names) + 2)
    ax = fig.add_subplot()
    ax.boxplot(
        [per_model[n] for n in names],
        orientation="horizontal",
        tick_labels=[f"{n} ({len(per_model[n])})" for n in names],
        showmeans=True,
    )
    values = [v for vs in per_model.values() for v in vs if v > 0]
    if values and max(values) / max(min(values), 1e-9) > 50:
        ax.set_xscale("log")
    ax.set_xlabel("seconds per job (decode to metrics)")
    ax.set_title("Job time per model (jobs in brackets)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def failures_figure(jobs: Sequence[dict[str, Any]]) -> Figure | None:
    """Failed jobs counted by their ``error_kind``."""
    from matplotlib.ticker import MaxNLocator

    counts = Counter(j["error_kind"] or "unknown" for j in jobs if j["state"] == "failed")
    if not counts:
        return None
    kinds = [k for k, _ in counts.most_common()][::-1]
    fig = _figure(8, 0.6 + 0.4 * len(kinds) + 1.5)
    ax = fig.add_subplot()
    ax.barh(kinds, [counts[k] for k in kinds], color="#d1495b")
    ax.set_xlabel("failed jobs")
    ax.set_title("Failures by reason")
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator)  # the default AutoLocator is one
    locator.set_params(integer=True)
    return fig


def rule_label(job: dict[str, Any]) -> str:
    """``folder · model xS · rule fingerprint`` for a job row: what a rule is, to a reader."""
    folder = job["folder"] or "(default)"
    return f"{folder} · {job['model_id']} x{job['outscale']:g} · {job['rule_fingerprint'][:6]}"


def metrics_figure(jobs: Sequence[dict[str, Any]]) -> Figure | None:
    """One box plot per metric that has values: its distribution per folder and rule."""
    present = [m for m in HISTORY_METRICS if any(j.get(m) is not None for j in jobs)]
    if not present:
        return None
    groups = sorted({rule_label(j) for j in jobs})
    fig = _figure(9, len(present) * (0.9 + 0.35 * len(groups)) + 0.5)
    axes = fig.subplots(len(present), 1, squeeze=False)[:, 0]
    for ax, m in zip(axes, present, strict=True):
        data, labels = [], []
        for g in groups:
            vals = [float(j[m]) for j in jobs if rule_label(j) == g and j.get(m) is not None and math.isfinite(j[m])]
            if vals:
                data.append(vals)
                labels.append(f"{g} ({len(vals)})")
        ax.boxplot(data, orientation="horizontal", tick_labels=labels, showmeans=True)
        better_of: dict[bool | None, str] = {True: "higher is better", False: "lower is better"}
        better = better_of.get(HIGHER_IS_BETTER.get(m), "")
        ax.set_title(f"{m} ({better})" if better else m, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    return fig


def load_jobs(engine: Engine, since: str | None = None, include_bench: bool = False) -> list[dict[str, Any]]:
    """Every job (newer than ``since``: see :func:`daemon.history.parse_since`) with its metrics as columns.

    Bench jobs (``source = 'bench'``) are left out unless ``include_bench``: they are not the service's workload.

    Raises:
        QueryError: a bad ``since``.
    """
    clauses, params = [], {}
    if since:
        clauses.append("j.created_at >= :since")
        params["since"] = parse_since(since)
    if not include_bench:
        clauses.append("j.source != 'bench'")
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    cols = ", ".join(f"jm.{m}" for m in HISTORY_METRICS)
    sql = f"""
SELECT j.id, j.state, j.source, j.folder, j.model_id, j.outscale, j.rule_fingerprint, j.error_kind, j.created_at,
  j.finished_at, j.t_total, {cols}
FROM jobs j JOIN job_metrics jm ON jm.id = j.id{where} ORDER BY j.id"""
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(text(sql), params)]


def history_report(
    engine: Engine,
    path: Path,
    since: str | None = None,
    include_bench: bool = False,
    title: str = "upscaled: service report",
) -> dict[str, Any]:
    """Write the service-history report to ``path`` (atomically). Returns counts: jobs, done, failed, figures.

    Raises:
        QueryError: a bad ``since``.
        ReportError, OutputError, DiskFullError: the file cannot be written.
    """
    jobs = load_jobs(engine, since, include_bench)
    states = Counter(j["state"] for j in jobs)
    scope = f"since {since}" if since else "all time"
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">{len(jobs)} jobs ({scope}{", bench runs included" if include_bench else ""}): '
        + ", ".join(f"{states.get(s, 0)} {s}" for s in ("done", "failed", "pending", "running"))
        + f". Generated {_esc(dt.datetime.now(dt.UTC).isoformat(timespec='seconds'))}.</p>",
    ]
    figures = 0
    sections = (
        ("Throughput over time", throughput_figure, "No finished jobs yet."),
        ("Job time per model", job_time_figure, "No finished jobs yet."),
        ("Failures by reason", failures_figure, "No failures."),
        ("Metrics per folder and rule", metrics_figure, "No metrics recorded yet."),
    )
    for heading, make, empty in sections:
        body.append(f"<h2>{_esc(heading)}</h2>")
        fig = make(jobs)
        if fig is None:
            body.append(f'<p class="empty">{_esc(empty)}</p>')
        else:
            body.append(_chart(figure_data_uri(fig), heading))
            figures += 1
    rows = stats(engine, since=since)
    if not include_bench:
        rows = [r for r in rows if r["folder"] != "(bench)"]
    body.append("<h2>Per model and folder</h2>")
    cols = [
        "model",
        "scale",
        "outscale",
        "mode",
        "folder",
        "jobs",
        "done",
        "failed",
        "mean_s",
        "p50_s",
        "p95_s",
        "p50_infer_s",
        *(c for c in ("mean_psnr_y", "mean_ssim_y", "mean_brisque", "mean_lr_psnr_y") if rows and c in rows[0]),
    ]
    body.append(
        '<p class="meta"><b>scale</b>: the model\'s native scale; <b>outscale</b>: the final one. '
        "<b>mean_s, p50_s, p95_s</b>: a done job's total, claim to commit (decode, model, encode, write; a "
        "benchmark job's metrics too). <b>p50_infer_s</b>: the model alone, what <code>upscaled bench</code> "
        "reports as s_per_image. BRISQUE: lower is better.</p>"
    )
    body.append(_table(rows, cols) if rows else '<p class="empty">No jobs.</p>')
    _write(path, _page(title, body))
    return dict(
        path=str(path), jobs=len(jobs), done=states.get("done", 0), failed=states.get("failed", 0), figures=figures
    )
