"""Incident grouping (processors.incidents) on step streams whose verdicts are given: the rules alone.

The real chain (engine, detector, fault, Alertmanager) is tests/processors/test_incidents_alertmanager.py.
"""

from __future__ import annotations

import json
import random

import pytest

from prism_otel import semconv as sc
from prism_otel.record import StepRecord, Verdict
from processors import notify
from processors.incidents import IncidentConfig, IncidentProcessor, replay

MS = 1_000_000


class Sink:
    def __init__(self):
        self.events = []

    def notify(self, ev):
        self.events.append(json.loads(json.dumps(ev)))

    def close(self, timeout=0):
        pass


def stream(n, step_ms=3.0, anomalous=lambda i: False, cause=lambda i: None, phase="decode", t0=10**18,
           stages=True, slow=lambda i: 1.0):
    t = t0
    out = []
    for i in range(n):
        dur = int(step_ms * MS * slow(i))
        st = {}
        if stages:
            upd = int(0.2 * MS * (20 if cause(i) == "stage.update" else 1))
            st = {"forward": (t, t + dur - upd), "update": (t + dur - upd, t + dur)}
        a = anomalous(i)
        out.append(StepRecord(instance="h:1", index=i, start_ns=t, end_ns=t + dur, phase=phase, batch_size=4,
                              prefill_tokens=0, decode_tokens=4, stages=st,
                              verdict=Verdict(expected_ms=step_ms, score=2.0 if a else 0.1, anomaly=a,
                                              root_cause=cause(i) if a else None)))
        t += dur
    return out


def run(steps, **cfg):
    sink = Sink()
    p = IncidentProcessor(cfg, sinks=[sink])
    for s in steps:
        p.process(s)
    return p, sink.events


def test_scattered_flags_in_a_healthy_stream_open_nothing():
    rng = random.Random(1)
    # 2% of steps flagged at random; now and then a stall of 400 ms (one step) and the 8 flagged steps after it
    stall = set(rng.randrange(20000) for _ in range(20))
    after = {k + j for k in stall for j in range(1, 9)}
    steps = stream(20000, anomalous=lambda i: rng.random() < 0.02 or i in stall or i in after,
                   slow=lambda i: 133 if i in stall else 1.0)
    p, ev = run(steps)
    assert ev == [] and p.opened == 0


def test_the_incident_names_the_cause_of_most_extra_time_not_of_most_steps():
    """A neighbour's burst (many steps a little slow, cpu.contention) runs into a stall (fewer steps, each 20x):
    one incident, and its root cause is where the time went; both causes are listed with their ms."""
    burst, stall = range(2000, 2600), range(2600, 2800)
    steps = stream(6000, anomalous=lambda i: i in burst or i in stall,
                   cause=lambda i: "cpu.contention" if i in burst else ("stage.update" if i in stall else None),
                   slow=lambda i: 1.5 if i in burst else (20.0 if i in stall else 1.0))
    _, ev = run(steps)
    assert [e["event"] for e in ev] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE]
    c = ev[1]["incident"]
    assert c["root_causes"] == {"cpu.contention": 600, "stage.update": 200}  # more steps of contention
    assert c["root_causes_ms"]["stage.update"] > c["root_causes_ms"]["cpu.contention"] > 0
    assert c["root_cause"] == "stage.update"
    assert ev[0]["incident"]["root_cause"] == "cpu.contention"  # at opening, the burst was all there was


def test_a_stall_now_and_then_does_not_hold_an_incident_open():
    rng = random.Random(8)
    stall = set(range(4500, 9000, 500))  # one 400 ms stall every 1.5-2 s after the fault
    steps = stream(9000, anomalous=lambda i: (2000 <= i < 4000 and rng.random() < 0.7) or i in stall,
                   slow=lambda i: 133 if i in stall else 1.0)
    p, ev = run(steps)
    assert [e["event"] for e in ev] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE]


