"""Root cause from the evidence: each cause on its own signature, ranking, honesty, DeepDive, the collector."""

from __future__ import annotations

import dataclasses
import random

import pytest

from prism_otel import semconv as sc
from prism_otel.record import StepRecord
from processors import rootcause
from processors.anomaly import AnomalyProcessor
from processors.rootcause import SignalNorms, StageNorms, explain
from tests.processors.streams import QUIET

S = sc  # short


def _step(y, i=0, stages=None, **sig):
    """A decode step of y ms; signals by keyword (dots as double underscores)."""
    t0 = 1_000_000_000_000 + i * 200_000_000
    signals = {k.replace("__", "."): float(v) for k, v in sig.items()}
    st = {}
    if stages:
        t = t0
        for n, ms in stages.items():
            st[n] = (t, t + int(ms * 1e6))
            t += int(ms * 1e6)
    return StepRecord(instance="i", index=i, start_ns=t0, end_ns=t0 + int(y * 1e6), phase="decode", batch_size=4,
                      prefill_tokens=0, decode_tokens=4, context_tokens=100, max_context_tokens=30, stages=st,
                      signals=signals)


def _normal(y, rng):
    """A normal step: 80% on a CPU, 15% waiting, the rest off; a little kernel and other work around."""
    return dict(cpu__run_ms=0.8 * y * rng.uniform(0.95, 1.05), cpu__wait_ms=0.15 * y * rng.uniform(0.8, 1.2),
                process__cpu_ms=0.85 * y, host__user_ms=1.3 * y, host__system_ms=0.05 * y, host__iowait_ms=0,
                psi__io_some_ms=0, gc__ms=0, cpu__stopped_ms=0, cpu__blocked_ms=0, cgroup__throttled_ms=0)


@pytest.fixture(scope="module")
def norms():
    rng = random.Random(1)
    n = SignalNorms()
    for i in range(64):
        y = rng.uniform(9, 11)
        s = _step(y, i, **_normal(y, rng))
        n.add(y, rootcause._quantities(s, s.signals))
    return n


@pytest.fixture(scope="module")
def stage_norms():
    import numpy as np

    rows = [{"schedule": 1.0 + 0.01 * (i % 5), "forward": 8.0 + 0.05 * (i % 7), "update": 1.0} for i in range(60)]
    return StageNorms.fit(rows, np.full(60, 10.0), np.full(60, 4.0))


def _sig(y, **over):
    base = _normal(y, random.Random(2))
    base.update(over)
    return base


CASES = {
    # waiting for a CPU that other processes' user time took
    S.ROOT_CPU_CONTENTION: dict(y=40, cpu__run_ms=8, cpu__wait_ms=31, host__user_ms=80, process__cpu_ms=8.5),
    # stopped: seen stopped (from outside), or stops counted on parked threads (from inside)
    S.ROOT_CPU_THROTTLED: dict(y=40, cpu__run_ms=8, cpu__wait_ms=1.5, cpu__stopped_ms=20, host__user_ms=20,
                               process__cpu_ms=8.5),
    # the cgroup's CFS quota: its throttled time shows as waiting
    "cfs": dict(y=40, cpu__run_ms=8, cpu__wait_ms=31, cgroup__throttled_ms=30, host__user_ms=12, process__cpu_ms=8.5),
    # longer on a CPU for the same work, nobody else around
    S.ROOT_CPU_SLOW: dict(y=25, cpu__run_ms=22, cpu__wait_ms=1.5, process__cpu_ms=22.5, host__user_ms=30),
    # the engine's own threads churning garbage and collecting: they take the CPU, it waits
    S.ROOT_GC: dict(y=40, cpu__run_ms=8, cpu__wait_ms=28, gc__ms=8, process__cpu_ms=40, host__user_ms=55),
    # kernel time on the engine's CPUs while I/O stalls
    S.ROOT_IO: dict(y=40, cpu__run_ms=8, cpu__wait_ms=30, host__system_ms=30, host__user_ms=14, process__cpu_ms=8.5,
                    psi__io_some_ms=25),
}


