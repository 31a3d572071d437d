"""Test workload: a tiny random Llama served by transformers continuous batching.

``python cb_workload.py OUT.json [--requests N] [--seed S] [--spawn] [--generate]``

Submits N requests of varied prompt and output lengths (greedy), waits for all, writes a JSON
report: per request the prompt length, the generated token ids and the engine's request id.
``--spawn`` runs the engine in a child started with multiprocessing's spawn method; ``--generate``
uses plain ``model.generate`` on padded batches instead of continuous batching.
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import threading
import time


def workload(n: int, seed: int):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(rng.randint(3, 90))] for _ in range(n)]
    max_new = [rng.randint(2, 40) for _ in range(n)]
    return prompts, max_new


def run_cb(out: str, n: int, seed: int, model_dir: str, gap_s: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from prism_eval import tiny_models

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=2)
    cbc = tiny_models.cb_config(num_blocks=128, page_size=32, max_batch_tokens=256)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
    mgr.start()
    prompts, max_new = workload(n, seed)
    rids = []
    t0 = time.perf_counter()
    for p, m in zip(prompts, max_new):
        rids.append(mgr.add_request(p, max_new_tokens=m))
        if gap_s:
            time.sleep(gap_s)
    results = {}
    while len(results) < len(rids):
        r = mgr.get_result(timeout=60)
        if r is None:
            break
        if r.is_finished():
            results[r.request_id] = list(r.generated_tokens)
    elapsed = time.perf_counter() - t0
    threads = len(os.listdir("/proc/self/task"))  # while the engine still runs: ours would be among them
    thread_names = sorted(t.name for t in threading.enumerate())
    mgr.stop(block=True, timeout=60)
    report = {"pid": os.getpid(), "elapsed_s": elapsed, "threads": threads, "thread_names": thread_names,
              # what of the detector this (the engine's) process imported: a fit needs these
              "detector_modules": sorted(m for m in sys.modules if m in ("processors.model", "processors.gbm",
                                                                           "processors.anomaly")),
              "requests": [
        {"id": rid, "prompt_tokens": len(p), "max_new": m, "generated": results.get(rid)}
        for rid, p, m in zip(rids, prompts, max_new)]}
    if "prism_otel" in sys.modules:  # loaded by `prism-otel run`: what it says of itself
        report["prism_status"] = sys.modules["prism_otel"].status()
    with open(out, "w") as f:
        json.dump(report, f)


def run_generate(out: str, n: int, seed: int, model_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts, _ = workload(n, seed)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = (ids != 2).long()
    g = GenerationConfig(max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
    with torch.no_grad():
        o = model.generate(input_ids=ids, attention_mask=mask, generation_config=g)
    report = {"pid": os.getpid(), "batch": n, "prompt_width": width, "new_tokens": 12,
              "generated": o[:, width:].tolist()}
    with open(out, "w") as f:
        json.dump(report, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spawn", action="store_true")
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--gap", type=float, default=0.003)
    ap.add_argument("--model-dir", default=None)
    a = ap.parse_args()
    from prism_eval import tiny_models

    model_dir = a.model_dir or tiny_models.build(tiny_models.default_dir("tiny"), "tiny")
    if a.generate:
        target, args = run_generate, (a.out, a.requests, a.seed, model_dir)
    else:
        target, args = run_cb, (a.out, a.requests, a.seed, model_dir, a.gap)
    if a.spawn:
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=target, args=args)
        p.start()
        p.join()
        sys.exit(p.exitcode)
    target(*args)


if __name__ == "__main__":
    main()
