"""Cost of the guard around a callback hook: the ``generate`` forward pre/post hooks as they are now
(:func:`prism_otel.instrumentation.base.guarded_callback` around plain methods) vs a build of the same
module from an earlier commit (the guard written inside each method), in one process, paired.

    .venv/bin/python bench/hook_guard.py [--rev ade8e46] [--rounds 9] [--n 20000]

Each round times ``n`` pre+post pairs of each variant on a stand-in module (no device: the host clock
path) into an anonymous ring, with the thread's CPU clock, alternating which variant goes first.
Reports ns per pre+post pair and the per-round ratio new/old, median [min..max].
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from prism_otel.instrumentation._hooks import HookGuard  # noqa: E402
from prism_otel.instrumentation.transformers import _generate as new_mod  # noqa: E402
from prism_otel.recorder import Recorder  # noqa: E402

MOD = "prism_otel/instrumentation/transformers/_generate.py"


def _old_module(rev: str):
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{MOD}"], check=True, capture_output=True,
                         text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="hook-guard-"), "_generate_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("_generate_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Shape:
    shape = (4, 1)


def _hooks_new(rec):
    g = HookGuard("bench.new")
    call = new_mod._GenerateCall(g, rec, time.perf_counter_ns(), None)
    return new_mod.guarded_callback(g, call.pre), new_mod.guarded_callback(g, call.post), call


def _hooks_old(mod, rec):
    g = HookGuard("bench.old")
    call = mod._GenerateCall(g, rec, time.perf_counter_ns(), None)
    return call.pre, call.post, call


def _time(pre, post, n: int) -> float:
    kw = {"input_ids": _Shape()}
    args = ()
    m = None
    tt = time.thread_time_ns
    t0 = tt()
    for _ in range(n):
        pre(m, args, kw)
        post(m, args, kw, None)
    return (tt() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="ade8e46", help="the commit whose _generate.py is the baseline")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n", type=int, default=20000)
    a = ap.parse_args()
    old_mod = _old_module(a.rev)
    new_ns, old_ns, ratios = [], [], []
    for r in range(a.rounds):
        rec_new, rec_old = Recorder(1 << 16), Recorder(1 << 16)
        pn, qn, cn = _hooks_new(rec_new)
        po, qo, co = _hooks_old(old_mod, rec_old)
        order = [("new", pn, qn), ("old", po, qo)]
        if r % 2:
            order.reverse()
        res = {}
        for name, pre, post in order:
            res[name] = _time(pre, post, a.n)
        cn.finish()
        co.finish()
        new_ns.append(res["new"])
        old_ns.append(res["old"])
        ratios.append(res["new"] / res["old"])
    print(f"generate forward pre+post hooks, {a.rounds} rounds x {a.n} pairs, thread CPU ns per pair")
    print(f"{'variant':<32}{'median ns':>10}{'min':>8}{'max':>8}")
    print(f"{'old (' + a.rev + ', guard inline)':<32}{statistics.median(old_ns):>10.0f}{min(old_ns):>8.0f}"
          f"{max(old_ns):>8.0f}")
    print(f"{'new (guarded_callback)':<32}{statistics.median(new_ns):>10.0f}{min(new_ns):>8.0f}{max(new_ns):>8.0f}")
    print(f"ratio new/old per round: median {statistics.median(ratios):.3f} [{min(ratios):.3f}..{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
