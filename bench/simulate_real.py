"""Real CPU faults against real engines: each injector's effect, and per-fault detection scores.

    .venv/bin/python bench/simulate_real.py [--engines transformers,vllm] [--rounds 2] [--episode 10]
        [--gap 10] [--warmup 60] [--keep DIR] [--runs DIR]

For each engine (transformers continuous batching in-process; the vLLM CPU server over HTTP from
.venv-vllm), one `prism-otel simulate` run with the six CPU faults, each ``--rounds`` times (order
interleaved), ``--episode`` seconds each, with ``--gap`` seconds of normal load between episodes
and ``--warmup`` fault-free seconds first (the detector's training steps, train.csv). Then, per fault:

* effect: median step latency in the fault's windows over steps of the same shape outside them
  (phase, batch-size and prefill-token buckets), from meta.json;
* prism: ``prism-otel detect --input steps.csv --train train.csv`` (the project's online detector,
  run offline in stream order as it runs live): precision, recall, F1, false-positive rate, lag;
* the detectors a user would otherwise reach for, on the same steps
  (:mod:`prism_eval.simulate.baselines`: static p99 threshold, rolling z-score, LatencyPrism's rule);
* online: the verdicts the in-process pipeline put on the spans during the run, when it ran one.

Per-fault scores use the steps each episode owns (its window plus half of the gaps around it), as if
each fault had had a run of its own (prism_eval/simulate/runscore.py); the same episodes are also
written one directory each under ``<keep>/by_fault/<fault>/`` for ``prism-otel eval --runs``.
``--runs DIR`` re-scores runs kept earlier (``--keep``) without running engines again.

Shares the machine's 2 cores with whatever else runs: the load average at the start and end of each
run is printed; effects and false positives both depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prism_eval.simulate import runscore, scenario  # noqa: E402

CPU_FAULTS = ["cpu_contention", "cpu_throttle", "membw_contention", "gc_storm", "stage_stall", "io_stall"]


RATES = {"transformers": 2.5, "vllm": 4.0}  # requests/s: well under capacity (at ~60% load, other jobs
# on the 2 cores pushed transformers into an open-loop backlog it never left)


def make_scenario(engine: str, rounds: int, episode: float, gap: float, warmup: float) -> scenario.Scenario:
    faults, t = [], gap
    for _ in range(rounds):
        for f in CPU_FAULTS:
            params = {"stage": "schedule" if engine == "vllm" else "update"} if f == "stage_stall" else {}
            faults.append({"fault": f, "at_s": t, "for_s": episode, "params": params})
            t += episode + gap
    eng = {"kind": engine, "model": "small", "threads": 1}
    return scenario.Scenario.from_dict({
        "name": f"bench-cpu-{engine}", "engine": eng,
        "workload": {"arrival": "tidal", "rate": RATES.get(engine, 4.0), "tide": 0.6, "period_s": 20},
        "warmup_s": warmup, "duration_s": t, "faults": faults})


def baseline_verdicts(run_dir: str) -> dict:
    try:
        from prism_eval.simulate import baselines, stepcsv
    except ImportError:
        return {}
    _, _, steps, _ = stepcsv.read(os.path.join(run_dir, "steps.csv"))
    _, _, train, _ = stepcsv.read(os.path.join(run_dir, "train.csv"))
    steps_ok = [s for s in steps if s is not None]
    if len(steps_ok) != len(steps):
        return {}
    train = [s for s in train if s is not None]
    return {name: [int(x) for x in fn(train, steps_ok)] for name, fn in baselines.BASELINES.items()}


def score(run_dir: str) -> dict:
    out = {}
    try:
        out["prism"] = runscore.score_run(run_dir)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"prism-otel detect unavailable or failed: {exc}", file=sys.stderr)
    online = runscore.online_verdicts(run_dir)
    if online is not None:
        out["online"] = runscore.score_run(run_dir, online)
    for name, pred in baseline_verdicts(run_dir).items():
        out[name] = runscore.score_run(run_dir, pred)
    return out


def table(results: dict) -> str:
    dets = ["prism", "online", "static_threshold", "zscore", "latencyprism_rule"]
    head = f"{'engine':13s} {'fault':17s} {'steps':>6s} {'effect':>7s} {'prism P/R':>11s} {'F1':>6s} {'FPR':>7s} " \
           f"{'lag':>5s} | {'online':>6s} {'static':>6s} {'zscore':>6s} {'LP rule':>7s}"
    lines = [head, "-" * len(head)]
    for engine, r in results.items():
        for fault in CPU_FAULTS + ["all"]:
            e = r["meta"]["effects"].get(fault, {})
            s = {d: r["scores"].get(d, {}).get(fault) for d in dets}
            p = s["prism"]
            pr = f"{p['precision']:.3f}/{p['recall']:.3f}" if p else "n/a"
            f1 = f"{p['f1']:.3f}" if p else "n/a"
            fpr = f"{p['fpr']:.4f}" if p else "n/a"
            lag = f"{p['lag_batches']}" if p and p["lag_batches"] is not None else "-"
            others = " ".join(f"{s[d]['f1']:6.3f}" if s[d] else f"{'n/a':>6s}" for d in dets[1:])
            steps = next((x["anomalous"] for x in s.values() if x), e.get("steps_in", 0))
            eff = f"{e['ratio']:.2f}x" if "ratio" in e else "-"
            lines.append(f"{engine:13s} {fault:17s} {steps:6d} {eff:>7s} {pr:>11s} {f1:>6s} {fpr:>7s} {lag:>5s} | "
                         f"{others}")
    lines.append("steps: steps in the fault's windows; effect: latency over same-shape steps outside faults; "
                 "F1 columns right of | are on the same steps")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--episode", type=float, default=10.0)
    ap.add_argument("--gap", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--keep", default=None, help="directory to keep the runs in")
    ap.add_argument("--runs", default=None, help="score runs kept earlier instead of running engines")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    results = {}
    if a.runs:
        for d in runscore.find_runs(a.runs):
            if "by_fault" in os.path.relpath(d, a.runs).split(os.sep):
                continue
            with open(os.path.join(d, "meta.json")) as f:
                meta = json.load(f)
            results[meta["scenario"]["engine"]["kind"]] = {"meta": meta, "scores": score(d)}
    else:
        root = a.keep or tempfile.mkdtemp(prefix="prism-sim-bench-")
        for engine in a.engines.split(","):
            sc = make_scenario(engine, a.rounds, a.episode, a.gap, a.warmup)
            out = os.path.join(root, engine)
            t = time.time()
            print(f"# {engine}: {len(sc.faults)} episodes, {sc.warmup_s:g}+{sc.duration_s:g} s, "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            meta = scenario.run(sc, out, log=lambda m: print(m, file=sys.stderr, flush=True))
            print(f"# {engine}: done in {time.time() - t:.0f} s, load {os.getloadavg()[0]:.1f} -> {out}",
                  file=sys.stderr, flush=True)
            results[engine] = {"meta": meta, "scores": score(out)}
            runscore.split_episodes(out, os.path.join(root, "by_fault"))
        print(f"# per-fault episodes for `prism-otel eval --runs {root}/by_fault/<fault> --no-synthetic` "
              f"under {root}/by_fault", file=sys.stderr)
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({e: {"effects": r["meta"]["effects"], "scores": r["scores"],
                           "loadavg": [r["meta"]["machine"]["loadavg"], r["meta"]["machine"].get("loadavg_end")]}
                       for e, r in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