@pytest.mark.parametrize("cause", sorted(CASES))
def test_each_signature_names_its_cause(cause, norms):
    c = dict(CASES[cause])
    y = c.pop("y")
    res = explain(_step(y, **_sig(y, **c)), 10.0, norms)
    want = S.ROOT_CPU_THROTTLED if cause == "cfs" else cause
    assert res.root == want, (res.root, res.explained)
    assert res.share >= 0.6
    attrs = res.attributes()
    assert attrs[S.EVIDENCE_EXTRA_MS] == pytest.approx(y - 10.0)
    assert attrs[S.evidence_attribute(want + "_ms")] > 0


def test_stalled_stage_while_the_cpu_was_idle(norms, stage_norms):
    y = 50.0  # update slept 40 ms: off a CPU, in one stage
    st = _step(y, stages={"schedule": 1.0, "forward": 8.0, "update": 41.0},
               **_sig(y, cpu__run_ms=8.2, cpu__wait_ms=1.5, host__user_ms=14, process__cpu_ms=8.7))
    res = explain(st, 10.0, norms, stage_norms)
    assert res.root == S.ROOT_STAGE_PREFIX + "update" and res.share > 0.8
    # the same stage excess with the engine waiting for a CPU is contention, not the stage
    st2 = _step(y, stages={"schedule": 1.0, "forward": 41.0, "update": 8.0},
                **_sig(y, cpu__run_ms=8.2, cpu__wait_ms=40, host__user_ms=90, process__cpu_ms=8.7))
    assert explain(st2, 10.0, norms, stage_norms).root == S.ROOT_CPU_CONTENTION


def test_ranking_main_and_contributing(norms):
    y = 50.0  # 25 ms waiting for others, 13 ms longer on a CPU
    res = explain(_step(y, **_sig(y, cpu__run_ms=21, cpu__wait_ms=26.5, host__user_ms=90, process__cpu_ms=21.5)),
                  10.0, norms)
    assert res.root == S.ROOT_CPU_CONTENTION and res.contributing == S.ROOT_CPU_SLOW
    assert res.share > res.contributing_share >= 0.2
    assert res.attributes()[S.EVIDENCE_CONTRIBUTING] == S.ROOT_CPU_SLOW
    assert res.contributing_confidence >= rootcause.CONTRIBUTING_CONFIDENCE
    assert res.attributes()[S.EVIDENCE_CONTRIBUTING_CONFIDENCE] == pytest.approx(res.contributing_confidence)


def test_contributing_cause_within_the_everyday_range_is_not_named(norms):
    """A second cause with a fifth of the extra time by its share, whose own evidence stays inside what this
    engine's normal steps show, is not reported; the same step on an engine whose normal steps rarely wait
    reports it."""
    y = 50.0  # 25 ms longer on a CPU (the main cause), 10 ms waiting: 9 ms over the median wait of a 10 ms step
    sig = _sig(y, cpu__run_ms=33, cpu__wait_ms=10, host__user_ms=40, process__cpu_ms=33.5)
    quiet = explain(_step(y, **sig), 10.0, norms)
    assert quiet.root == S.ROOT_CPU_SLOW and quiet.contributing == S.ROOT_CPU_CONTENTION
    assert quiet.contributing_confidence >= rootcause.CONTRIBUTING_CONFIDENCE
    # an engine on a shared host: now and then a normal step waits 90% of its length (the reservoir's p99)
    rng = random.Random(3)
    shared = SignalNorms()
    for i in range(64):
        n = rng.uniform(9, 11)
        sg = _normal(n, rng)
        if i % 16 == 0:
            sg["cpu__wait_ms"] = 0.9 * n
        s = _step(n, i, **sg)
        shared.add(n, rootcause._quantities(s, s.signals))
    busy = explain(_step(y, **sig), 10.0, shared)
    assert busy.root == S.ROOT_CPU_SLOW, busy
    assert busy.explained.get(S.ROOT_CPU_CONTENTION, 0) >= rootcause.CONTRIBUTING_SHARE * busy.extra_ms  # by share
    assert busy.contributing is None and S.EVIDENCE_CONTRIBUTING not in busy.attributes()  # but not by evidence

