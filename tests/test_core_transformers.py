"""Core path, end to end: a real transformers continuous-batching engine exporting through the
official OTLP gRPC exporter to a real OTLP server (tests/otlp_sink.py), loaded without code changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from prism_otel import semconv as sc
from tests.otlp_sink import OTLPSink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD = os.path.join(ROOT, "tests", "engines", "cb_workload.py")
BIN = os.path.dirname(sys.executable)


def _env(sink=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    env["PYTHONPATH"] = ROOT  # this checkout, not whatever an editable install points at
    if sink is not None:
        env[sc.OTEL_EXPORTER_OTLP_ENDPOINT] = sink.endpoint
        env["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
        env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    env.update(extra)
    return env


def run_workload(tmp_path, name, prefix=(), sink=None, args=(), **extra):
    out = tmp_path / f"{name}.json"
    cmd = [*prefix, sys.executable, WORKLOAD, str(out), *args]
    p = subprocess.run(cmd, env=_env(sink, **extra), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text()), p


def by_name(spans):
    d = defaultdict(list)
    for s in spans:
        d[s.name].append(s)
    return d


def check_trace_shape(report, spans):
    """Tokens add up, stages nest, requests and steps are linked both ways."""
    reqs = report["requests"]
    assert len(reqs) >= 16 and all(r["generated"] for r in reqs)
    names = by_name(spans)
    steps = names[sc.STEP_SPAN]
    assert steps, "no step spans"
    computed = sum(s.attributes[sc.BATCH_PREFILL_TOKENS] + s.attributes[sc.BATCH_DECODE_TOKENS] for s in steps)
    expected = sum(r["prompt_tokens"] + len(r["generated"]) for r in reqs) - len(reqs)
    assert computed == expected
    # every stage span lies inside its step span
    step_by_id = {s.span_id: s for s in steps}
    stages = [s for s in spans if s.name.startswith(sc.STAGE_SPAN_PREFIX)]
    assert {s.name for s in stages} >= {sc.stage_span_name(x) for x in ("schedule", "forward", "update")}
    for st in stages:
        parent = step_by_id[st.parent_id]
        assert parent.trace_id == st.trace_id
        assert parent.start <= st.start <= st.end <= parent.end
    assert all(s.parent_id == "" for s in steps), "step spans are roots"
    # request spans: one per engine request, linked with every step that served it
    req_spans = {s.attributes[sc.REQUEST_ID]: s for s in spans if sc.REQUEST_ID in s.attributes}
    assert set(req_spans) == {r["id"] for r in reqs}
    req_by_span = {s.span_id: rid for rid, s in req_spans.items()}
    served = defaultdict(set)
    for s in steps:
        linked = {req_by_span[sid] for _, sid in s.links}
        assert linked == set(s.attributes[sc.BATCH_REQUEST_IDS])
        for rid in linked:
            served[rid].add(s.span_id)
    for r in reqs:
        rs = req_spans[r["id"]]
        assert served[r["id"]], f"request {r['id']} served by no step"
        back = {sid for _, sid in rs.links}
        assert back and back <= served[r["id"]]
        assert rs.attributes[sc.REQUEST_STEPS] == len(served[r["id"]])
        assert rs.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == len(r["generated"])
        assert rs.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] == r["prompt_tokens"]
        assert rs.attributes[sc.REQUEST_TTFT_MS] > 0
        assert rs.start <= min(step_by_id[i].start for i in served[r["id"]])
    return steps


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    report, _ = run_workload(tmp_path_factory.mktemp("plain"), "plain")
    return {r["id"]: r["generated"] for r in report["requests"]}


def test_prism_run_exports_steps_over_otlp(tmp_path, baseline):
    with OTLPSink() as sink:
        report, proc = run_workload(tmp_path, "run", prefix=(os.path.join(BIN, "prism-otel"), "run", "--"), sink=sink)
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) > 0, timeout=10)
    steps = check_trace_shape(report, spans)
    assert {s.resource.get("process.pid") for s in steps} == {report["pid"]}
    assert {r["id"]: r["generated"] for r in report["requests"]} == baseline, "outputs changed"
    assert not (tmp_path / "prism-out").exists(), "an OTLP endpoint was set: no embedded default"


def test_opentelemetry_instrument(tmp_path, baseline):
    with OTLPSink() as sink:
        report, _ = run_workload(tmp_path, "oi", prefix=(os.path.join(BIN, "opentelemetry-instrument"),), sink=sink,
                                 OTEL_TRACES_EXPORTER="otlp", OTEL_METRICS_EXPORTER="none",
                                 OTEL_LOGS_EXPORTER="none")
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) > 0, timeout=10)
    check_trace_shape(report, spans)
    assert {r["id"]: r["generated"] for r in report["requests"]} == baseline


def test_spawn_child_is_instrumented(tmp_path, baseline):
    with OTLPSink() as sink:
        report, _ = run_workload(tmp_path, "spawn", prefix=(os.path.join(BIN, "prism-otel"), "run", "--"), sink=sink,
                                 args=("--spawn",))
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) > 0, timeout=10)
    steps = check_trace_shape(report, spans)
    assert {s.resource.get("process.pid") for s in steps} == {report["pid"]}, "steps come from the spawned child"
    assert report["pid"] != os.getpid()
    assert {r["id"]: r["generated"] for r in report["requests"]} == baseline


def test_opentelemetry_instrument_spawn_child(tmp_path):
    with OTLPSink() as sink:
        report, _ = run_workload(tmp_path, "oi-spawn", prefix=(os.path.join(BIN, "opentelemetry-instrument"),),
                                 sink=sink, args=("--spawn",), OTEL_TRACES_EXPORTER="otlp",
                                 OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) > 0, timeout=10)
    check_trace_shape(report, spans)


def test_embedded_default_writes_otlp_json_and_summary(tmp_path):
    report, proc = run_workload(tmp_path, "default", prefix=(os.path.join(BIN, "prism-otel"), "run", "--"))
    files = list((tmp_path / "prism-out").glob("traces-*.jsonl"))
    assert files, proc.stderr[-2000:]
    from prism_otel.otlp_json import request_from_json

    n_steps = 0
    for line in files[0].read_text().splitlines():
        req = request_from_json(line)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    assert len(s.trace_id) == 16 and len(s.span_id) == 8
                    n_steps += s.name == sc.STEP_SPAN
    assert n_steps > 0
    assert "prism-otel:" in proc.stderr and "forward" in proc.stderr and "schedule" in proc.stderr


def test_generate_steps(tmp_path):
    with OTLPSink() as sink:
        report, _ = run_workload(tmp_path, "gen", prefix=(os.path.join(BIN, "prism-otel"), "run", "--"), sink=sink,
                                 args=("--generate", "--requests", "4"))
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) >= 12, timeout=10)
    steps = sorted((s for s in spans if s.name == sc.STEP_SPAN), key=lambda s: s.start)
    assert len(steps) == report["new_tokens"]  # one prefill + one step per further token
    assert steps[0].attributes[sc.STEP_PHASE] == "prefill"
    assert steps[0].attributes[sc.BATCH_PREFILL_TOKENS] == report["batch"] * report["prompt_width"]
    assert all(s.attributes[sc.STEP_PHASE] == "decode" for s in steps[1:])
    assert all(s.attributes[sc.BATCH_SIZE] == report["batch"] for s in steps)
    ctx = [s.attributes[sc.BATCH_MAX_CONTEXT_TOKENS] for s in steps]
    assert ctx == list(range(report["prompt_width"], report["prompt_width"] + len(steps)))
    req_spans = [s for s in spans if sc.REQUEST_ID in s.attributes]
    assert len(req_spans) == report["batch"]
    assert all(s.attributes[sc.REQUEST_STEPS] == len(steps) for s in req_spans)


def test_forked_child_is_traced(tmp_path):
    """A process that forks after prism-otel started: the child restarts the pipeline and exports."""
    script = tmp_path / "fork_app.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'tests', 'engines')!r})\n"
        "import cb_workload\n"
        "from prism_eval import tiny_models\n"
        "d = tiny_models.build(tiny_models.default_dir('tiny'), 'tiny')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    cb_workload.run_cb(sys.argv[1], 16, 3, d, 0.002)\n"
        "    sys.exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n")
    out = tmp_path / "fork.json"
    with OTLPSink() as sink:
        p = subprocess.run([os.path.join(BIN, "prism-otel"), "run", "--", sys.executable, str(script), str(out)],
                           env=_env(sink), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        report = json.loads(out.read_text())
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) > 0, timeout=10)
    check_trace_shape(report, spans)


def test_companion_pipeline_exports_the_same_trace(tmp_path, baseline):
    """PRISM_OTEL_PIPELINE=companion: spans, detection and export run in a child process."""
    with OTLPSink() as sink:
        report, _ = run_workload(tmp_path, "companion", prefix=(os.path.join(BIN, "prism-otel"), "run", "--"),
                                 sink=sink, PRISM_OTEL_PIPELINE="companion")
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) > 0, timeout=10)
    steps = check_trace_shape(report, spans)
    assert {s.resource.get("process.pid") for s in steps} == {report["pid"]}, "resource names the engine"
    assert {r["id"]: r["generated"] for r in report["requests"]} == baseline