def test_one_fault_window_is_one_incident_with_its_facts():
    fault = range(2000, 4000)  # 6 s at 3 ms a step, 70% of its steps flagged
    rng = random.Random(2)
    steps = stream(8000, anomalous=lambda i: i in fault and rng.random() < 0.7,
                   cause=lambda i: ("stage.update" if i % 3 else "unknown") if i in fault else None,
                   slow=lambda i: 2.5 if i in fault else 1.0)
    p, ev = run(steps)
    assert [e["event"] for e in ev] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE]
    opened, closed = ev[0]["incident"], ev[1]["incident"]
    assert opened["id"] == closed["id"] and closed["number"] == 1
    # opens within a second of the fault's start, starts at its first flagged step
    fault_start = steps[2000].start_ns
    assert 0 <= opened["start_ns"] - fault_start < 0.1e9
    assert ev[0]["time_unix_nano"] - fault_start < 1e9
    c = closed
    assert c["root_cause"] == "stage.update" and c["phases"] == {"decode": c["steps_affected"]}
    assert 1000 < c["steps_affected"] <= 2000 and c["steps_judged"] > c["steps_affected"]
    assert abs(c["duration_s"] - (steps[3999].end_ns - steps[2000].start_ns) / 1e9) < 0.3
    assert c["peak_ratio"] == pytest.approx(2.5, rel=0.01)
    assert c["stages"] and c["stages"][0]["stage"] == "update" and c["stages"][0]["mean_ms"] > 2 and c["stages"][0]["normal_ms"] < 0.5
    assert c["close_reason"] == "recovered"
    assert 2.0 < (c["close_ns"] - steps[3999].end_ns) / 1e9 < 3.3  # hysteresis


def test_gaps_inside_a_fault_do_not_split_it_and_two_faults_are_two():
    rng = random.Random(3)

    def anom(i):
        if 1000 <= i < 3000:  # flags come and go with one quiet second in the middle
            return not (1800 <= i < 2133) and rng.random() < 0.6
        return 5000 <= i < 6500 and rng.random() < 0.6

    p, ev = run(stream(9000, anomalous=anom))
    assert [e["event"] for e in ev] == ["prism.incident.open", "prism.incident.close"] * 2
    assert [e["incident"]["number"] for e in ev] == [1, 1, 2, 2]


def test_steps_put_down_to_their_workload_page_nobody():
    """A stretch the detector flags where the root cause says ``workload`` (beyond what the model was fitted
    on, the engine running as usual: the model's blind spot) opens nothing; the same stretch with the cause
    unknown is an incident, and workload steps inside a real one do not hold it open."""
    blind = range(2000, 2400)
    steps = stream(4000, anomalous=lambda i: i in blind, cause=lambda i: sc.ROOT_WORKLOAD, slow=lambda i: 1.6 if i in blind else 1.0)
    p, ev = run(steps)
    assert ev == [] and p.opened == 0
    assert all(s.verdict.anomaly for s in steps[2000:2400])  # still flagged on the spans
    steps = stream(4000, anomalous=lambda i: i in blind, cause=lambda i: sc.ROOT_UNKNOWN, slow=lambda i: 1.6 if i in blind else 1.0)
    assert [e["event"] for e in run(steps)[1]] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE]
    # a fault (2000-2400) followed by a flagged workload stretch (2400-3400): it ends with the fault
    steps = stream(5000, anomalous=lambda i: 2000 <= i < 3400,
                   cause=lambda i: sc.ROOT_UNKNOWN if i < 2400 else sc.ROOT_WORKLOAD, slow=lambda i: 1.6 if 2000 <= i < 3400 else 1.0)
    _, ev = run(steps)
    assert [e["event"] for e in ev] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE]
    assert ev[1]["incident"]["end_ns"] <= steps[2399].end_ns
    assert ev[1]["incident"]["close_ns"] < steps[3399].end_ns


def test_shutdown_closes_an_open_incident_once():
    rng = random.Random(4)
    p, ev = run(stream(3000, anomalous=lambda i: i > 1000 and rng.random() < 0.8))
    assert [e["event"] for e in ev] == [sc.INCIDENT_EVENT_OPEN]
    p.shutdown()
    p.shutdown()
    assert p.stats()["closed"] == 1
    assert p.events[-1]["incident"]["close_reason"] == "shutdown"


def test_unjudged_steps_are_no_evidence():
    steps = [s.__class__(**{**s.__dict__, "verdict": None}) for s in stream(3000)]
    p, ev = run(steps)
    assert ev == [] and p.tracker("h:1").open_win.q == type(p.tracker("h:1").open_win.q)()


