"""`transformers serve` (continuous batching) under prism-otel, with a few clients.

Builds the tiny random-weight model (no download), starts the OpenAI-compatible server under
``prism-otel run``, sends ``--requests`` completions four at a time, and stops it; the server's
steps and requests are in ./prism-out and its per-stage summary is printed when it exits:

    python examples/transformers_serve.py [--requests 40] [--port 8011]
    prism-otel report prism-out -o report.html

By hand, the same server is:

    HF_HUB_OFFLINE=1 prism-otel run -- transformers serve MODEL_DIR --host 127.0.0.1 --port 8011 \\
        --device cpu --continuous-batching --cb-num-blocks 128 --cb-block-size 32 --cb-max-batch-tokens 512
    curl -s 127.0.0.1:8011/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "MODEL_DIR", "prompt": "Hello", "max_tokens": 16}'

(size the CB cache on CPU: by default it takes 60% of RAM.)
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _client import load, wait_ready  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--port", type=int, default=8011)
    args = ap.parse_args()
    from prism_eval import tiny_models

    model = tiny_models.build(tiny_models.default_dir("tiny"), "tiny")
    exe = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable), "transformers")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=tempfile.mkdtemp(prefix="hf-hub-"))
    cmd = [sys.executable, "-m", "prism_otel.cli", "run", "--", exe, "serve", model, "--host", "127.0.0.1",
           "--port", str(args.port), "--device", "cpu", "--continuous-batching", "--cb-num-blocks", "128",
           "--cb-block-size", "32", "--cb-max-batch-tokens", "512"]
    server = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, server)
        tokens = load(url, model, args.requests)
        print(f"transformers_serve: {args.requests} completions, {tokens} tokens", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
