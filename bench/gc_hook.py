"""Cost of the gc.callbacks hook (prism_otel.signals.gc_hook), the only evidence source on the engine's threads.

    python bench/gc_hook.py [--rounds 15]

Two workloads, each timed without the hook and with it, interleaved round by round (paired ratios):

* ``collect``: ``gc.collect(0)`` in a loop on a small heap: the cost per collection is all hook,
  the worst case per collection;
* ``alloc``: building and dropping lists of cyclic container objects, the allocation pattern that
  triggers the interpreter's automatic young collections (one every ~700 net allocations), the case
  an engine step lives in.

The alternative a user would pick is no hook (no GC evidence at all); the table prints the added
time per collection (ns, thread CPU clock) and the paired ratio of the ``alloc`` loop's time, median
and spread over rounds. The ring the hook writes to is drained between rounds, as the pipeline does.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prism_otel.recorder import Recorder  # noqa: E402
from prism_otel.signals import gc_hook  # noqa: E402


def collect_loop(n: int) -> float:
    t = time.thread_time_ns()
    for _ in range(n):
        gc.collect(0)
    return (time.thread_time_ns() - t) / n


def alloc_loop(n: int) -> tuple:
    c0 = gc.get_stats()[0]["collections"]
    t = time.thread_time_ns()
    for _ in range(n):
        junk = []
        for _ in range(200):
            a = [None]
            a[0] = a
            junk.append(a)
        del junk
    dt = time.thread_time_ns() - t
    return dt, gc.get_stats()[0]["collections"] - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    rec = Recorder(1 << 16)
    per_off, per_on, ratios, colls = [], [], [], []
    for r in range(a.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        res = {}
        for on in order:
            if on:
                gc_hook.install(rec)
            else:
                gc_hook.uninstall()
            per = collect_loop(2000)
            dt, nc = alloc_loop(3000)
            res[on] = (per, dt, nc)
            rec.drain(1 << 20)
        gc_hook.uninstall()
        per_off.append(res[False][0])
        per_on.append(res[True][0])
        ratios.append(res[True][1] / res[False][1])
        colls.append(res[True][2])
    added = [b - a for a, b in zip(per_off, per_on)]
    q = statistics.quantiles(ratios, n=4)
    print(f"{'workload':<10} {'without hook':>14} {'with hook':>12} {'added':>10}   paired ratio (median, IQR)")
    print(f"{'collect':<10} {statistics.median(per_off):>11.0f} ns {statistics.median(per_on):>9.0f} ns "
          f"{statistics.median(added):>7.0f} ns   per gc.collect(0)")
    print(f"{'alloc':<10} {'':>14} {'':>12} {'':>10}   {statistics.median(ratios):.4f} ({q[0]:.4f}-{q[2]:.4f}), "
          f"{statistics.median(colls):.0f} young collections per loop of 3000 x 200 cyclic lists")
    print(f"rounds: {a.rounds}; thread CPU clock; python {sys.version.split()[0]}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)")


if __name__ == "__main__":
    main()
