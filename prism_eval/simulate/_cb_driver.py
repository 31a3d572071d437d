"""The in-process transformers engine of a simulation run: continuous batching fed by the workload.

``python -m prism_eval.simulate._cb_driver SPEC.json`` (run under ``prism-otel run``, so the steps come
from prism-otel itself). SPEC holds the model directory, the device and dtype, the CB cache settings,
the torch thread count, the arrivals (``[[t_s, prompt_tokens, output_tokens], ...]``) and the paths below.

It loads the model, starts one continuous-batching manager, serves a short warm-up batch, then
writes ``ready.json`` (``pid``, ``t0_ns``: the wall-clock start of the arrivals, a moment ahead)
and sends each request at ``t0 + t_s`` through ``add_request`` (open loop: a slow engine makes a
queue, not slower clients). A second thread collects results into ``requests.jsonl`` (id, arrival,
finish, tokens). When every request finished (or ``drain_s`` passed) the manager stops and the
process exits; prism-otel's exit hook flushes the spans.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import zlib
from typing import Any


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from prism_eval.simulate.workload import prompt_ids

    torch.set_num_threads(int(spec.get("threads", 2)))
    dtype = getattr(torch, spec.get("dtype") or "float32")
    model: Any = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)  # its stubs mistype .to()
    model = model.to(spec.get("device") or "cpu").eval()
    cb = spec.get("cb", {})
    gen = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=-1, pad_token_id=2)
    from prism_eval.tiny_models import cb_config

    extra = {k: v for k, v in cb.items() if k not in ("num_blocks", "max_batch_tokens", "page_size")}
    cbc = cb_config(num_blocks=int(cb.get("num_blocks", 512)), max_batch_tokens=int(cb.get("max_batch_tokens", 256)),
                    page_size=int(cb.get("page_size", 32)), **extra)  # e.g. use_cuda_graph
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
    mgr.start()
    warm = [mgr.add_request(prompt_ids(24, i), max_new_tokens=8, request_id=f"warmup-{i}") for i in range(4)]
    for _ in warm:
        mgr.get_result(timeout=120)

    if spec.get("segments"):
        return _run_segments(mgr, spec)
    arrivals = spec["arrivals"]
    done = {}
    lock = threading.Lock()
    sent = {}
    t0_ns = time.time_ns() + int(float(spec.get("lead_s", 0.5)) * 1e9)
    tmp = spec["ready"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "t0_ns": t0_ns}, f)
    os.replace(tmp, spec["ready"])
    log = open(spec["requests_log"], "w", buffering=1)  # noqa: SIM115 - closed below

    def collect():
        while True:
            r = mgr.get_result(timeout=0.5)
            if r is None:
                if stop.is_set():
                    return
                continue
            if not r.is_finished():
                continue
            t = time.time_ns()
            with lock:
                a = sent.get(r.request_id)
                done[r.request_id] = t
            if a is not None:
                log.write(json.dumps({"id": r.request_id, "arrival_ns": a[0], "finish_ns": t, "prompt_tokens": a[1],
                                      "output_tokens": len(r.generated_tokens), "error": r.error}) + "\n")

    stop = threading.Event()
    th = threading.Thread(target=collect, name="sim-collect", daemon=True)
    th.start()
    for i, (t_s, p, o) in enumerate(arrivals):
        due = t0_ns + int(t_s * 1e9)
        delay = (due - time.time_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        rid = f"sim-{i}"
        with lock:
            sent[rid] = (time.time_ns(), p)
        mgr.add_request(prompt_ids(p, 1000 + i), max_new_tokens=int(o), request_id=rid)
    deadline = time.monotonic() + float(spec.get("drain_s", 30))
    while time.monotonic() < deadline:
        with lock:
            if len(done) >= len(arrivals):
                break
        time.sleep(0.05)
    stop.set()
    th.join(5)
    mgr.stop(block=True, timeout=30)
    log.close()
    with lock:
        missing = len(arrivals) - len([k for k in done if k.startswith("sim-")])
    if missing:
        print(f"prism-otel simulate: {missing} requests unfinished at exit", file=sys.stderr)
    return 0


def _run_segments(mgr, spec: dict) -> int:
    """The corpus mode: workload segments in a row (:mod:`prism_eval.simulate.segments`), each request
    sent by a client that waits for it (closed loop) or at its arrival time (tidal)."""
    from prism_eval.simulate import segments as sg
    from prism_eval.simulate.workload import prompt_ids

    waiting = {}
    lock = threading.Lock()
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            r = mgr.get_result(timeout=0.5)
            if r is None or not r.is_finished():
                continue
            with lock:
                w = waiting.pop(r.request_id, None)
            if w is not None:
                w[1] = len(r.generated_tokens)
                w[0].set()

    def submit(rid: str, p: int, o: int) -> int:
        w = [threading.Event(), 0]
        with lock:
            waiting[rid] = w
        mgr.add_request(prompt_ids(p, zlib.crc32(rid.encode())), max_new_tokens=int(o), request_id=rid)
        if not w[0].wait(float(spec.get("request_timeout_s", 300))):
            raise TimeoutError(f"{rid} unfinished")
        return w[1]

    th = threading.Thread(target=collect, name="sim-collect", daemon=True)
    th.start()
    segs = [sg.Segment.from_dict(d) for d in spec["segments"]]
    tmp = spec["ready"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "t0_ns": time.time_ns()}, f)
    os.replace(tmp, spec["ready"])
    with open(spec["segments_log"], "w", buffering=1) as log:
        sg.run(segs, submit, on_segment=lambda rec: log.write(json.dumps(rec) + "\n"))
    stop.set()
    th.join(5)
    mgr.stop(block=True, timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
