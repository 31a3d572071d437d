"""`transformers serve --continuous-batching` under `prism-otel run`: request spans carry their token
counts, are linked with the steps that served them, and no HTTP server spans are added by us (no
duplicate FastAPI spans).

Up to transformers 5.24 the server runs the engine in its own process and hands it the HTTP layer's
request id (x-request-id), which the request span then carries. From 5.25 the model runs in a process
the server spawns, under request ids of its own ("0", "1", ...): the spans carry those, and the test
matches them to the HTTP requests by their prompt lengths (all different)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from prism_eval import tiny_models
from prism_otel import semconv as sc
from tests import servers
from tests.otlp_sink import OTLPSink

BIN = os.path.dirname(sys.executable)


def _post(port, model, prompt, max_tokens):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.headers["x-request-id"], json.loads(r.read())


def _serve_runs_engine_in_process() -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("transformers")) < Version("5.25")


def test_serve_request_spans(tmp_path):
    model = tiny_models.build(tiny_models.default_dir("tiny"), "tiny")
    port = servers.free_port()
    (tmp_path / "hub").mkdir()
    with OTLPSink() as sink:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint, OTEL_EXPORTER_OTLP_INSECURE="true",
                   OTEL_BSP_SCHEDULE_DELAY="200", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
        proc = subprocess.Popen([os.path.join(BIN, "prism-otel"), "run", "--", os.path.join(BIN, "transformers"),
                                 "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 "--continuous-batching", "--cb-num-blocks", "128", "--cb-block-size", "32",
                                 "--cb-max-batch-tokens", "512"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    assert proc.poll() is None, proc.stdout.read()[-3000:]
                    time.sleep(0.3)
            prompts = [("Hello world", 8), ("The quick brown fox jumps", 12), ("abc", 5), ("Once upon a time", 16)]
            with ThreadPoolExecutor(4) as ex:
                results = list(ex.map(lambda p: _post(port, model, *p), prompts))
            usage = {rid: body["usage"] for rid, body in results}
            lengths = {u["prompt_tokens"] for u in usage.values()}
            assert len(lengths) == 4, usage

            def served(s):
                return {x.attributes.get(sc.GEN_AI_USAGE_INPUT_TOKENS) for x in s if sc.REQUEST_ID in x.attributes}

            spans = sink.wait_for(lambda s: lengths <= served(s), timeout=30)
        finally:
            proc.terminate()
            proc.wait(30)
    by_len = {}
    for s in spans:
        if sc.REQUEST_ID in s.attributes:
            by_len.setdefault(s.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS], []).append(s)
    steps = {s.span_id: s for s in spans if s.name == sc.STEP_SPAN}
    in_process = _serve_runs_engine_in_process()
    for rid, u in usage.items():
        [s] = by_len[u["prompt_tokens"]]
        if in_process:
            assert s.attributes[sc.REQUEST_ID] == rid
        else:
            assert s.attributes[sc.REQUEST_ID].isdigit()
        assert s.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == u["completion_tokens"]
        assert s.links and all(sid in steps for _, sid in s.links)
        assert s.attributes[sc.REQUEST_TTFT_MS] > 0
    assert not [s for s in spans if any(k.startswith("http.") for k in s.attributes)], "no HTTP server spans from us"