def test_nothing_explains_it_is_unknown_or_workload(norms):
    y = 20.0  # as a normal step, only longer in every part: nothing stands out beyond its share
    sig = _sig(y, cpu__run_ms=0.8 * 10 + 4, cpu__wait_ms=1.5 + 3, process__cpu_ms=12.5, host__user_ms=26,
               host__system_ms=1.0)
    assert explain(_step(y, **sig), 10.0, norms).root == S.ROOT_UNKNOWN
    assert explain(_step(y, **sig), 10.0, norms, novel=True).root == S.ROOT_WORKLOAD


def test_no_evidence_no_confident_resource(norms, stage_norms):
    """Without CPU signals only a stage holding most of the extra time is named; otherwise unknown."""
    res = explain(_step(50, stages={"schedule": 1.0, "forward": 8.0, "update": 41.0}), 10.0, None, stage_norms)
    assert res.root == S.ROOT_STAGE_PREFIX + "update"
    # every stage 5x: the step slowed as a whole, most of it in forward; without CPU evidence, not a stage
    res = explain(_step(50, stages={"schedule": 5.0, "forward": 40.0, "update": 5.0}), 10.0, None, stage_norms)
    assert res.root == S.ROOT_UNKNOWN
    assert explain(_step(50), 10.0, None).root == S.ROOT_UNKNOWN


def test_deepdive_step_is_not_blamed_on_the_profiler(norms, stage_norms):
    y = 25.0  # the profiler's own cost: longer on a CPU, in forward
    st = _step(y, stages={"schedule": 1.0, "forward": 23.0, "update": 1.0},
               **_sig(y, cpu__run_ms=22, cpu__wait_ms=1.5, process__cpu_ms=22.5, host__user_ms=30))
    assert explain(st, 10.0, norms, stage_norms).root == S.ROOT_CPU_SLOW
    dd = dataclasses.replace(st, attributes={S.DEEPDIVE: True})
    assert explain(dd, 10.0, norms, stage_norms).root == S.ROOT_UNKNOWN
    # a real cause on a profiled step is still named
    c = dict(CASES[S.ROOT_CPU_CONTENTION])
    y = c.pop("y")
    dd2 = dataclasses.replace(_step(y, **_sig(y, **c)), attributes={S.DEEPDIVE: True})
    assert explain(dd2, 10.0, norms).root == S.ROOT_CPU_CONTENTION


def test_device_causes(norms):
    def gpu(y, dev, **sig):
        st = _step(y, **_sig(y, cpu__run_ms=0.8 * y, cpu__wait_ms=0.15 * y, process__cpu_ms=0.85 * y,
                             host__user_ms=1.3 * y, **sig))
        return dataclasses.replace(st, device_ns=int(dev * 1e6), attributes={S.DEVICE_TIMING: "event"})

    n = SignalNorms()
    for _ in range(40):
        s = gpu(10.0, 7.0, gpu__pcie_mbps=300, gpu__other_processes=0)
        n.add(10.0, rootcause._quantities(s, s.signals))
    assert explain(gpu(30, 27, gpu__pcie_mbps=300, gpu__other_processes=1), 10.0, n).root == S.ROOT_DEVICE_CONTENTION
    assert explain(gpu(30, 27, gpu__pcie_mbps=20000, gpu__other_processes=1), 10.0, n).root == S.ROOT_INTERCONNECT
    assert explain(gpu(30, 27, gpu__pcie_mbps=300, gpu__other_processes=0), 10.0, n).root == S.ROOT_DEVICE_SLOW


