"""A real engine, a real fault, a real Alertmanager: one incident per fault window, none when healthy.

The transformers continuous-batching engine runs under ``prism-otel run`` (the simulation toolkit's
scenario runner drives its load and injects the fault with prism_otel/simulate/faults.py). Its
incidents go to an Alertmanager this test starts (v2 API), which notifies a receiver of the test's
own (firing and resolved), and straight to the test's webhook. A run with a stage stall must give
exactly one incident that opens after the fault starts and closes after it ends, with its root
cause; a fault-free run of the same length, judged by the same detector, must give none.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from prism_otel import semconv as sc
from prism_otel.simulate import dataset, scenario
from tests import servers

WARMUP, DURATION, AT, FOR = 12.0, 20.0, 6.0, 6.0


def _run(tmp, name, faults, monkeypatch):
    recv = servers.Receiver()
    try:
        with servers.alertmanager(str(tmp / f"am-{name}"), recv.url + "/am") as am:
            monkeypatch.setenv(sc.ENV_ALERTMANAGER_URL, am)
            monkeypatch.setenv(sc.ENV_ALERT_WEBHOOK, recv.url + "/hook")
            monkeypatch.setenv(sc.ENV_INCIDENT_DIR, str(tmp / f"incidents-{name}"))
            monkeypatch.setenv(sc.ENV_INCIDENT_CONFIG, "resend_s=2")
            s = scenario.Scenario.from_dict({
                "name": name, "engine": {"kind": "transformers", "model": "tiny", "threads": 1},
                "workload": {"arrival": "poisson", "rate": 3.0}, "warmup_s": WARMUP, "duration_s": DURATION,
                "drain_s": 20, "faults": faults})
            meta = scenario.run(s, str(tmp / name), log=lambda *a: None)
            time.sleep(3.0)  # Alertmanager's group_interval (1 s) for the last resolved notification
            firing = [a for n in recv.at("/am") if n.get("status") == "firing" for a in n["alerts"]]
            resolved = [a for n in recv.at("/am") if n.get("status") == "resolved" for a in n["alerts"]]
            with open(os.path.join(tmp, f"am-{name}", "alerts.json"), "w") as f:
                json.dump(recv.bodies, f, default=str)
            return meta, firing, resolved, recv.at("/hook")
    finally:
        recv.close()


def _judged(out_dir) -> int:
    spans = dataset.read_spans(dataset.otlp_files(os.path.join(out_dir, "otlp")))
    rows = dataset.steps_from_spans(spans)
    return sum(1 for r in rows if r.get("online_expected_us") not in (None, ""))


@pytest.mark.slow
def test_one_incident_per_fault_window_and_none_when_healthy(tmp_path, monkeypatch):
    meta, firing, resolved, hook = _run(tmp_path, "fault", [
        {"fault": "stage_stall", "at_s": AT, "for_s": FOR, "params": {"sleep_ms": 60}}], monkeypatch)
    (w,) = meta["windows"]
    assert [e["event"] for e in hook] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE], hook
    opened, closed = hook[0]["incident"], hook[1]["incident"]
    assert opened["id"] == closed["id"]
    # it opened within 3 s of the fault's start, started inside the window, closed after the fault ended
    assert w["t_start"] - 0.5e9 <= opened["start_ns"] <= w["t_end"]
    assert hook[0]["time_unix_nano"] - w["t_start"] < 3e9, (hook[0]["time_unix_nano"] - w["t_start"]) / 1e9
    assert closed["close_ns"] >= w["t_end"] and closed["end_ns"] <= w["t_end"] + 2e9
    assert closed["root_cause"] in ("stage.update", "stage:update"), closed
    assert closed["stages"] and closed["stages"][0]["stage"] == "update"
    assert closed["steps_affected"] > 20 and closed["peak_ratio"] > 2
    # Alertmanager: that incident, and only it, notified once firing and once resolved
    assert [a["labels"]["incident_id"] for a in firing] == [opened["id"]], firing
    assert [a["labels"]["incident_id"] for a in resolved] == [opened["id"]], resolved
    a = resolved[0]
    assert a["labels"]["alertname"] == sc.INCIDENT_ALERTNAME and a["annotations"]["root_cause"] == closed["root_cause"]
    # the incident log that `prism-otel alerts` follows has the same two events
    (log,) = os.listdir(tmp_path / "incidents-fault")
    with open(tmp_path / "incidents-fault" / log) as f:
        assert [json.loads(x)["incident"]["id"] for x in f] == [opened["id"]] * 2

    meta2, firing2, resolved2, hook2 = _run(tmp_path, "healthy", [], monkeypatch)
    judged = _judged(tmp_path / "healthy")
    assert judged > 1000, judged  # the detector did judge the healthy run: "none" means something
    assert hook2 == [] and firing2 == [] and resolved2 == [], hook2
