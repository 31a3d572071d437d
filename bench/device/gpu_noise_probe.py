"""Where the GPU corpus's step noise comes from (issue 22): the device machine's host, or our engine.

    python3 bench/device/gpu_noise_probe.py [--seconds 20]

No prism-otel is loaded. Three timed loops, each for ``--seconds``:
- ``python``: a fixed pure-Python loop (about 1 ms), timed repeatedly: the host CPU's own speed;
- ``generate-b1`` / ``generate-b16``: transformers ``generate()`` on the same random-weight 1B Llama in
  bf16 as the GPU corpus, one step timed by a logits processor (the time between consecutive calls).
For each, the quantiles and the noise measure of bench/corpus_noise.py: the share of steps over 1.3x
the median of their 20 neighbours, and the share inside a run of 3 or more such steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def noise(xs, half=10):
    over = []
    for i, x in enumerate(xs):
        nb = xs[max(0, i - half):i] + xs[i + 1:i + 1 + half]
        over.append(bool(nb) and x > 1.3 * statistics.median(nb))
    inrun = [False] * len(xs)
    i = 0
    while i < len(xs):
        j = i
        while j < len(xs) and over[j]:
            j += 1
        if j - i >= 3:
            for k in range(i, j):
                inrun[k] = True
        i = max(j, i + 1)
    n = max(1, len(xs))
    return sum(over) / n, sum(inrun) / n


def report(name, xs):
    xs = [x * 1e3 for x in xs]
    q = statistics.quantiles(xs, n=100) if len(xs) > 2 else [float("nan")] * 99
    o, r = noise(xs)
    print(f"{name:14s} n={len(xs):6d}  p5 {q[4]:8.3f}  p50 {q[49]:8.3f}  p95 {q[94]:8.3f}  p99 {q[98]:8.3f} ms"
          f"   >1.3x like {o:6.2%}   in runs>=3 {r:6.2%}", flush=True)


def python_probe(seconds):
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        s = 0
        for i in range(20000):
            s += i * i
        out.append(time.perf_counter() - t)
    return out


def generate_probe(model, batch, seconds):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.randint(5, model.config.vocab_size - 1, (batch, 32), device=model.device)
    end = time.perf_counter() + seconds
    durs = []
    while time.perf_counter() < end:
        stamps.clear()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                           do_sample=False, logits_processor=LogitsProcessorList([Clock()]), pad_token_id=2)
        durs += [b - a for a, b in zip(stamps[1:], stamps[2:])]  # decode steps only
    return durs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--cpu", action="store_true", help="the tiny model on the CPU (a plumbing check)")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from prism_eval import tiny_models

    report("python", python_probe(a.seconds))
    size, dev, dtype = ("tiny", "cpu", "float32") if a.cpu else ("1b", "cuda", "bfloat16")
    if a.cpu:
        torch.set_num_threads(1)
    path = tiny_models.build(os.path.join("/tmp", f"probe-{size}"), size, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(dev).eval()
    generate_probe(model, 1, 2.0)  # warm-up
    for b in (1, 16):
        report(f"generate-b{b}", generate_probe(model, b, a.seconds))
    report("python-again", python_probe(a.seconds / 2))


if __name__ == "__main__":
    main()
