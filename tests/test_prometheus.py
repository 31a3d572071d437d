"""Metrics on a real Prometheus: a real engine run scraped live, the dashboard's queries, the alert rules.

* The rules (otel-config/prometheus/prism-rules.yml) pass ``promtool check rules`` and their unit
  tests (prism-rules.test.yml: the multi-window burn-rate alerts fire on a fast and a slow burn, not
  on a small one).
* A transformers engine under ``prism-otel run`` with ``OTEL_METRICS_EXPORTER=prometheus`` serves
  ``/metrics``; a Prometheus started here scrapes it every second with the rules loaded, through a
  stage stall (so anomalies and an incident exist) and with SLO targets set. Afterwards every query
  of the Grafana dashboard (dashboards/prism-otel.json, template variables filled in as Grafana
  would) returns data on that Prometheus, except the dropped-records panel, which is empty when
  nothing was dropped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse

import pytest

from prism_eval.simulate import scenario
from prism_otel import semconv as sc
from tests import servers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "otel-config", "prometheus", "prism-rules.yml")
DASHBOARD = os.path.join(ROOT, "dashboards", "prism-otel.json")
MAY_BE_EMPTY = {"Records dropped by reason"}


def test_rules_check_and_unit_tests():
    promtool = servers.tool("promtool")
    out = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "test", "rules", os.path.basename(RULES).replace(".yml", ".test.yml")],
                         capture_output=True, text=True, cwd=os.path.dirname(RULES))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def dashboard_queries(rate_interval: str = "10s"):
    with open(DASHBOARD) as f:
        dash = json.load(f)
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("$job", ".*").replace("$instance", ".*")
            yield p["title"], t.get("legendFormat", ""), expr


def dashboard_panels():
    with open(DASHBOARD) as f:
        return [p for p in json.load(f)["panels"] if p["type"] != "row"]


def _query_range(url: str, expr: str, start: float, end: float) -> list:
    qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "2"})
    doc = servers.get_json(f"{url}/api/v1/query_range?{qs}")
    assert doc["status"] == "success", doc
    return [s for s in doc["data"]["result"] if any(v[1] not in ("NaN", "+Inf", "-Inf") for v in s["values"])]


@pytest.mark.slow
def test_dashboard_queries_return_data_from_a_real_engine(tmp_path, monkeypatch):
    port = servers.free_port()
    monkeypatch.setenv(sc.OTEL_METRICS_EXPORTER, "prometheus")
    monkeypatch.setenv(sc.OTEL_EXPORTER_PROMETHEUS_HOST, "127.0.0.1")
    monkeypatch.setenv(sc.OTEL_EXPORTER_PROMETHEUS_PORT, str(port))
    monkeypatch.setenv(sc.ENV_SLO_TTFT_MS, "50")
    monkeypatch.setenv(sc.ENV_SLO_TPOT_MS, "10")
    monkeypatch.setenv(sc.ENV_SLO_STEP_MS, "10")
    monkeypatch.setenv(sc.ENV_INCIDENT_DIR, str(tmp_path / "incidents"))
    with servers.prometheus(str(tmp_path / "prom"), [f"127.0.0.1:{port}"], rule_files=[RULES]) as prom:
        t0 = time.time()
        s = scenario.Scenario.from_dict({
            "name": "metrics", "engine": {"kind": "transformers", "model": "tiny", "threads": 1},
            "workload": {"arrival": "poisson", "rate": 3.0}, "warmup_s": 8, "duration_s": 14, "drain_s": 15,
            "faults": [{"fault": "stage_stall", "at_s": 4, "for_s": 5, "params": {"sleep_ms": 60}}]})
        scenario.run(s, str(tmp_path / "run"), log=lambda *a: None)
        t1 = time.time()
        time.sleep(2.0)  # the rules' evaluation and the last scrape are in
        health = servers.get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
        assert health and health[0]["lastScrapeDuration"] is not None
        # the step histogram resolves millisecond steps: its buckets under 10 ms hold most steps
        fast = _query_range(prom, 'sum(prism_step_duration_seconds_bucket{le="0.01"}) / '
                                  'sum(prism_step_duration_seconds_count)', t0, t1 + 2)
        assert fast and max(float(v[1]) for v in fast[0]["values"]) > 0.5
        empty = []
        checked = 0
        for title, legend, expr in dashboard_queries():
            got = _query_range(prom, expr, t0, t1 + 2)
            checked += 1
            if not got and title not in MAY_BE_EMPTY:
                empty.append(f"{title} [{legend}]: {expr}")
        assert checked >= 25
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        # the recording rules ran on the live data too
        assert _query_range(prom, "prism:step_latency_ratio:rate5m", t0, t1 + 2)
        # `prism-otel dashboard` draws the same panels from that Prometheus: in Chromium, every panel with data drew
        from prism_otel.cli import main as cli

        page = tmp_path / "dashboard.html"
        assert cli(["dashboard", "--prometheus", prom, "--start", str(t0), "--end", str(t1 + 2),
                    "--rate-interval", "10s", "-o", str(page)]) == 0
        from tests.report.test_report import _attrs, _chromium

        dom = _chromium("--dump-dom", page.as_uri())
        assert 'data-ready="1"' in dom
        panels = [_attrs(t) for t in re.findall(r'<div class="panel dash-panel"[^>]*>', dom)]
        assert len(panels) == sum(1 for _ in dashboard_panels())
        for a in panels:
            if a["data-title"] not in MAY_BE_EMPTY:
                assert int(a["data-series"]) > 0 and int(a.get("data-ink", 0)) > 0, a