def test_processor_learns_norms_and_puts_evidence_on_the_span(stage_norms):
    """AnomalyProcessor end to end: normal steps teach the norms, a contended one is explained; the
    evidence survives span attributes -> collector assembly -> the same root cause there."""
    from prism_otel.spans import step_attributes

    rng = random.Random(3)
    proc = AnomalyProcessor(dict(QUIET, min_train=100))
    out = []
    for i in range(400):
        bad = 300 <= i < 340
        y = rng.uniform(9.5, 10.5) * (4 if bad else 1)
        sig = _normal(10.0, rng) if not bad else _sig(y, **{k: v for k, v in CASES[S.ROOT_CPU_CONTENTION].items()
                                                            if k != "y"})
        if bad:
            sig["cpu__wait_ms"] = y - 8.0 - 1.0
        out.append(proc.process(_step(y, i, **sig)))
    proc.shutdown()
    flagged = [s for s in out[300:340] if s.verdict and s.verdict.anomaly]
    assert len(flagged) >= 30
    assert all(s.verdict.root_cause == S.ROOT_CPU_CONTENTION for s in flagged)
    assert all(s.attributes[S.EVIDENCE_EXPLAINED] >= 0.6 for s in flagged)
    attrs = step_attributes(flagged[0])
    assert attrs[S.ANOMALY_ROOT_CAUSE] == S.ROOT_CPU_CONTENTION
    assert attrs[S.signal_attribute(S.SIGNAL_CPU_WAIT_MS)] == flagged[0].signals[S.SIGNAL_CPU_WAIT_MS]
    assert not any(k.startswith(S.EVIDENCE_PREFIX) for k in step_attributes(out[100]))


def test_a_resource_within_the_engines_own_normal_range_is_not_named():
    """Honesty: evidence that explains the extra time but stays within what this engine's normal steps
    show (their 99th percentile) names no resource; beyond it, it does, with its confidence."""
    rng = random.Random(5)
    n = SignalNorms()
    for i in range(128):  # normal steps whose run-queue wait varies a lot: 5% to 45% of the step
        y = rng.uniform(9, 11)
        s = _step(y, i, **_normal(y, rng))
        s.signals[S.SIGNAL_CPU_WAIT_MS] = rng.uniform(0.05, 0.45) * y
        n.add(y, rootcause._quantities(s, s.signals))
    assert n.hi["wait"] > 1.5 * n.frac["wait"]
    y = 14.0  # 4 ms extra, all of it waiting: 4.6 ms of wait, within the 4.5 ms that normal steps reach
    mild = explain(_step(y, **_sig(y, cpu__run_ms=8.0, cpu__wait_ms=4.6, host__user_ms=20, process__cpu_ms=8.5)),
                   10.0, n)
    assert mild.explained.get(S.ROOT_CPU_CONTENTION, 0) > 0.4 * 4.0  # the attribution still sees it ...
    assert mild.root == S.ROOT_UNKNOWN and mild.confidence == 0.0  # ... but it is not unusual
    y = 40.0
    res = explain(_step(y, **_sig(y, cpu__run_ms=8.0, cpu__wait_ms=31, host__user_ms=80, process__cpu_ms=8.5)),
                  10.0, n)
    assert res.root == S.ROOT_CPU_CONTENTION and res.confidence >= 0.8
    assert res.attributes()[S.EVIDENCE_CONFIDENCE] == res.confidence


def test_cpu_slow_needs_the_same_work_and_no_fight_for_the_cpu(norms):
    c = dict(CASES[S.ROOT_CPU_SLOW])
    y = c.pop("y")
    # a step beyond the workloads the model was fitted on: more work, not a slower CPU
    assert explain(_step(y, **_sig(y, **c)), 10.0, norms, novel=True).root == S.ROOT_WORKLOAD
    # longer on a CPU while others took the engine's CPUs far beyond their norm and it waited beyond its
    # own: an engine spinning while it waits (vLLM's EngineCore), contention
    y = 40.0
    spin = _sig(y, cpu__run_ms=24, cpu__wait_ms=14.5, process__cpu_ms=24.5, host__user_ms=120)
    res = explain(_step(y, **spin), 10.0, norms)
    assert res.root == S.ROOT_CPU_CONTENTION and S.ROOT_CPU_SLOW not in res.explained
