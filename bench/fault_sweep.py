"""The recorded real-fault runs of ``prism-otel eval --only-corpus faults`` (prism only) under other detector
settings: F1 with ``--train`` and cold, and FPR with ``--train``, per run, one line per config, so that a setting
is judged on every fault at once (bench/detect_sweep.py does the same for the held-out corpora).

    .venv/bin/python bench/fault_sweep.py ['{"point_ratio": 0}' ...] [--runs NAME,NAME] [--train-only]

Each JSON argument is a prism config (processors/README.md lists the keys); ``{}`` is the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from prism_eval.simulate import faultruns  # noqa: E402
from prism_eval.simulate.suite import Score, prism_flags  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["{}"])
    ap.add_argument("--runs", default="")
    ap.add_argument("--train-only", action="store_true")
    a = ap.parse_args()
    runs = faultruns.available()
    if a.runs:
        runs = {n: p for n, p in runs.items() if n in a.runs.split(",")}
    streams = {n: faultruns.stream(n, p) for n, p in runs.items()}
    modes = ("train",) if a.train_only else ("train", "cold")
    for cfg_s in a.configs:
        cfg = json.loads(cfg_s)
        cells, f1s = [], {m: [] for m in modes}
        for n, s in streams.items():
            got = {}
            for mode in modes:
                st = s if mode == "train" else faultruns._cold(s)
                flags, _, _ = prism_flags(st, cfg)
                sc = Score()
                sc.add(st, np.asarray(flags, dtype=bool))
                got[mode] = sc.summary()
                f1s[mode].append(got[mode]["f1"])
            cell = f"{n} {got['train']['f1']:.3f}/{got['train']['fpr']:.2%}"
            if "cold" in got:
                cell += f" cold {got['cold']['f1']:.3f}"
            cells.append(cell)
        heads = " ".join(f"median F1 {m} {statistics.median(v):.3f} min {min(v):.3f}" for m, v in f1s.items())
        print(json.dumps(cfg), "|", heads, "|", " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
