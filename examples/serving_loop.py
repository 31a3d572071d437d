"""A long-running serving loop: one continuous-batching engine fed by clients at a steady rate.

A tiny random-weight Llama (built locally, no download) behind transformers' continuous batching,
the way a server keeps one engine running and hands it requests as they come. Clients arrive at
``--rate`` requests a second (Poisson), each with a prompt of 8-120 tokens wanting 8-48 new ones,
for ``--duration`` seconds (0: until Ctrl-C); progress is printed every ``--every`` seconds.

Run it under prism-otel (spans under ./prism-out, incidents printed as they open and close, a
per-stage summary at exit):

    prism-otel run -- python examples/serving_loop.py --duration 60

and look at it afterwards with ``prism-otel report prism-out -o report.html``. With
``OTEL_METRICS_EXPORTER=prometheus`` its metrics are on http://localhost:9464/metrics while it runs
(dashboards/prism-otel.json). ``make demo`` runs it and injects a real fault halfway (examples/demo.py).
"""

import argparse
import json
import os
import random
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson arrivals)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (0: until Ctrl-C)")
    ap.add_argument("--size", default="tiny", help="tiny model size (prism_eval.tiny_models)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--ready", help="write this file (pid, start time) once the engine serves")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from prism_eval import tiny_models

    torch.set_num_threads(args.threads)
    model_dir = tiny_models.build(tiny_models.default_dir(args.size), args.size)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = GenerationConfig(max_new_tokens=48, do_sample=False, eos_token_id=-1, pad_token_id=2)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=tiny_models.cb_config(
        num_blocks=256, page_size=32, max_batch_tokens=256))
    mgr.start()
    rng = random.Random(args.seed)
    stats = {"sent": 0, "done": 0, "tokens": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set() or stats["done"] < stats["sent"]:
            r = mgr.get_result(timeout=0.5)
            if r is not None and r.is_finished():
                with lock:
                    stats["done"] += 1
                    stats["tokens"] += len(r.generated_tokens)

    collector = threading.Thread(target=collect, name="collect", daemon=True)
    collector.start()
    t0 = time.monotonic()
    if args.ready:
        with open(args.ready + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "t0_ns": time.time_ns()}, f)
        os.replace(args.ready + ".tmp", args.ready)
    next_report = t0 + args.every
    try:
        while args.duration <= 0 or time.monotonic() - t0 < args.duration:
            prompt = [1] + [rng.randrange(3, 259) for _ in range(rng.randint(8, 120))]
            mgr.add_request(prompt, max_new_tokens=rng.randint(8, 48))
            with lock:
                stats["sent"] += 1
            time.sleep(rng.expovariate(args.rate))
            if time.monotonic() >= next_report:
                next_report += args.every
                with lock:
                    s = dict(stats)
                print(f"serving_loop: {time.monotonic() - t0:5.1f} s: {s['sent']} requests sent, {s['done']} done, "
                      f"{s['tokens']} tokens", flush=True)
    except KeyboardInterrupt:
        pass
    stop.set()
    collector.join(60)
    mgr.stop(block=True, timeout=30)
    dt = time.monotonic() - t0
    print(f"serving_loop: {stats['done']}/{stats['sent']} requests, {stats['tokens']} tokens in {dt:.1f} s "
          f"({stats['tokens'] / dt:.0f} tok/s)", flush=True)


if __name__ == "__main__":
    main()
