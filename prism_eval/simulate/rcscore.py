"""Root-cause accuracy on labelled fault runs.

Every fault of the toolkit names the cause it stands for (:func:`prism_eval.simulate.catalog.expected_cause`).
On the steps that were flagged inside a fault's windows, top-1 accuracy is the share whose main root
cause is that one (a flagged step with no root cause counts as a miss). Each episode owns its window
and half of the fault-free gaps around it (:func:`prism_eval.simulate.runscore.segments`), so the
false positives near an episode are reported with it: a false positive should say ``unknown`` or
``workload``, never a resource.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Optional

from prism_eval.simulate import runscore
from prism_eval.simulate.catalog import expected_cause
from prism_otel import semconv as sc

HONEST = (sc.ROOT_UNKNOWN, sc.ROOT_WORKLOAD)


def score(flags: Sequence[int], roots: Sequence[Optional[str]], labels: Sequence[dict],
          windows: Sequence[dict]) -> dict[str, dict]:
    """Per fault (and ``all``): flagged in-window steps, causes named, top-1 accuracy, false positives'
    causes and the share of them that are honest (``unknown`` / ``workload``). ``labels``: rows of
    labels.csv with ints (``anomaly``, ``start_ns``; ``scored`` 0 rows are left out)."""
    owner = runscore.segments(labels, windows) if windows else [""] * len(labels)
    want = {w["fault"]: expected_cause(w["fault"], w.get("params")) for w in windows}
    out: dict[str, dict] = {}
    faults: list[str] = list(dict.fromkeys(w["fault"] for w in windows)) + ["all"]
    for fault in faults:
        hit = tot = 0
        causes: collections.Counter = collections.Counter()
        fp: collections.Counter = collections.Counter()
        anomalous = 0
        for i, lb in enumerate(labels):
            if str(lb.get("scored", "1")) in ("0", "0.0") or (fault != "all" and owner[i] != fault):
                continue
            if int(lb["anomaly"]):
                anomalous += 1
                if flags[i]:
                    tot += 1
                    r = roots[i] or "none"
                    causes[r] += 1
                    hit += r == want.get(lb.get("fault") or owner[i])
            elif flags[i]:
                fp[roots[i] or "none"] += 1
        nfp = sum(fp.values())
        out[fault] = {"expected": want.get(fault, "-"), "anomalous": anomalous, "flagged": tot,
                      "top1": round(hit / tot, 4) if tot else None, "causes": dict(causes.most_common()),
                      "false_positives": nfp, "fp_causes": dict(fp.most_common()),
                      "fp_honest": round(sum(fp[c] for c in HONEST) / nfp, 4) if nfp else None}
    return out


def render(name: str, res: dict[str, dict]) -> list[str]:
    lines = []
    for fault, r in res.items():
        top1 = "-" if r["top1"] is None else f"{r['top1']:.3f}"
        honest = "-" if r["fp_honest"] is None else f"{r['fp_honest']:.2f}"
        causes = ", ".join(f"{k} {v}" for k, v in list(r["causes"].items())[:4])
        lines.append(f"{name:<28} {fault:<17} {r['expected']:<15} {r['flagged']:>4}/{r['anomalous']:<4} {top1:>6} "
                     f"{r['false_positives']:>4} {honest:>5}  {causes}")
    return lines


HEADER = (f"{'run':<28} {'fault':<17} {'expected':<15} {'flagged':>9} {'top1':>6} {'FPs':>4} {'hon.':>5}  "
          "causes named on flagged in-window steps")
