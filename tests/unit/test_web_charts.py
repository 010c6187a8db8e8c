"""The web view's SVG charts (daemon/web/charts.py), read back as SVG: the bars say what the figures say."""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET

from daemon.web.charts import per_day

SVG = "{http://www.w3.org/2000/svg}"


def bars(svg: str) -> list[dict]:
    root = ET.fromstring(svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))
    return [
        {"kind": r.get("class").split()[1], **{k: float(r.get(k)) for k in ("x", "y", "height")}}
        for r in root.iter(f"{SVG}rect")
    ]


def test_jobs_per_day_stack_done_and_failed_to_the_days_total():
    days = [
        {"day": dt.date(2026, 1, 1), "done": 3, "failed": 1},
        {"day": dt.date(2026, 1, 2), "done": 0, "failed": 2},
    ]
    svg = str(per_day(days, width=400, height=200))
    plot_h, bottom = 200 - 10 - 26, 200 - 26  # the chart's own margins: top 10, bottom 26
    (done, failed), (only_failed,) = bars(svg)[:2], bars(svg)[2:]
    assert (done["kind"], failed["kind"], only_failed["kind"]) == ("done", "failed", "failed")
    assert done["height"] == plot_h * 3 / 4 and failed["height"] == plot_h * 1 / 4  # the tallest day is the scale
    assert done["y"] + done["height"] == bottom, "done stands on the axis"
    assert failed["y"] + failed["height"] == done["y"], "failed is stacked on done, not drawn over it"
    assert only_failed["y"] + only_failed["height"] == bottom and only_failed["height"] == plot_h / 2
    assert re.search(r"<title>2026-01-01: 3 done, 1 failed</title>", svg)
    assert str(per_day([])) == ""
