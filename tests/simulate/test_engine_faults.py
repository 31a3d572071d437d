"""Every CPU fault against a real transformers continuous-batching engine running under prism-otel.

One run, six fault episodes with fault-free gaps between them (the faults' default parameters):
labels line up with the injection windows by timestamps, each injector has a clear effect, the
engine recovers after each, every request is served, and nothing is left running or stopped.
"""

from __future__ import annotations

import csv
import json
import os
import statistics

import pytest

from prism_eval.simulate import dataset, scenario
from tests.simulate.helpers import alive, procs_matching

FAULTS = ["cpu_contention", "cpu_throttle", "membw_contention", "gc_storm", "stage_stall", "io_stall"]
AT, FOR, GAP = 3.0, 4.0, 5.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    sc = scenario.Scenario.from_dict({
        "name": "test-cpu-faults", "engine": {"kind": "transformers", "model": "small", "threads": 1},
        "workload": {"arrival": "tidal", "rate": 2.5, "tide": 0.5, "period_s": 15},
        "warmup_s": 10, "duration_s": AT + len(FAULTS) * (FOR + GAP),
        "faults": [{"fault": f, "at_s": AT + i * (FOR + GAP), "for_s": FOR} for i, f in enumerate(FAULTS)]})
    meta = scenario.run(sc, str(out), log=lambda *a: None)
    return out, meta


def test_outputs_and_labels_line_up_with_windows(run):
    out, meta = run
    with open(out / "steps.csv") as f:
        header = next(csv.reader(f))
    assert tuple(header[:len(dataset.STEP_COLUMNS)]) == dataset.STEP_COLUMNS
    steps = dataset.read_csv(str(out / "steps.csv"))
    labels = dataset.read_csv(str(out / "labels.csv"))
    assert len(steps) == len(labels) == meta["steps"]["scored"] > 300
    assert meta["steps"]["train"] > 50 and os.path.getsize(out / "train.csv") > 0
    starts = [int(s["start_ns"]) for s in steps]
    assert starts == sorted(starts)
    assert all(int(s["start_ns"]) >= meta["scored_from_ns"] for s in steps)
    assert list(os.listdir(out / "otlp")) and all(n.endswith(".jsonl") for n in os.listdir(out / "otlp"))
    wins = meta["windows"]
    assert [w["fault"] for w in wins] == FAULTS
    for i, w in enumerate(wins):  # injected when the schedule says, for as long as it says
        planned = meta["scored_from_ns"] + (AT + i * (FOR + GAP)) * 1e9
        assert abs(w["t_start"] - planned) < 0.5e9, w
        assert FOR - 0.1 < (w["t_end"] - w["t_start"]) / 1e9 < FOR + 2.5, w
    for s, lb in zip(steps, labels):  # a step is anomalous iff it overlaps a window, labelled with its fault
        s0, s1 = int(s["start_ns"]), int(s["end_ns"])
        hit = [w["fault"] for w in wins if s0 <= w["t_end"] and s1 >= w["t_start"]]
        assert int(lb["anomaly"]) == bool(hit) and lb["fault"] == (hit[0] if hit else "")
        assert int(lb["start_ns"]) == s0
    for f in FAULTS:
        assert sum(1 for lb in labels if lb["fault"] == f) >= 5, f


def test_every_injector_has_a_clear_effect(run):
    _, meta = run
    for f in FAULTS:
        e = meta["effects"][f]
        # step latency over same-shape steps outside the faults. io_stall acts through the disk, whose
        # speed the runner decides, so it must only be measurable: with an fdatasync every 64 MB, 1.09x-2.5x
        # was seen here across runs and 0.997x on one CI runner; every 4 MB (its default since), 1.9x here
        assert e["ratio"] >= (1.05 if f == "io_stall" else 1.3), e


def test_engine_recovers_after_each_fault(run):
    out, meta = run
    steps = dataset.read_csv(str(out / "steps.csv"))
    labels = dataset.read_csv(str(out / "labels.csv"))
    for s in steps:
        for k in ("start_ns", "end_ns"):
            s[k] = int(s[k])
    for lb in labels:
        lb["anomaly"] = int(lb["anomaly"])
    base = dataset.Yardstick(dataset._baseline(steps, labels, 1.0))
    for w in meta["windows"]:  # the second half of the fault-free gap that follows each window
        lo, hi = w["t_end"] + GAP / 2 * 1e9, w["t_end"] + (GAP - 0.3) * 1e9
        rel = base.relative([s for s in steps if lo <= s["start_ns"] < hi])
        assert len(rel) >= 10, w["fault"]
        assert statistics.median(rel) < 1.5, (w["fault"], statistics.median(rel))
    served = [json.loads(ln) for ln in open(out / "requests.jsonl")]
    assert len(served) == meta["requests"] and not [r for r in served if r["error"]]


def test_nothing_left_running(run):
    out, meta = run
    assert procs_matching(f'"parent": {os.getpid()}') == []  # injector processes
    assert procs_matching(str(out)) == []  # the engine and anything started with the run dir
    assert not any(alive(p) for p in meta["target"]["pids"])
    assert [n for n in os.listdir(out) if n.startswith(".prism-sim-io")] == []  # io_stall's scratch files
    infos = {w["fault"]: w["info"] for w in meta["windows"]}
    assert infos["stage_stall"]["stalls"] > 0 and infos["stage_stall"]["left_passthrough"] is False
    assert infos["gc_storm"]["rounds"] > 0


def test_root_cause_names_contention_and_says_unknown_on_normal_steps(run):
    """The root cause on this run as ``prism-otel detect --train`` reaches it: the steps flagged inside the
    cpu_contention window name ``cpu.contention``; a normal step that is flagged names a resource only
    with evidence beyond what this engine's own normal steps show (issue 24: a confident wrong cause is
    a defect), and mostly says unknown/workload."""
    from prism_eval.simulate import rcscore, runscore, stepcsv
    from prism_otel import semconv as sc
    from processors.anomaly import AnomalyProcessor

    out, meta = run
    proc = AnomalyProcessor({"background": False, "alert_file": "none", "alert_log": False})
    proc.train([s for s in stepcsv.read(str(out / "train.csv"))[2] if s is not None])
    flags, roots, conf = [], [], []
    for s in stepcsv.read(str(out / "steps.csv"))[2]:
        j = proc.process(s) if s is not None else None
        v = j.verdict if j is not None else None
        bad = bool(v is not None and v.expected_ms is not None and v.anomaly)
        flags.append(int(bad))
        roots.append(v.root_cause if bad else None)
        conf.append(j.attributes.get(sc.EVIDENCE_CONFIDENCE) if bad else None)
    proc.shutdown()
    labels = runscore._int_rows(dataset.read_csv(str(out / "labels.csv")))
    res = rcscore.score(flags, roots, labels, meta["windows"])
    cc = res["cpu_contention"]
    assert cc["flagged"] >= 3 and cc["top1"] >= 0.8, cc
    fps = [(r, c) for r, c, f, lb in zip(roots, conf, flags, labels)
           if f and not lb["anomaly"] and str(lb.get("scored", "1")) not in ("0", "0.0")]
    named = [c for r, c in fps if r not in rcscore.HONEST]
    assert all(c is not None and c >= 0.3 for c in named), named
    print(f"false positives {len(fps)}, honest {len(fps) - len(named)}; causes {res['all']['fp_causes']}")
