"""What reading the evidence costs, and whom: the reader's CPU per step, and the engine's throughput.

    python bench/signals_cost.py [--seconds 8] [--step-ms 2.7] [--rounds 3]

A stand-in engine (a child process: one thread busy in a loop counting iterations, two parked
threads, like an engine loop with helpers) runs while a reader (this process) does what the
pipeline does per step at ``--step-ms`` steps (vLLM's ~2.7 ms on a GPU): ``poll`` every source, then
``overlap`` for the step. Rounds alternate with and without the reader (paired). Printed:

* the reader's CPU per step (thread CPU clock) per source and in all: the figure to hold against the
  companion's budget (~60 us per step for everything);
* the engine's loop iterations per second with the reader over without it (median of the paired
  ratios, and their spread): the reads are the reader's system calls, charged to the reader; the
  engine runs none of our code for them. On a shared machine this ratio carries the machine's noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prism_otel.signals import default_sources  # noqa: E402
from prism_otel.signals.intervals import now_epoch_ns  # noqa: E402

CHILD = r"""
import os, sys, threading, time
ev = threading.Event()
for _ in range(2):
    threading.Thread(target=ev.wait, daemon=True).start()
n = 0
out = sys.stdout
out.write("R\n"); out.flush()
t_end = None
for line in sys.stdin:
    secs = float(line)
    n = 0
    t0 = time.perf_counter(); end = t0 + secs
    while True:
        for _ in range(10000):
            n += 1
        if time.perf_counter() >= end:
            break
    out.write(f"{n / (time.perf_counter() - t0)}\n"); out.flush()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--step-ms", type=float, default=2.7)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "R"
    srcs = default_sources(p.pid)
    names = [type(s).__name__ for s in srcs]
    cpu = {True: 0, False: 0}
    nsteps = {True: 0, False: 0}
    ratios = []
    try:
        for r in range(a.rounds):
            res = {}
            for on in ((True, False) if r % 2 else (False, True)):
                p.stdin.write(f"{a.seconds}\n")
                p.stdin.flush()
                # the same reader loop either way (sleep to the next step end, read the clock); with
                # ``on`` it polls every source and asks each about the step. The reader's CPU: one
                # thread-clock reading per round (under load a thread-clock reading can be slow here)
                end = time.monotonic() + a.seconds
                t_prev = now_epoch_ns()
                c0 = time.thread_time_ns()
                n = 0
                while time.monotonic() < end:
                    time.sleep(a.step_ms / 1e3)
                    now = now_epoch_ns()
                    if on:
                        for s in srcs:
                            s.poll(now)
                            s.overlap(t_prev, now)
                    t_prev = now
                    n += 1
                cpu[on] += time.thread_time_ns() - c0
                nsteps[on] += n
                res[on] = float(p.stdout.readline())
            ratios.append(res[True] / res[False])
    finally:
        p.kill()
    per_on, per_off = cpu[True] / nsteps[True] / 1e3, cpu[False] / nsteps[False] / 1e3
    print(f"sources: {', '.join(names)}; readings at most every {srcs[0].min_interval_ns / 1e6:g} ms")
    print(f"reader CPU per step of {a.step_ms} ms: {per_on:.1f} us with the sources, {per_off:.1f} us for the loop "
          f"alone: the sources cost {per_on - per_off:.1f} us per step "
          f"({(per_on - per_off) / (a.step_ms * 1e3) * 100:.2f}% of a core; {nsteps[True]} steps)")
    print(f"engine loop throughput, observed / not: {statistics.median(ratios):.4f} "
          f"(spread {min(ratios):.4f}-{max(ratios):.4f}, {len(ratios)} paired rounds of {a.seconds:g} s)")
    print(f"readings: {', '.join(f'{n} {s.stats()}' for n, s in zip(names, srcs))}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)")


if __name__ == "__main__":
    main()
