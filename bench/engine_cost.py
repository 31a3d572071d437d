"""CPU per vLLM step that prism-otel costs, all its processes together, now vs before issue 23.

    .venv/bin/python bench/engine_cost.py [--batches 16] [--steps 2000] [--step-ms 2.7] [--pairs 3]
                                          [--detect 0] [--no-before] [--arm "LABEL:KEY=VALUE[;KEY=VALUE]"]

Each run is a child (bench/_vllm_steps.py, .venv-vllm's python) that serves a paced stream of
vLLM CPU engine steps (one every ``--step-ms``, batch ``--batches``, requests turning over every
64 steps) through prism-otel's real hooks and real vLLM objects, exporting every span over OTLP gRPC
to a counting server in another process. Three arms per pair, order rotating:

* ``off``: the same loop without prism-otel (the reference);
* ``now``: this checkout (hooks into the shared-memory ring; the companion process builds, encodes
  and exports the spans);
* ``before``: the revision before issue 23 (bench/_baseline.py), as vLLM ran it by default: the
  pipeline and the SDK's batch span processor on threads of the engine process;
* ``now, no signals`` (``--signals-arm``): this checkout with ``PRISM_OTEL_SIGNALS=0``: the companion
  reads no root-cause evidence from /proc, cgroup, PSI or NVML (issue 24's readers run in the companion;
  the difference to ``now`` is their cost; the gc.callbacks hook stays in the engine in both);
* ``--arm "LABEL:KEY=VALUE;..."``: this checkout with those environment variables set (repeatable; e.g.
  ``--arm refit4000:PRISM_OTEL_DETECT_CONFIG=refit_every=4000`` with ``--detect 1``). ``--no-before`` leaves
  the ``before`` arm out.

Reported per step: CPU of the engine process above ``off`` (for ``now``, the hooks alone: there is
no thread of ours), CPU of the companion process, and their sum (all of prism-otel's processes),
medians over the pairs with their range; and the sum as a share of the step. Process CPU comes from
/proc (user + system), so it is what the processes used whatever else ran on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VPY = os.path.join(ROOT, ".venv-vllm", "bin", "python")
sys.path.insert(0, HERE)


def child(tree: str, mode: str, batch: int, steps: int, step_ms: float, endpoint: str, detect: str,
          extra_env=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_", "VLLM_"))}
    env.update(PYTHONPATH=tree, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_EXPORTER_OTLP_INSECURE="true",
               PRISM_OTEL_DETECT=detect, PRISM_OTEL_SUMMARY="0", HF_HUB_OFFLINE="1", **(extra_env or {}))
    script = os.path.join(tree, "bench", "_vllm_steps.py")
    if not os.path.exists(script):  # an older revision: run this checkout's driver on its code
        script = os.path.join(HERE, "_vllm_steps.py")
    p = subprocess.run([VPY, script, mode, str(batch), str(steps), str(step_ms)], env=env, capture_output=True,
                       text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode} run failed:\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="16")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--step-ms", type=float, default=2.7)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--detect", default="0", help="1: anomaly detection on in both arms (not part of the target)")
    ap.add_argument("--before", default=None, help="git revision of 'before' (default: bench/_baseline.py)")
    ap.add_argument("--signals-arm", action="store_true",
                    help="a fourth arm: this checkout with PRISM_OTEL_SIGNALS=0 (the evidence readers' cost)")
    ap.add_argument("--arm", action="append", default=[], metavar="LABEL:KEY=VALUE[;KEY=VALUE]",
                    help="another arm: this checkout with these environment variables")
    ap.add_argument("--no-before", action="store_true", help="leave the 'before' arm out")
    a = ap.parse_args()
    import _baseline

    before = _baseline.tree(a.before or _baseline.BEFORE)
    tmp = tempfile.mkdtemp()
    portfile = os.path.join(tmp, "port")
    sink = subprocess.Popen([sys.executable, os.path.join(HERE, "_sink.py"), portfile])
    try:
        while not os.path.exists(portfile) or not open(portfile).read():
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{open(portfile).read()}"
        arms: list[tuple[str, str, str, Optional[dict]]] = [("off", ROOT, "off", None), ("now", ROOT, "on", None)]
        if not a.no_before:
            arms.append(("before", before, "on", None))
        if a.signals_arm:
            arms.append(("nosig", ROOT, "on", {"PRISM_OTEL_SIGNALS": "0"}))
        for spec in a.arm:
            label, _, kv = spec.partition(":")
            # values may hold '=' and ',' of their own (a detector config): KEY=VALUE pairs split at ';'
            extra = dict(item.split("=", 1) for item in kv.split(";") if item)
            arms.append((label, ROOT, "on", extra))
        k = len(arms)
        table = {}
        for b in [int(x) for x in a.batches.split(",")]:
            res = {name: [] for name, _, _, _ in arms}
            for i in range(a.pairs):
                order = arms[i % k:] + arms[:i % k]
                for name, tree, mode, extra in order:
                    r = child(tree, mode, b, a.steps, a.step_ms, endpoint, a.detect, extra)
                    res[name].append(r)
                    print(f"batch {b} pair {i} {name}: engine {r['cpu_s']:.2f} s, companion "
                          f"{r['companion_cpu_s']:.2f} s CPU over {r['steps']} steps", flush=True)
            table[b] = res
    finally:
        sink.terminate()
    print()
    print(f"| CPU per step, vLLM CPU hooks + real objects, {a.step_ms} ms steps, every span exported over OTLP "
          f"gRPC, detection {'on' if a.detect == '1' else 'off'}; median [min..max] of {a.pairs} pairs "
          f"({os.cpu_count()} CPUs, shared machine) | now | before ({a.before or _baseline.BEFORE}) | before / now |")
    print("|---|---|---|---|")
    for b, res in table.items():
        def per_step(name, key):
            return [(r[key] - (off["cpu_s"] if key == "cpu_s" else 0.0)) / r["steps"] * 1e6
                    for r, off in zip(res[name], res["off"])]

        rows = {}
        for name in [n for n in res if n != "off"]:
            eng = per_step(name, "cpu_s")
            comp = per_step(name, "companion_cpu_s")
            rows[name] = (eng, comp, [x + y for x, y in zip(eng, comp)])

        def cell(xs):
            return f"{statistics.median(xs):.0f} [{min(xs):.0f}..{max(xs):.0f}] us"

        def ratio(i):
            r = [x / y for x, y in zip(rows["before"][i], rows["now"][i]) if y > 0]
            return f"{statistics.median(r):.1f}x" if r else "-"

        if "before" in rows:
            print(f"| batch {b}: engine process (above the same loop without prism-otel) | {cell(rows['now'][0])} | "
                  f"{cell(rows['before'][0])} | {ratio(0)} |")
            print(f"| batch {b}: companion process | {cell(rows['now'][1])} | {cell(rows['before'][1])} | |")
            print(f"| batch {b}: all of prism-otel's processes (target <= 60 us) | {cell(rows['now'][2])} | "
                  f"{cell(rows['before'][2])} | {ratio(2)} |")
        else:
            print(f"| batch {b}: engine process (above the same loop without prism-otel) | {cell(rows['now'][0])} | | |")
            print(f"| batch {b}: companion process | {cell(rows['now'][1])} | | |")
            print(f"| batch {b}: all of prism-otel's processes (target <= 60 us) | {cell(rows['now'][2])} | | |")
        for label in [n for n in rows if n not in ("now", "before", "nosig")]:
            print(f"| batch {b}: arm {label}: engine / companion / all | {cell(rows[label][0])} / "
                  f"{cell(rows[label][1])} / {cell(rows[label][2])} | | |")
        if "nosig" in rows:
            sig = [x - y for x, y in zip(rows["now"][1], rows["nosig"][1])]
            print(f"| batch {b}: companion without the evidence readers (PRISM_OTEL_SIGNALS=0) | "
                  f"{cell(rows['nosig'][1])} | | |")
            print(f"| batch {b}: the evidence readers in the companion (now - no signals, same pair) | {cell(sig)} | | |")
            print(f"| batch {b}: engine process with PRISM_OTEL_SIGNALS=0 (above off) | {cell(rows['nosig'][0])} | | |")
        share = [x / 1e3 / a.step_ms * 100 for x in rows["now"][2]]
        eshare = [x / 1e3 / a.step_ms * 100 for x in rows["now"][0]]
        print(f"| batch {b}: the same as a share of a {a.step_ms} ms step: engine process / all | "
              f"{statistics.median(eshare):.2f}% / {statistics.median(share):.2f}% | | |")


if __name__ == "__main__":
    main()
