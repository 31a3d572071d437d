"""What the detector keeps, and how it is asked: training memory bounded per workload cell, one small
verdict state per instance (a model shared by instances of one resource), batch judging, first fits off the
calling thread when ``fit_inline`` is off."""

from __future__ import annotations

import dataclasses
import gc
import threading
import tracemalloc

import numpy as np

from prism_eval.simulate.synthetic import PROFILES, WORKLOADS, Anomaly, simulate
from processors.anomaly import AnomalyProcessor, CellMemory
from processors.features import StepContext
from processors.verdict import cell_of
from tests.processors.streams import QUIET, shapes_stream

RESOURCE = {"prism.engine.framework": "vllm", "prism.engine.version": "0.32", "gen_ai.request.model": "m",
            "prism.device.kind": "gpu", "prism.device.name": "H100", "service.name": "svc"}


def _x(batch, ctx_per_req, new=0):
    return StepContext().features("i", batch, new, batch, batch * ctx_per_req, ctx_per_req, 0, 1_000_000)


def test_memory_keeps_every_workload_it_saw_and_drops_from_the_largest():
    mem = CellMemory(1000)
    a, b, c = _x(4, 100), _x(64, 3000), _x(16, 700)
    assert len({cell_of(a), cell_of(b), cell_of(c)}) == 3
    for _ in range(3000):
        mem.add(a, 10.0, None)
    for _ in range(40):  # a workload that ran once, long ago
        mem.add(b, 30.0, None)
    for _ in range(5000):
        mem.add(c, 20.0, None)
    rows = mem.rows()
    assert len(rows) == 1000
    ys = [r[1] for r in rows]
    assert ys.count(30.0) == 40  # every step of the rare workload stays (the most recent 4000 would have none)
    assert abs(ys.count(10.0) - ys.count(20.0)) <= 2  # the two big ones share what is left
    # rows come back in the order they came, with their stage durations
    mem2 = CellMemory(10)
    for i in range(5):
        mem2.add(a, float(i), {"forward": 1.5 * i, "sample": 0.25})
    assert [r[1] for r in mem2.rows()] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert mem2.rows()[3][2] == {"forward": 4.5, "sample": 0.25}


def test_judging_a_batch_gives_the_verdicts_of_judging_one_by_one():
    s = simulate(PROFILES["gpu8b"], WORKLOADS["bursty"], 1200, seed=31, n_train=0, instance="a",
                 anomalies=[Anomaly("slowdown", 700, 60, 0.6)])
    other = [dataclasses.replace(x, instance="b") for x in s.steps]
    mixed = [x for pair in zip(s.steps, other) for x in pair]  # two instances interleaved
    one = AnomalyProcessor(dict(QUIET))
    many = AnomalyProcessor(dict(QUIET))
    a = [one.process(x).verdict for x in mixed]
    b = []
    for i in range(0, len(mixed), 97):  # batches that straddle the first fits and later refits
        b += [x.verdict for x in many.process_many(mixed[i:i + 97])]
    assert sum(v is not None for v in a) > 1500 and one.stats()["fits"] >= 4
    for va, vb in zip(a, b):
        assert (va is None) == (vb is None)
        if va is not None:
            assert (va.anomaly, va.test, va.alert) == (vb.anomaly, vb.test, vb.alert)
            assert vb.expected_ms == np.float64(va.expected_ms) or abs(vb.expected_ms / va.expected_ms - 1) < 1e-9
    assert any(v is not None and v.anomaly for v in b)


def _bytes_per_instance(scope: str, n: int = 60, steps: int = 300) -> tuple:
    s = shapes_stream()
    p = AnomalyProcessor({**QUIET, "model_scope": scope})
    p.train(s.train)

    def feed(inst):
        p.observe_resource(inst, RESOURCE)
        for x in s.steps[:steps]:
            p.process(dataclasses.replace(x, instance=inst))

    feed("warm")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            feed(f"i{i}")
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / n, p


def test_an_instance_of_a_shared_model_costs_a_few_kilobytes():
    per, p = _bytes_per_instance("resource")
    # the collector's default budget for instance state is 128 MiB: at least 1,000 instances must fit
    assert per < 128 * 2**20 / 1000 / 4, per
    assert p.stats()["groups"] == 1 and p.stats()["keys"] == 61
    for i in range(60):
        p.forget_instance(f"i{i}")
    assert p.stats()["keys"] == 1 and p.stats()["groups"] == 1  # the shared model stays while one uses it
    p.forget_instance("warm")
    assert p.stats()["keys"] == 0 and p.stats()["groups"] == 0  # and goes with the last one
    assert p.process(dataclasses.replace(shapes_stream().steps[0], instance="new")).verdict is not None  # seed


def test_first_fit_goes_off_the_calling_thread_when_fit_inline_is_off():
    seen = []

    class Recording(AnomalyProcessor):
        def _fit_rows(self, rows, *args):
            seen.append(threading.current_thread().name)
            return super()._fit_rows(rows, *args)

    s = simulate(PROFILES["gpu8b"], WORKLOADS["chat"], 900, seed=12, n_train=0)
    proc = Recording({**QUIET, "background": True, "fit_inline": False, "min_train": 200})
    try:
        judged = [proc.process(x).verdict is not None for x in s.steps[:400]]
        assert proc.wait_idle(60)
        later = [proc.process(x).verdict is not None for x in s.steps[400:500]]
    finally:
        proc.shutdown()
    assert not any(judged[:200])  # nothing to judge with before the first model
    assert seen and threading.current_thread().name not in seen  # no fit on the thread that calls process()
    assert all(later)  # judged once the first model came back
