"""Small inline SVG charts for the web view: no script, no style attribute (the page's CSP forbids inline styles),
colours from classes in ``static/style.css``, every label escaped, a ``<title>`` on each mark for its exact value.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape


def _fmt_s(v: float) -> str:
    if v < 1:
        return f"{v * 1000:.0f} ms" if v >= 0.001 else f"{v * 1000:.2f} ms"
    if v < 120:
        return f"{v:.2f} s"
    return f"{v / 60:.1f} min"


def per_day(days: Sequence[dict[str, Any]], width: int = 760, height: int = 200) -> Markup:
    """Columns of jobs finished per day, done and failed stacked: ``days`` from :meth:`History.per_day`."""
    if not days:
        return Markup("")
    left, right, top, bottom = 40, 8, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(1, max(d["done"] + d["failed"] for d in days))
    step = plot_w / len(days)
    bar = max(1.0, step * 0.8)
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="Jobs finished per day">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>',
        f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
        f'<text class="tick" x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for i, d in enumerate(days):
        x = left + i * step + (step - bar) / 2
        y = top + plot_h
        label = escape(f"{d['day']}: {d['done']} done, {d['failed']} failed")
        for kind in ("done", "failed"):
            n = d[kind]
            if not n:
                continue
            h = plot_h * n / peak
            y -= h
            out.append(
                f'<rect class="bar {kind}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}">'
                f"<title>{label}</title></rect>"
            )
    for i in sorted({0, len(days) // 2, len(days) - 1}):
        day = days[i]["day"]
        text = day.isoformat() if isinstance(day, dt.date) else str(day)
        x = left + i * step + step / 2
        anchor = "start" if i == 0 and len(days) > 1 else "end" if i == len(days) - 1 and len(days) > 1 else "middle"
        x = left if anchor == "start" else width - right if anchor == "end" else x
        out.append(f'<text class="tick" x="{x:.1f}" y="{height - 8}" text-anchor="{anchor}">{escape(text)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def time_bars(rows: Sequence[dict[str, Any]], width: int = 760) -> Markup:
    """Horizontal p50 and p95 bars of seconds per job on a log axis, one pair per ``upscaled stats`` row."""
    rows = [r for r in rows if r.get("p50_s")]
    if not rows:
        return Markup("")
    label_w, right, top, row_h = 260, 60, 22, 26
    plot_w = width - label_w - right
    height = top + row_h * len(rows) + 8
    lo = math.floor(math.log10(max(1e-4, min(r["p50_s"] for r in rows))))
    hi = math.ceil(math.log10(max(max(r["p95_s"] or r["p50_s"] for r in rows), 10 ** (lo + 1) * 1.0001)))

    def x(v: float) -> float:
        return label_w + plot_w * (math.log10(max(v, 10**lo)) - lo) / (hi - lo)

    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="Seconds per job, p50 and p95, log scale">'
    ]
    for e in range(lo, hi + 1):
        out.append(
            f'<line class="grid" x1="{x(10**e):.1f}" y1="{top - 4}" x2="{x(10**e):.1f}" y2="{height - 8}"/>'
            f'<text class="tick" x="{x(10**e):.1f}" y="{top - 8}" text-anchor="middle">'
            f"{escape(_fmt_s(10.0**e))}</text>"
        )
    for i, r in enumerate(rows):
        y = top + i * row_h
        final = f"x{r['outscale']:g}" + (f" (x{r['scale']:g} model)" if r.get("scale") != r["outscale"] else "")
        name = f"{r['model']} {final} {r['mode']} · {r['folder'] or '(default)'}"
        p50, p95 = r["p50_s"], r["p95_s"] or r["p50_s"]
        out.append(f'<text class="label" x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(name)}</text>')
        out.append(
            f'<rect class="bar p95" x="{label_w}" y="{y + 4}" width="{x(p95) - label_w:.1f}" height="16">'
            f"<title>{escape(name)}: p95 {escape(_fmt_s(p95))}</title></rect>"
        )
        out.append(
            f'<rect class="bar p50" x="{label_w}" y="{y + 4}" width="{x(p50) - label_w:.1f}" height="16">'
            f"<title>{escape(name)}: p50 {escape(_fmt_s(p50))}</title></rect>"
        )
        out.append(
            f'<text class="value" x="{x(p95) + 4:.1f}" y="{y + 16}">{escape(_fmt_s(p50))} / '
            f"{escape(_fmt_s(p95))}</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))


def stage_bars(stages: Sequence[tuple[str, float | None]], width: int = 520) -> Markup:
    """One horizontal bar per stage of a job, scaled to the longest; stages without a time are left out."""
    known = [(name, v) for name, v in stages if v is not None]
    if not known:
        return Markup("")
    longest = max(v for _, v in known) or 1.0
    label_w, value_w, row_h = 70, 90, 20
    plot_w = width - label_w - value_w
    height = row_h * len(known) + 4
    out = [
        f'<svg class="chart stages" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="Stage times">'
    ]
    for i, (name, v) in enumerate(known):
        y = i * row_h + 2
        w = max(1.0, plot_w * v / longest)
        out.append(
            f'<text class="label" x="{label_w - 6}" y="{y + 13}" text-anchor="end">{escape(name)}</text>'
            f'<rect class="bar stage-{escape(name)}" x="{label_w}" y="{y + 2}" width="{w:.1f}" height="14">'
            f"<title>{escape(name)}: {escape(_fmt_s(v))}</title></rect>"
            f'<text class="value" x="{label_w + w + 4:.1f}" y="{y + 13}">{escape(_fmt_s(v))}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))
