"""The natural noise of the recorded engines: how often a normal step is much slower than its like.

    .venv/bin/python bench/corpus_noise.py [--corpus DIR] [--show CORPUS:WORKLOAD]

For each shipped corpus (prism_eval/simulate/corpus_data, real steps, no fault), each decode step is
compared with the median of its like: the up to 20 nearest decode steps (10 before, 10 after) of the
same workload configuration and the same batch size. Prints, per corpus, the share of steps over 1.3x
and over 2x that median, and the share of steps inside a run of 3 or more consecutive decode steps over
1.3x (what an injected 3-8-step burst of 1.3x looks like), and the share of decode steps at 2.5x or more
the fast mode (10th percentile) of their workload configuration and batch size over the whole recording:
a host that runs slow for long stretches (a loaded or shared machine) shows there and not in the
neighbour columns, whose median is then itself slow. Same thresholds for every corpus; nothing is
fitted, so no detector's choices enter.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prism_eval.simulate import corpus, holdout  # noqa: E402


def noise(path: str, half: int = 10) -> dict:
    steps, work = holdout.load(path)
    by = defaultdict(list)  # (workload, batch) -> indices of decode steps, in time order
    order = [i for i, s in enumerate(steps) if s.phase == "decode"]
    for i in order:
        by[(work[i], steps[i].batch_size)].append(i)
    ratio = {}
    slow_mode = counted = 0
    for idx in by.values():
        d = np.array([steps[i].duration_ms for i in idx])
        if len(d) >= 10:
            counted += len(d)
            slow_mode += int((d >= 2.5 * np.quantile(d, 0.1)).sum())
        for k, i in enumerate(idx):
            lo, hi = max(0, k - half), min(len(idx), k + half + 1)
            like = np.concatenate([d[lo:k], d[k + 1:hi]])
            if len(like) >= 5:
                ratio[i] = d[k] / float(np.median(like))
    judged = [i for i in order if i in ratio]
    r = np.array([ratio[i] for i in judged])
    slow = r > 1.3
    in_run = np.zeros(len(judged), dtype=bool)
    k = 0
    while k < len(judged):  # runs over consecutive decode steps of one workload
        j = k
        while j < len(judged) and slow[j] and work[judged[j]] == work[judged[k]]:
            j += 1
        if j - k >= 3:
            in_run[k:j] = True
        k = max(j, k + 1)
    return {"steps": len(judged), "over_1.3x": float(slow.mean()), "over_2x": float((r > 2.0).mean()),
            "in_runs_of_3": float(in_run.mean()), "slow_mode": slow_mode / max(1, counted)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="corpus directory (default: the shipped ones)")
    ap.add_argument("--show", default=None, metavar="CORPUS:WORKLOAD",
                    help="print that workload's decode step times (ms, batch size) in time order instead")
    args = ap.parse_args(argv)
    if args.show:
        name, wl = args.show.split(":", 1)
        steps, work = holdout.load(corpus.available(args.corpus)[name])
        row = [f"{s.duration_ms:.0f}/{s.batch_size}" for s, w in zip(steps, work) if w == wl and s.phase == "decode"]
        for k in range(0, len(row), 16):
            print(" ".join(row[k:k + 16]))
        return 0
    print(f"{'corpus':<26} {'decode steps':>12} {'> 1.3x like':>12} {'> 2x like':>10} {'in runs >= 3 over 1.3x':>23} {'>= 2.5x fast mode':>18}")
    for name, path in corpus.available(args.corpus).items():
        n = noise(path)
        print(f"{name:<26} {n['steps']:>12} {n['over_1.3x'] * 100:>11.2f}% {n['over_2x'] * 100:>9.2f}% "
              f"{n['in_runs_of_3'] * 100:>22.2f}% {n['slow_mode'] * 100:>17.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
