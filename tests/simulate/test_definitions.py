"""Workloads, labels and scenario files: the parts of the toolkit that need no engine."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys

import pytest

from prism_eval.simulate import dataset, scenario
from prism_eval.simulate.workload import WorkloadSpec, prompt_text


def test_arrivals_are_deterministic_open_loop_and_tidal():
    w = WorkloadSpec.from_dict({"arrival": "tidal", "rate": 20, "tide": 0.8, "period_s": 10, "seed": 3})
    a = w.arrivals(100)
    assert a == w.arrivals(100)
    assert a != WorkloadSpec.from_dict({"arrival": "tidal", "rate": 20, "tide": 0.8, "period_s": 10}).arrivals(100)
    assert all(x.t_s < y.t_s for x, y in zip(a, a[1:]))
    assert abs(len(a) / 100 - 20) < 2.5
    # the rate follows the tide: rising half-periods hold many more arrivals than falling ones
    hi = sum(1 for x in a if (x.t_s % 10) < 5)
    lo = len(a) - hi
    assert hi > 2 * lo
    flat = WorkloadSpec.from_dict({"arrival": "poisson", "rate": 20}).arrivals(100)
    gaps = [y.t_s - x.t_s for x, y in zip(flat, flat[1:])]
    assert abs(statistics.mean(gaps) - 0.05) < 0.01
    assert abs(statistics.stdev(gaps) / statistics.mean(gaps) - 1) < 0.2  # exponential gaps: cv ~ 1


def test_lengths_are_heavy_tailed_and_clipped():
    w = WorkloadSpec.from_dict({"prompt": {"median": 50, "sigma": 1.0, "min": 4, "max": 2000}})
    p = sorted(x.prompt_tokens for x in w.arrivals(2000))
    med, p99 = p[len(p) // 2], p[int(0.99 * len(p))]
    assert 40 <= med <= 60 and p99 > 5 * med and p[0] >= 4 and p[-1] <= 2000
    assert len(prompt_text(10, 1)) == 9


@pytest.mark.parametrize("bad", [{"arrival": "burst"}, {"rate": 0}, {"tide": 1.5}, {"bogus": 1},
                                 {"prompt": {"median": 5, "min": 10}}])
def test_bad_workloads(bad):
    with pytest.raises(ValueError):
        WorkloadSpec.from_dict(bad)


def _row(i, start_ms, dur_ms):
    s = int(start_ms * 1e6)
    return {"instance": "x", "start_ns": s, "end_ns": s + int(dur_ms * 1e6), "duration_us": dur_ms * 1e3,
            "phase": "decode", "batch_size": 2, "prefill_tokens": 0, "decode_tokens": 2, "context_tokens": 10,
            "max_context_tokens": 5}


def test_labels_follow_window_overlap():
    rows = [_row(i, i * 10, 8) for i in range(10)]  # steps [0,8], [10,18], ... ms
    w = [{"fault": "cpu_throttle", "t_start": int(25e6), "t_end": int(50e6)}]
    lab = dataset.label(rows, w)
    # overlap of [start, end] with [25, 50] ms: steps at 20 (ends 28), 30, 40, 50 (starts at 50: closed)
    assert [x["anomaly"] for x in lab] == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert {x["fault"] for x in lab if x["anomaly"]} == {"cpu_throttle"}


def test_effect_and_yardstick():
    rows = [_row(i, i * 10, 8) for i in range(200)]
    for r in rows[100:150]:
        r["duration_us"] *= 3
    w = [{"fault": "f", "t_start": rows[100]["start_ns"], "t_end": rows[149]["end_ns"]}]
    lab = dataset.label(rows, w)
    e = dataset.effect(rows, lab, "f")
    assert e["steps_in"] == 50 and math.isclose(e["ratio"], 3.0, rel_tol=0.01)
    rec = dataset.recovery(rows, lab, w[0], after_s=0.05, span_s=0.2)
    assert math.isclose(rec["ratio"], 1.0, rel_tol=0.01)


def test_recovery_period_is_set_aside_until_the_engine_is_back_within_5_percent(tmp_path):
    rows = [_row(i, i * 10, 8) for i in range(400)]
    for r in rows[100:150]:  # the fault: 3x
        r["duration_us"] *= 3
    for k, r in enumerate(rows[150:210]):  # after it: 1.3x easing to 1.0x over 60 steps
        r["duration_us"] *= 1.3 - 0.3 * k / 60
    w = [{"fault": "f", "t_start": rows[100]["start_ns"], "t_end": rows[149]["end_ns"]}]
    lab = dataset.label(rows, w)
    res = dataset.recovery_periods(rows, lab, w, rows[:100])
    aside = [i for i, x in enumerate(lab) if not x["scored"]]
    # back within 5% once the median of the next 20 steps is under 1.05x: about 3/4 of the way down the ramp
    assert res[0]["recovered"] and aside[0] == 150 and 185 <= aside[-1] + 1 <= 205, (aside[0], aside[-1])
    assert res[0]["steps_set_aside"] == len(aside) and not res[0]["capped"]
    assert all(x["scored"] for x in lab[100:150]) and all(x["anomaly"] for x in lab[100:150])
    # the labels file a detector reads: those steps are not scored (-1)
    dataset.write_csv(str(tmp_path / "labels.csv"), lab, dataset.LABEL_COLUMNS)
    from prism_eval.simulate import stepcsv

    read = stepcsv.read_labels(str(tmp_path / "labels.csv"))
    assert [i for i, v in enumerate(read) if v == -1] == aside and sum(v == 1 for v in read) == 50


def test_recovery_that_never_comes_is_capped_at_a_fifth_of_the_steps():
    rows = [_row(i, i * 10, 8) for i in range(300)]
    for r in rows[50:]:
        r["duration_us"] *= 1.5  # never back
    w = [{"fault": "f", "t_start": rows[50]["start_ns"], "t_end": rows[59]["end_ns"]}]
    lab = dataset.label(rows, w)
    res = dataset.recovery_periods(rows, lab, w, rows[:50])
    assert not res[0]["recovered"] and res[0]["capped"]
    assert sum(not x["scored"] for x in lab) == 60  # 20% of 300


def test_library_scenarios_load():
    names = scenario.library()
    assert {"cpu-faults-transformers", "cpu-faults-vllm", "gpu-faults-1b", "no-fault-tidal"} <= set(names)
    for n in names:
        sc = scenario.load(n)
        assert sc.description and sc.duration_s > 0
    cpu = scenario.load("cpu-faults-transformers")
    assert {e.fault for e in cpu.faults} == {"cpu_contention", "cpu_throttle", "membw_contention", "gc_storm",
                                             "stage_stall", "io_stall"}


@pytest.mark.parametrize("doc,msg", [
    ({"bogus": 1}, "unknown keys"),
    ({"engine": {"kind": "sglang"}}, "engine.kind"),
    ({"faults": [{"fault": "nope"}]}, "faults\\[0\\].fault"),
    ({"faults": [{"fault": "cpu_throttle", "params": {"duty": 1}}]}, "params: unknown"),
    ({"duration_s": 20, "faults": [{"fault": "cpu_throttle", "at_s": 1, "for_s": 5},
                                   {"fault": "gc_storm", "at_s": 3, "for_s": 2}]}, "overlaps"),
    ({"duration_s": 10, "faults": [{"fault": "gc_storm", "at_s": 8, "for_s": 5}]}, "after duration_s"),
])
def test_bad_scenarios(doc, msg):
    with pytest.raises(ValueError, match=msg):
        scenario.Scenario.from_dict(doc)


def test_quick_form():
    sc = scenario.quick("vllm", "small", "cpu_throttle", 60, params={"run_fraction": 0.4})
    assert [(e.at_s, e.for_s) for e in sc.faults] == [(12.0, 7.5), (36.0, 7.5)]
    assert sc.faults[0].params == {"run_fraction": 0.4}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prism_otel.cli", "simulate", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_list_and_bad_input(tmp_path):
    p = _cli("--list")
    assert p.returncode == 0
    names = [ln.split()[0] for ln in p.stdout.splitlines()]
    assert names == ["cpu_contention", "cpu_throttle", "membw_contention", "gc_storm", "stage_stall", "io_stall",
                     "gpu_sm_contention", "pcie_saturation", "gpu_mem_churn"]
    assert _cli("--scenarios").returncode == 0
    assert _cli("--engine", "transformers", "--fault", "nope", "--out", str(tmp_path / "o")).returncode == 2
    assert _cli("--engine", "transformers", "--fault", "gc_storm", "--set", "x", "--out", str(tmp_path)).returncode == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    p = _cli("--engine", "transformers", "--fault", "gc_storm", "--out", str(tmp_path / "full"))
    assert p.returncode == 2 and "not an empty directory" in p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfaults: [{fault: cpu_throttle, at_s: -1}]\n")
    p = _cli("--scenario", str(bad), "--out", str(tmp_path / "o2"))
    assert p.returncode == 2 and "bad.yaml.faults[0]" in p.stderr
    assert not os.path.exists(tmp_path / "o2")
