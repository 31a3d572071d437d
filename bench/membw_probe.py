"""Does memory-bandwidth / last-level-cache contention from *another* core make the engine's own work take
longer on its CPU here? (what `cpu.slow` rests on; issue 24's membw_contention fault)

    python bench/membw_probe.py [--rounds 8] [--mb 512] [--model small]

The small random-weight model's decode forward (batch 8) on CPU 0 only, timed on the thread's CPU clock
(so run-queue wait does not count), in rounds that alternate: no streamer, then a streamer copying
``--mb`` MB arrays on CPU 1 (the membw_contention injector's worker, started idle and released per
round). Prints each round's median on-CPU ms per forward and the paired ratio's median and spread.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--mb", type=float, default=512)
    ap.add_argument("--model", default="small")
    ap.add_argument("--forwards", type=int, default=40)
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from prism_eval import tiny_models
    from prism_eval.simulate.faults import _Worker

    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two CPUs")
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.build(tiny_models.default_dir(a.model), a.model))
    model.eval()
    ids = torch.randint(3, 200, (8, 1))
    past = None
    with torch.no_grad():
        out = model(torch.randint(3, 200, (8, 64)), use_cache=True)
        past = out.past_key_values

    def forwards():
        ts = []
        with torch.no_grad():
            for _ in range(a.forwards):
                t = time.thread_time_ns()
                model(ids, past_key_values=past, use_cache=False)
                ts.append((time.thread_time_ns() - t) / 1e6)
        return statistics.median(ts)

    forwards()  # warm
    ratios = []
    print(f"{'round':>5} {'alone ms':>9} {'streamer ms':>12} {'ratio':>6}")
    for r in range(a.rounds):
        alone = forwards()
        w = _Worker("stream", {"cpu": 1, "mb": a.mb, "policy": "normal"}, 120.0)
        w.wait_ready()
        w.send(b"G")
        time.sleep(0.3)
        with_s = forwards()
        w.send(b"S")
        w.finish()
        ratios.append(with_s / alone)
        print(f"{r:>5} {alone:>9.2f} {with_s:>12.2f} {with_s / alone:>6.2f}")
    q = statistics.quantiles(ratios, n=4)
    print(f"paired ratio (on-CPU ms per forward, streamer on CPU 1 / alone): median {statistics.median(ratios):.3f}, "
          f"IQR {q[0]:.3f}-{q[2]:.3f}, {a.rounds} rounds")


if __name__ == "__main__":
    main()
