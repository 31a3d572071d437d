"""The held-out protocol of ``prism-otel eval`` (flat windows, prism only) under other detector settings:
what a change of one key does on every corpus at once, so that no setting is tuned on one of them.

    .venv/bin/python bench/detect_sweep.py CORPUS[,CORPUS...] ['{"max_bias": 0.35}' ...]

Each JSON argument is a prism config (processors/README.md lists the keys); ``{}`` is the default. Prints,
per config, each corpus's F1, FPR and worst held-out workload FPR.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prism_eval.simulate import corpus as cp  # noqa: E402
from prism_eval.simulate import holdout  # noqa: E402


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    names = sys.argv[1].split(",")
    cfgs = [json.loads(a) for a in sys.argv[2:]] or [{}]
    found = cp.available()
    missing = [n for n in names if n not in found]
    if missing:
        print(f"unknown corpus {missing[0]!r} (shipped: {', '.join(sorted(found))})")
        return 2
    for cfg in cfgs:
        r = holdout.evaluate({n: found[n] for n in names}, detectors=["prism"], prism_config=cfg, shapes=("flat",))
        cells = []
        for n, e in r["engines"].items():
            d = e["detectors"]["prism"]
            cells.append(f"{n}: F1 {d['f1']:.3f} FPR {d['fpr']:.2%} worst {d['worst_workload_fpr']:.1%}")
        print(json.dumps(cfg), " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
