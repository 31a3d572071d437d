"""A long-running transformers continuous-batching "server" to attach to (no tracing of its own).

``python cb_server.py OUT_DIR [--concurrency N] [--size tiny]``

Serves a fixed cycle of greedy requests forever, ``--concurrency`` in flight at once, and appends one
JSON line per finished request to ``OUT_DIR/results.jsonl`` (sequence number, prompt index,
generated tokens, finish time). It also keeps its own clock on the engine: the start time of every
``prepare_next_batch`` call (one per engine iteration) goes to ``OUT_DIR/steps.bin`` as int64 ns
(perf_counter), so the gaps show the engine's step period and any stall, with or without
prism-otel. ``OUT_DIR/ready`` appears once the engine serves.
"""

import argparse
import json
import os
import random
import struct
import sys
import threading
import time


def prompts(n: int = 12, seed: int = 1):
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, 259) for _ in range(rng.randint(4, 60))], rng.randint(4, 24)) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.continuous_batching import continuous_api

    from prism_eval import tiny_models

    torch.set_num_threads(a.threads)
    model_dir = tiny_models.build(tiny_models.default_dir(a.size), a.size)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    steps = []
    lock = threading.Lock()
    orig = continuous_api.ContinuousBatchProcessor.prepare_next_batch

    def prepare_next_batch(self, *args, **kwargs):  # the application's own step clock
        t = time.perf_counter_ns()
        with lock:
            steps.append(t)
        return orig(self, *args, **kwargs)

    continuous_api.ContinuousBatchProcessor.prepare_next_batch = prepare_next_batch

    gen = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=2)
    cbc = tiny_models.cb_config(num_blocks=128, page_size=32, max_batch_tokens=256)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
    mgr.start()
    work = prompts()
    results = open(os.path.join(a.out, "results.jsonl"), "a", buffering=1)
    step_log = open(os.path.join(a.out, "steps.bin"), "ab", buffering=0)
    seq = 0
    inflight = {}
    last_flush = time.monotonic()
    with open(os.path.join(a.out, "ready"), "w") as f:
        f.write(str(os.getpid()))
    while True:
        while len(inflight) < a.concurrency:
            idx = seq % len(work)
            p, m = work[idx]
            rid = mgr.add_request(p, max_new_tokens=m, request_id=f"req-{seq}")
            inflight[rid] = (seq, idx)
            seq += 1
        r = mgr.get_result(timeout=5)
        if r is not None and r.is_finished() and r.request_id in inflight:
            s, idx = inflight.pop(r.request_id)
            results.write(json.dumps({"seq": s, "prompt": idx, "tokens": list(r.generated_tokens),
                                      "t": time.time()}) + "\n")
        if time.monotonic() - last_flush > 0.2:
            with lock:
                batch, steps[:] = steps[:], []
            if batch:
                step_log.write(struct.pack(f"<{len(batch)}q", *batch))
            last_flush = time.monotonic()
        if not mgr.is_running():
            print("cb_server: engine stopped", file=sys.stderr)
            sys.exit(3)


if __name__ == "__main__":
    main()
