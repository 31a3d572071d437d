"""The vLLM OpenAI-compatible server (vLLM CPU) under prism-otel, with a few clients.

Needs a Python with vLLM (the repository's ``.venv-vllm``: ``make .venv-vllm/.installed``). Builds
the tiny random-weight model, starts ``python -m vllm.entrypoints.openai.api_server`` under
``prism-otel run``, sends ``--requests`` completions four at a time, and stops it. Spans of the API
server (front end) and the engine core are in ./prism-out:

    .venv-vllm/bin/python examples/vllm_server.py [--requests 40] [--port 8012] [--otlp-traces-endpoint URL]
    prism-otel report prism-out -o report.html

By hand:

    VLLM_CPU_KVCACHE_SPACE=1 prism-otel run -- python -m vllm.entrypoints.openai.api_server \\
        --model MODEL_DIR --served-model-name tiny --dtype float32 --max-model-len 2048 --enforce-eager

With ``--otlp-traces-endpoint`` vLLM's own ``llm_request`` spans share prism-otel's tracer provider
(docs/vllm.md). The vLLM server takes 30-60 s to start on a small CPU machine.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _client import load, wait_ready  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--port", type=int, default=8012)
    ap.add_argument("--otlp-traces-endpoint", help="turn vLLM's own tracing on too")
    args = ap.parse_args()
    from prism_eval import tiny_models

    model = tiny_models.build(tiny_models.default_dir("tiny"), "tiny")
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cmd = [sys.executable, "-m", "prism_otel.cli", "run", "--", sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model, "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(args.port),
           "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--disable-log-stats"]
    if args.otlp_traces_endpoint:
        cmd += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    server = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, server, timeout=600)
        tokens = load(url, "tiny", args.requests)
        print(f"vllm_server: {args.requests} completions, {tokens} tokens", flush=True)
    finally:
        server.terminate()
        server.wait(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