def test_replay_matches_live():
    rng = random.Random(5)
    steps = stream(8000, anomalous=lambda i: 2000 <= i < 4000 and rng.random() < 0.7)
    p, ev = run(steps)
    incs = replay(steps)
    assert len(incs) == 1 and incs[0].start_ns == ev[0]["incident"]["start_ns"]


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="open_fraction"):
        IncidentConfig.from_dict({"open_fraction": 2})
    with pytest.raises(ValueError, match="close_fraction"):
        IncidentConfig.from_dict({"close_fraction": 0.5})
    with pytest.raises(ValueError, match="alertmanager_url"):
        IncidentConfig.from_dict({"alertmanager_url": "localhost:9093"})
    with pytest.raises(ValueError, match="unknown key"):
        IncidentConfig.from_dict({"nope": 1})


def test_a_broken_sink_does_not_stop_the_others():
    class Broken(Sink):
        def notify(self, ev):
            raise RuntimeError("boom")

    good = Sink()
    p = IncidentProcessor({}, sinks=[Broken(), good])
    rng = random.Random(6)
    for s in stream(3000, anomalous=lambda i: i > 1000 and rng.random() < 0.8):
        p.process(s)
    assert len(good.events) == 1 and p.sink_errors == 1


def test_incident_log_writes_the_line_and_the_follow_file(tmp_path, capsys):
    log = notify.IncidentLog(stderr=True, file=str(tmp_path / "mine.jsonl"), follow_dir=str(tmp_path / "f"), pid=42)
    p = IncidentProcessor({}, sinks=[log])
    rng = random.Random(7)
    for s in stream(8000, anomalous=lambda i: 2000 <= i < 4000 and rng.random() < 0.7, cause=lambda i: "gc"):
        p.process(s)
    p.shutdown()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "INCIDENT #1 OPEN" in err[0] and "INCIDENT #1 CLOSED" in err[1] and "gc" in err[1]
    lines = (tmp_path / "f" / "incidents-42.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE]
    assert (tmp_path / "mine.jsonl").read_text() == (tmp_path / "f" / "incidents-42.jsonl").read_text()


def test_collector_processor_config():
    from prism_otel.collector.errors import ConfigError
    from prism_otel.collector.prism_processors import config_class

    PrismIncidentsConfig = config_class("prism_incidents")

    with pytest.raises(ConfigError) as e:
        PrismIncidentsConfig.from_yaml({"alertmanager_url": "localhost:9093"}, "processors::prism_incidents")
    assert "alertmanager_url" in str(e.value)
    cfg = PrismIncidentsConfig.from_yaml({"open_fraction": 0.5, "stderr": False, "follow": False},
                                         "processors::prism_incidents")
    p = cfg.create(None)
    assert isinstance(p, IncidentProcessor) and p.cfg.open_fraction == 0.5 and p.cfg.log_per_engine is False
    rng = random.Random(9)
    for s in stream(3000, anomalous=lambda i: i > 1000 and rng.random() < 0.8):
        p.process(s)
    assert p.opened == 1
    p.forget_instance("h:1")  # an evicted instance's open incident closes
    assert p.closed_count == 1 and p.events[-1]["incident"]["close_reason"] == "evicted"


def test_alertmanager_names_are_valid_label_names():
    """Alertmanager refuses a whole alert (HTTP 400) whose annotation names are not label names; evidence
    keys from the root cause (cpu.slow_ms, ...) carry dots."""
    import re

    ob = notify.AlertmanagerOutbox("http://127.0.0.1:9/api/v2/alerts")
    inc = {"id": "i-1", "instance": "vm:1", "start_ns": 1, "close_ns": 2, "root_cause": "cpu.slow",
           "evidence": {"cpu.slow_ms": 3.5, "extra_ms": 4.0, "9lives": 1, "wait.run_queue_ms": 2}}
    body = ob.alert({"event": sc.INCIDENT_EVENT_CLOSE, "incident": inc})
    names = list(body["labels"]) + list(body["annotations"])
    assert all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", n) for n in names), names
    assert body["annotations"]["evidence_cpu_slow_ms"] == "3.5"
