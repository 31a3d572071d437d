"""``prism-otel dashboard --prometheus URL -o dashboard.html``: the Grafana dashboard, without Grafana.

Runs every query of the shipped dashboard (dashboards/prism-otel.json, or ``--dashboard FILE``) on a
Prometheus over a time range, with the template variables filled in as Grafana fills them (all jobs,
all instances, ``$__rate_interval`` = ``--rate-interval``), and draws the panels in Grafana's layout
on one offline page (uPlot, inlined as in ``prism-otel report``). For a look at the metrics where no
Grafana runs, and for checking the dashboard against a live Prometheus (tests/test_prometheus.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
import urllib.request
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARD = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "dashboards", "prism-otel.json")


def _legend(fmt: str, labels: dict) -> str:
    out = fmt or "{{__name__}}"
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", str(v))
    return out if "{{" not in out else ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"


def query_panels(prometheus: str, start: float, end: float, dashboard: Optional[str] = None,
                 rate_interval: str = "1m", step: Optional[float] = None) -> dict:
    path = dashboard or DEFAULT_DASHBOARD
    if not os.path.exists(path):
        raise ValueError(f"{path}: no dashboard JSON there (an installed package has none: give --dashboard "
                         "dashboards/prism-otel.json from the repository)")
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    step = step or max(1.0, (end - start) / 300)
    panels = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            panels.append({"type": "row", "title": p["title"], "grid": p["gridPos"]})
            continue
        series = []
        errors = []
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("$job", ".*").replace("$instance", ".*")
            qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
            try:
                with urllib.request.urlopen(f"{prometheus.rstrip('/')}/api/v1/query_range?{qs}", timeout=30) as r:
                    doc = json.loads(r.read())
            except Exception as exc:  # noqa: BLE001 - one failing query is shown on its panel
                errors.append(f"{expr}: {exc}")
                continue
            for s in doc.get("data", {}).get("result", []):
                pts = [(float(ts), float(v)) for ts, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if pts:
                    series.append({"name": _legend(t.get("legendFormat", ""), s["metric"]), "points": pts})
        panels.append({"type": "timeseries", "title": p["title"], "grid": p["gridPos"], "series": series,
                       "unit": p.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
                       "stack": p.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("stacking", {})
                       .get("mode") == "normal", "errors": errors})
    return {"title": dash["title"], "start": start, "end": end, "panels": panels, "prometheus": prometheus}


def render(data: dict) -> str:
    def read(name: str) -> str:
        with open(os.path.join(_HERE, name), encoding="utf-8") as f:
            return f.read()

    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    html = read("dashboard.html")
    return (html.replace("/*UPLOT_CSS*/", read("vendor/uPlot.min.css"))
            .replace("/*UPLOT_JS*/", read("vendor/uPlot.iife.min.js").replace("</script", "<\\/script"))
            .replace("/*DATA*/", payload).replace("__TITLE__", data["title"].replace("<", "&lt;")))


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="the Grafana dashboard's panels from a Prometheus, as one offline HTML page",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)  # None under -OO
    p.add_argument("--prometheus", required=True, metavar="URL", help="e.g. http://127.0.0.1:9090")
    p.add_argument("--minutes", type=float, default=30.0, help="time range: the last N minutes (default 30)")
    p.add_argument("--start", type=float, help="range start (unix seconds); overrides --minutes")
    p.add_argument("--end", type=float, help="range end (unix seconds; default now)")
    p.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    p.add_argument("--dashboard", help="a dashboard JSON (default: the shipped dashboards/prism-otel.json)")
    p.add_argument("-o", "--output", default="prism-dashboard.html")


def dispatch(args) -> Optional[int]:
    if args.cmd != "dashboard":
        return None
    end = args.end or time.time()
    start = args.start or end - args.minutes * 60
    try:
        data = query_panels(args.prometheus, start, end, args.dashboard, args.rate_interval)
    except (OSError, ValueError, KeyError) as exc:
        print(f"prism-otel dashboard: {exc}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(render(data))
    panels = [p for p in data["panels"] if p["type"] != "row"]
    empty = [p["title"] for p in panels if not p["series"]]
    print(f"prism-otel dashboard: {args.output}: {len(panels)} panels, {len(panels) - len(empty)} with data"
          + (f" (empty: {', '.join(empty)})" if empty else ""))
    return 0
