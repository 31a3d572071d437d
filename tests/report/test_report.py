"""``prism-otel report`` on a real engine run, rendered in headless Chromium (Debian's ``chromium``).

A transformers engine runs under ``prism-otel run`` with a stage stall in the middle (so there are
judged steps, anomalous steps and an incident). The report is built from its ``otlp/`` spans and its
incident log, opened in headless Chromium with the network off, and the page itself reports, per plot,
how many points it was given and how many pixels of each series' colour it drew: every plot must have
drawn from the data (point counts equal to the data's, ink where there are points), the incident table
must list the incident, and a screenshot is taken.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from prism_eval.simulate import scenario
from prism_otel import semconv as sc
from prism_otel.cli import main as cli
from prism_otel.report import build
from tests import servers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv(sc.ENV_INCIDENT_DIR, str(tmp / "run" / "otlp"))
    try:
        s = scenario.Scenario.from_dict({
            "name": "report", "engine": {"kind": "transformers", "model": "tiny", "threads": 1},
            "workload": {"arrival": "poisson", "rate": 3.0}, "warmup_s": 8, "duration_s": 12, "drain_s": 15,
            "faults": [{"fault": "stage_stall", "at_s": 4, "for_s": 4, "params": {"sleep_ms": 60}}]})
        scenario.run(s, str(tmp / "run"), log=lambda *a: None)
    finally:
        mp.undo()
    return tmp / "run" / "otlp"


def _chromium(*args, timeout=120) -> str:
    exe = servers.tool("chromium")
    out = subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # offline: any fetch fails
                          "--window-size=1400,2800", "--virtual-time-budget=10000", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _attrs(tag: str) -> dict:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def test_report_renders_in_chromium_and_plots_the_data(run_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert cli(["report", str(run_dir), "-o", str(out)]) == 0
    assert "incidents" in capsys.readouterr().out
    html = out.read_text()
    # self-contained: nothing to fetch
    assert not re.search(r'<(script|link|img)[^>]+(src|href)=', html)
    data = build([str(run_dir)])
    assert data["steps"] > 300 and data["requests"] > 10
    assert data["incidents"] and data["incident_source"].startswith("incident log")
    dom = _chromium("--dump-dom", out.as_uri())
    body = _attrs(re.search(r"<body[^>]*>", dom).group(0))
    assert body.get("data-ready") == "1" and "data-error" not in body, body
    plots = {a.get("data-phase") or a.get("id"): a for a in map(_attrs, re.findall(r'<div class="plot[^"]*"[^>]*>', dom))}
    for ph, P in data["phases"].items():
        a = plots[ph]
        assert int(a["data-points"]) == P["shown"] and int(a["data-ink-obs"]) > 0, (ph, a)
        assert int(a["data-expected-points"]) == sum(v is not None for v in P["exp"])
        assert int(a["data-anomalous-points"]) == sum(P["anom"])
        if int(a["data-expected-points"]) > 10:
            assert int(a["data-ink-exp"]) > 100, (ph, a)
        if sum(P["anom"]):
            assert int(a["data-ink-anom"]) > 0, (ph, a)
    dec = plots["decode"]
    assert int(dec["data-points"]) > 200 and int(dec["data-ink-obs"]) > 500
    st = plots["stage-plot"]
    # the first (largest) stage drew; here it is the stalled one, visible only in the fault window's buckets
    assert int(st["data-stages"]) == len(data["stages"]["shares"]) >= 2 and int(st["data-ink-first"]) > 30
    assert int(plots["tput-plot"]["data-ink-requests"]) > 100
    assert int(plots["ttft-plot"]["data-points"]) == len(data["ttft"]["ms"]) and int(plots["ttft-plot"]["data-ink-ttft"]) > 0
    assert dom.count('class="incident-row"') == len(data["incidents"])
    assert dom.count('class="detector-row"') == len(data["phases"])
    png = tmp_path / "report.png"
    _chromium(f"--screenshot={png}", out.as_uri())
    assert png.stat().st_size > 50_000


def test_bad_lines_are_skipped_and_said(run_dir, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in os.listdir(run_dir):
        (mixed / f).write_bytes((run_dir / f).read_bytes())
    with open(mixed / "traces-1.jsonl", "w") as f:
        f.write('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}\nnot json\n')
    out = tmp_path / "r.html"
    assert cli(["report", str(mixed), "-o", str(out)]) == 0
    assert "2 unreadable lines skipped" in capsys.readouterr().out
    assert build([str(mixed)])["steps"] == build([str(run_dir)])["steps"]


def test_no_data_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("hello\n")
    assert cli(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "no prism.step spans found" in err and "x.jsonl:1" in err
    assert cli(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()


def test_real_engine_spans_speak_the_ecosystem_fields(run_dir):
    """On the same real run: service.name is the engine, request spans are named
    `{gen_ai.operation.name} {gen_ai.request.model}` with vLLM's gen_ai.latency.* keys, and decode steps
    carry Dynamo's forward-pass fields."""
    from prism_otel.report.load import load

    spans = load([str(run_dir)]).spans
    assert {s["resource"].get("service.name") for s in spans} == {"transformers"}
    reqs = [s for s in spans if sc.REQUEST_ID in s["attrs"] and not str(s["attrs"][sc.REQUEST_ID]).startswith("warmup")]
    assert reqs
    model = reqs[0]["attrs"][sc.GEN_AI_REQUEST_MODEL]
    assert model and all(s["name"] == f"{sc.GEN_AI_OPERATION_TEXT_COMPLETION} {model}" for s in reqs)
    for key in (sc.GEN_AI_LATENCY_E2E, sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN, sc.GEN_AI_LATENCY_TIME_IN_QUEUE):
        assert all(key in s["attrs"] for s in reqs), key
    dec = [s for s in spans if s["name"] == sc.STEP_SPAN and s["attrs"].get(sc.STEP_PHASE) == "decode"]
    key = sc.FPM_PREFIX + sc.FPM_SCHEDULED + sc.FPM_NUM_DECODE_REQUESTS
    assert dec and all(s["attrs"][key] == s["attrs"][sc.BATCH_SIZE] for s in dec)
