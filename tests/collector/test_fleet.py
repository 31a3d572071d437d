"""A fleet in one collector (issue 23): 64 engine instances on the default config, every step judged.

A real ``prism-otel collector`` process with ``prism_anomaly: {}`` receives, over OTLP/gRPC, the steps
of 64 instances of one service (replicas: the same framework and model, each its own
``service.instance.id``), each replaying its own stretch of the shipped vLLM recording: 300 steps to
learn from, then 200 more, interleaved as a fleet's exports arrive. A backend in another process counts
the step spans that come back with the detector's expectation on them. Every step after the fleet's
first model (``min_train`` steps of the shared model) must be judged, and no instance's state evicted:
a turn ago the default memory share held 14 instances and judged a fifth of the steps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import collector_fleet as cf  # noqa: E402

from processors.anomaly_config import AnomalyConfig  # noqa: E402

INSTANCES, LEARN, STEPS = 64, 300, 200


@pytest.mark.slow
def test_64_instances_every_step_after_the_first_model_is_judged():
    learn, judged = cf.fleet_requests(INSTANCES, LEARN, STEPS)
    n_learn, n_judged = cf.spans_in(learn), cf.spans_in(judged)
    ctx = mp.get_context("spawn")
    port_q, counters = ctx.Queue(), ctx.Array("q", 3)
    sink = ctx.Process(target=cf._sink_main, args=(port_q, counters), daemon=True)
    sink.start()
    try:
        port = port_q.get(timeout=60)
        out = cf.run_collector(tempfile.mkdtemp(prefix="prism-fleet-test-"), "fleet", port, counters,
                               {"prism_anomaly": {}}, learn, judged, n_learn, n_judged)
    finally:
        sink.terminate()
    total = INSTANCES * (LEARN + STEPS)
    assert out["steps"] == total, out
    # the first min_train steps of the fleet's shared model wait for it; every later step is judged
    assert out["judged"] >= total - AnomalyConfig().min_train, out
    assert out["judged_in_judged_phase"] == INSTANCES * STEPS, out
    assert not out["evicted"].get("budget"), out
