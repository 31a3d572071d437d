"""Live attach to a transformers continuous-batching engine that was started with no tracing.

Real parts only: the engine is its own process serving greedy requests; ``prism-otel attach`` is run
as a command; spans travel over OTLP gRPC (the official exporter, in the target) to a real server.
"""

from __future__ import annotations

import json
import os
import time

from prism_otel import attach as at
from prism_otel import semconv as sc
from tests.attach.conftest import outputs_by_prompt, prism, sink_env


def _steps(spans):
    return [s for s in spans if s.name == sc.STEP_SPAN]


def test_attach_exports_steps_then_detach_stops_them(server_factory, sink):
    # The target's own environment says "export nothing, call yourself target-own": the attach
    # configuration must win while starting, and the target's variables must be left as they were.
    env = sink_env(sink)
    server_env = {k: v for k, v in env.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    server_env.update({sc.OTEL_TRACES_EXPORTER: "none", sc.OTEL_SERVICE_NAME: "target-own"})
    srv = server_factory(env=server_env)
    before = srv.wait_results(30)  # mid-workload: it has been serving for a while
    assert not sink.spans(), "nothing is traced before attach"

    t0 = time.time_ns()
    p = prism("attach", srv.pid, "--service-name", "attached-engine", "--json", env=env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)[0]
    assert doc["ok"] and doc["running"] and doc["pid"] == srv.pid and not doc["already"]
    assert doc["instrumentations"]["transformers"][0] == "instrumented"
    assert ["transformers.generation.continuous_batching.continuous_api",
            "ContinuousBatchProcessor._generation_step"] in doc["patched"]
    assert doc["target_env"] == [sc.OTEL_SERVICE_NAME, sc.OTEL_TRACES_EXPORTER]  # restored after start
    # the default pipeline: the hooks here and no thread of ours (the attach agent's aside), the spans
    # built in a companion process
    assert [t for t in doc["threads"] if t.startswith("prism-otel") and t != "prism-otel-attach"] == []

    spans = sink.wait_for(lambda s: len(_steps(s)) >= 30, timeout=30)
    steps = _steps(spans)
    assert len(steps) >= 30, f"{len(steps)} step spans after attach"
    assert all(s.start >= t0 - 10**9 for s in steps), "steps are from after the attach"
    assert {s.resource.get("service.name") for s in steps} == {"attached-engine"}
    assert {s.resource.get("process.pid") for s in steps} == {srv.pid}
    assert all(s.attributes[sc.BATCH_SIZE] >= 1 for s in steps)
    assert {s.attributes[sc.STEP_PHASE] for s in steps} & {"decode", "mixed"}
    stage_names = {s.name for s in spans if s.name.startswith(sc.STAGE_SPAN_PREFIX)}
    assert sc.stage_span_name("forward") in stage_names

    deadline = time.monotonic() + 10
    while True:  # the companion sends its counters to the engine every 0.5 s
        p = prism("status", srv.pid, "--json")
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        if st["steps"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert st["running"] and st["steps"] > 0
    p = prism("status", "--json")  # no PID: this process, and the processes we attached to
    listed = json.loads(p.stdout)
    assert p.returncode == 0 and [e["pid"] for e in listed["attached"]] == [srv.pid]
    assert listed["self"]["running"] is False

    during = srv.wait_results(len(srv.results()) + 20)
    p = prism("detach", srv.pid, "--json", env=env)
    assert p.returncode == 0, p.stderr
    ddoc = json.loads(p.stdout)[0]
    assert ddoc["ok"] and not ddoc["running"] and ddoc["was_running"]
    assert not {"prism-otel-pipeline", "prism-otel-forwarder", "prism-otel-control"} & set(ddoc["threads"])
    assert ddoc["instrumentations"]["transformers"][0] == "uninstrumented"

    # The exporter flushed at detach; from now on nothing arrives while the engine keeps serving.
    n_after_detach = len(sink.spans())
    served = len(srv.results())
    after = srv.wait_results(served + 40)
    time.sleep(1.0)  # longer than the batch span processor's schedule delay
    assert len(sink.spans()) == n_after_detach, "spans arrived after detach"
    assert srv.alive()

    # Outputs are unchanged by attaching and detaching (greedy, same prompt -> same tokens).
    base = outputs_by_prompt(before)
    for phase, res in (("attached", during[len(before):]), ("detached", after[len(during):])):
        got = outputs_by_prompt(res)
        assert got, phase
        for prompt, outs in got.items():
            assert len(outs) == 1, (phase, prompt, outs)
            if prompt in base:
                assert outs == base[prompt], (phase, prompt)

    p = prism("status", srv.pid, "--json")
    st = json.loads(p.stdout)
    assert p.returncode == 0 and st["loaded"] and not st["running"]
    assert json.loads(prism("status", "--json").stdout)["attached"] == []


def test_twenty_cycles_leave_no_threads_or_memory(server_factory, sink, monkeypatch):
    # glibc gives new threads their own malloc arenas (up to 8 per core) and keeps them: every
    # attach/detach starts threads, so with the default allocator RSS climbs while arenas are made
    # (measured: +5.6 MB over the first 20 cycles, flattening out) although nothing is leaked.
    # One arena takes that allocator caching out of the measurement.
    server_env = {k: v for k, v in sink_env(sink).items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    server_env["MALLOC_ARENA_MAX"] = "1"
    srv = server_factory(env=server_env)
    srv.wait_results(10)
    threads0 = srv.threads()
    for k, v in sink_env(sink).items():
        if k.startswith(("OTEL_", "PRISM_OTEL_")):
            monkeypatch.setenv(k, v)
    env = at.config_env()

    def settle(expected: int) -> int:
        deadline = time.monotonic() + 10
        while srv.threads() != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return srv.threads()

    # The first attach imports the OTel SDK, grpc and prism-otel: those modules stay loaded.
    first = at.attach(srv.pid, env=env)
    assert first["running"]
    again = at.attach(srv.pid, env=env)  # attaching twice is harmless
    assert again["already"] and again["patched"] == first["patched"]
    sink.wait_for(lambda s: len(_steps(s)) >= 5, timeout=30)
    # attached and exporting: the engine has exactly the threads it had before (the agent's is gone)
    assert settle(threads0) == threads0, f"{srv.threads()} threads while attached, {threads0} before"
    at.detach(srv.pid)
    assert settle(threads0) == threads0
    rss0 = srv.rss_kb()
    n_steps = []
    for i in range(20):
        a = at.attach(srv.pid, env=env, probe=False)
        assert a["running"] and not a["already"], a
        time.sleep(0.15)
        d = at.detach(srv.pid)
        assert not d["running"]
        assert [t for t in d["threads"] if t.startswith("prism-otel") and t != "prism-otel-attach"] == []
        n_steps.append(d.get("steps", 0))
        assert settle(threads0) == threads0, f"cycle {i}: {srv.threads()} threads, {threads0} before"
    growth_kb = srv.rss_kb() - rss0
    assert growth_kb < 3 * 1024, f"RSS grew {growth_kb} kB over 20 attach/detach cycles"
    assert srv.alive()
    maps = open(f"/proc/{srv.pid}/maps").read()
    assert len({line.split()[-1] for line in maps.splitlines() if "/shim-" in line}) == 1, "one shim mapping"
    # still serving, still untraced after the last detach
    n = len(sink.spans())
    srv.wait_results(len(srv.results()) + 20)
    time.sleep(0.5)
    assert len(sink.spans()) == n
    assert at.attached() == []
    assert os.listdir(os.environ[sc.ENV_ATTACH_DIR])  # shim + locks only: no request left behind
    assert not [f for f in os.listdir(os.environ[sc.ENV_ATTACH_DIR]) if f.startswith(("op-", "req-"))]
