"""The quick held-out check: one shipped corpus per engine and machine, flat windows, held to the figures
docs/benchmarks.md records ("Quick held-out check"), so a change that trades one corpus for another shows
at once. It fails when prism's F1 falls more than 0.05 below, or its FPR rises more than half again above,
the recorded figure of any corpus (a corpus with no recorded figure fails too: record it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "<!-- quick-holdout -->"


def recorded() -> dict:
    """(corpus, detector) -> (F1, FPR) from the table under the marker in docs/benchmarks.md."""
    text = open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8").read()
    assert MARK in text, "docs/benchmarks.md has no quick held-out table"
    out = {}
    for line in text.split(MARK, 1)[1].splitlines()[1:]:
        if not line.startswith("|"):
            if out:
                break
            continue
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"([0-9.]+)%", cells[3]) if len(cells) >= 4 else None
        if m and re.fullmatch(r"[0-9.]+", cells[2]):
            out[(cells[0], cells[1])] = (float(cells[2]), float(m.group(1)) / 100)
    return out


def test_quick_held_out_check_holds_the_recorded_figures():
    want = recorded()
    r = subprocess.run([sys.executable, "-m", "prism_otel.cli", "eval", "--quick", "--json"], capture_output=True,
                       text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["corpus"]["engines"]
    assert len(got) >= 3, sorted(got)  # transformers, transformers serve, vLLM (and any corpus added beside)
    problems = []
    for corpus, e in got.items():
        for det in ("prism",):
            m = e["detectors"][det]
            rec = want.get((corpus, det))
            if rec is None:
                problems.append(f"{corpus}: no figure recorded in docs/benchmarks.md ({det} F1 {m['f1']}, "
                                f"FPR {m['fpr'] * 100:.2f}%): add its line to the quick held-out table")
                continue
            f1, fpr = rec
            if m["f1"] < f1 - 0.05:
                problems.append(f"{corpus}: {det} F1 {m['f1']:.3f}, recorded {f1:.3f}")
            if m["fpr"] > 1.5 * fpr + 1e-9:
                problems.append(f"{corpus}: {det} FPR {m['fpr'] * 100:.2f}%, recorded {fpr * 100:.2f}%")
    assert not problems, "\n".join(problems)
