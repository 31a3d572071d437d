"""The collector's per-step work in one process: assembly, detection and tagging of the fleet bench's stream.

    .venv/bin/python bench/collector_inprocess.py [--baseline <checkout>] [--pairs 3] [--instances 64]

The requests of bench/collector_fleet.py (``--instances`` vLLM replicas, 300 steps to learn from and 1,000
more each, 6 spans a step, the instances interleaved) go through a ``StepAssembler`` with the default
``AnomalyProcessor``, in this process: no gRPC, no queues, no export. Fits run inline (``background:
False``) and a shared model's refits are spaced by step time only (``FLEET_FIT_SHARE`` off), so that a run is
reproducible: each arm prints a hash of every request it forwards, and two checkouts that judge alike print
the same hash. Reported per arm: the thread's CPU per step with the fits taken out (the fits' own CPU,
``fit_seconds``, is their figure), the fits, and the hash. ``--one-by-one``: the detector alone on the same
steps (rebuilt beforehand, untimed), ``AnomalyProcessor.process`` a step at a time, as the companion's
pipeline calls it; the hash is then over the verdicts. With ``--baseline`` the two checkouts run in
turns (order rotating), each in a fresh child process, and the paired ratio baseline/this is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(payload: str, one_by_one: bool = False) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    import processors.anomaly as anomaly_mod
    from processors import assembly
    from processors.anomaly import AnomalyProcessor
    from processors.assembler import StepAssembler

    anomaly_mod.FLEET_FIT_SHARE = float("inf")  # refits spaced by step time only: reproducible
    learn, judged = pickle.load(open(payload, "rb"))
    reqs = [ExportTraceServiceRequest.FromString(r) for r in learn + judged]
    det = AnomalyProcessor({"background": False, "alert_log": False, "alert_file": "none"})
    asm = StepAssembler([det])
    h = hashlib.sha256()
    cpu = 0.0
    if one_by_one:  # the detector alone, a step at a time (AnomalyProcessor.process: what a companion runs)
        steps = []
        for req in reqs:
            for rs in req.resource_spans:
                res = assembly.attrs_of(rs.resource.attributes)
                for ss in rs.scope_spans:
                    kids = assembly.children_by_step(ss.spans)
                    steps += [assembly.step_from_span(s, res, kids.get(s.trace_id + s.span_id, ()))
                              for s in ss.spans if s.name == "prism.step"]
        for s in steps:
            det.observe_resource(s.instance, {"service.name": "vllm"})
        for s in steps:
            t0 = time.thread_time()
            v = det.process(s).verdict
            cpu += time.thread_time() - t0
            h.update(repr(v).encode())
        fits = sum(det.fit_seconds)
        print("RESULT " + json.dumps({"cpu": cpu, "fits": fits, "steps": len(steps), "hash": h.hexdigest()[:16],
                                      "n_fits": det.stats()["fits"]}))
        return
    for i, req in enumerate(reqs):
        t0 = time.thread_time()
        out = asm.process(req, i)
        cpu += time.thread_time() - t0
        for r, _ in out:
            h.update(r.SerializeToString(deterministic=True))
    fits = sum(det.fit_seconds)
    print("RESULT " + json.dumps({"cpu": cpu, "fits": fits, "steps": asm.steps, "hash": h.hexdigest()[:16],
                                  "n_fits": det.stats()["fits"]}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="another checkout (git worktree add /tmp/base <rev>): the same run on its code")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--one-by-one", action="store_true", help="the detector alone, AnomalyProcessor.process a step "
                                                                  "at a time (the companion's path), on the same steps")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.one_by_one)
        return 0
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import collector_fleet as cf

    payload = os.path.join(tempfile.mkdtemp(prefix="prism-inproc-"), "payload.pkl")
    with open(payload, "wb") as fh:
        pickle.dump(cf.fleet_requests(a.instances, 300, 1000), fh)
    arms = {"this checkout": ROOT}
    if a.baseline:
        rev = subprocess.run(["git", "-C", a.baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        arms[f"baseline {rev}"] = os.path.abspath(a.baseline)
    res = {k: [] for k in arms}
    for p in range(a.pairs):
        names = list(arms)[::(-1 if p % 2 else 1)]
        for name in names:
            env = dict(os.environ, PYTHONPATH=arms[name])
            cmd = [sys.executable, os.path.abspath(__file__), "--child", payload] + (["--one-by-one"] if a.one_by_one else [])
            out = subprocess.run(cmd, env=env,
                                 cwd=arms[name], capture_output=True, text=True, timeout=1800)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name}: {out.stderr[-2000:]}")
            r = json.loads(line[7:])
            res[name].append(r)
            print(f"pair {p}: {name}: {r}", file=sys.stderr)
    what = "the detector alone, one step at a time" if a.one_by_one else "assembly + detection"
    print(f"\n{a.instances} instances x (300 + 1000) steps, in-process, {what}; thread CPU, {a.pairs} runs per arm, "
          "median [min-max]\n")
    print("| arm | CPU µs per step, fits excluded | fits (s, count) | output hash |")
    print("|---|---|---|---|")
    per = {}
    for name, rs in res.items():
        us = [1e6 * (r["cpu"] - r["fits"]) / r["steps"] for r in rs]
        per[name] = us
        print(f"| {name} | {statistics.median(us):.1f} [{min(us):.1f}-{max(us):.1f}] "
              f"| {statistics.median(r['fits'] for r in rs):.2f}, {rs[0]['n_fits']} | "
              f"{', '.join(sorted({r['hash'] for r in rs}))} |")
    if a.baseline:
        base = per[list(arms)[1]]
        ratios = [b / t for b, t in zip(base, per["this checkout"])]
        print(f"\npaired ratio baseline / this checkout: {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")
        same = {r["hash"] for rs in res.values() for r in rs}
        print("outputs identical in every run" if len(same) == 1 else f"OUTPUTS DIFFER: {sorted(same)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
