"""Shared by the server examples: wait for an OpenAI-compatible server, then send it completions."""

import json
import random
import threading
import time
import urllib.request


def wait_ready(url: str, proc, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer {url}/health within {timeout:g} s")


def load(url: str, model: str, n: int, concurrency: int = 4, seed: int = 0) -> int:
    """``n`` completions, ``concurrency`` at a time; returns the tokens generated."""
    rng = random.Random(seed)
    jobs = [(" ".join(rng.choice(["the", "engine", "step", "batch", "token", "cache"]) for _ in range(rng.randint(4, 40))),
             rng.randint(8, 32)) for _ in range(n)]
    lock = threading.Lock()
    total = [0]

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                prompt, max_tokens = jobs.pop()
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                usage = json.loads(r.read()).get("usage") or {}
            with lock:
                total[0] += usage.get("completion_tokens", 0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total[0]
