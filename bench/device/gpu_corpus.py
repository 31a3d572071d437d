"""Record the GPU corpus (issue 22) on a lent GPU machine: ``transformers-gpu-1b`` of
prism_eval.simulate.corpus (transformers continuous batching, a ~1.2 B random-weight Llama in bf16
built there, the same 32-configuration grid as the CPU corpora), then keep what a later session
needs: steps.csv.gz, segments.jsonl, meta.json and the raw OTLP JSON lines (so the step table can be
derived again when the corpus columns grow).

    python3 bench/device/gpu_corpus.py OUT_DIR [--segment-s 10] [--smoke]

``--smoke`` runs the same path on the CPU with the tiny model and 1 s segments (a check of the
plumbing, no numbers). The one-call command for the device is bench/device/gpu_corpus.sh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--segment-s", type=float, default=10.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--name", default="transformers-gpu-1b", help="the corpus of prism_eval.simulate.corpus.CORPORA")
    a = ap.parse_args()
    from prism_eval.simulate import corpus as cp

    name = a.name
    if a.smoke:
        cb = dict(cp.CORPORA[name][2].get("cb", {}))
        cp.CORPORA["smoke-cpu"] = ("transformers", "tiny", {"threads": 1, "cb": cb})
        name = "smoke-cpu"
        a.segment_s = min(a.segment_s, 1.0)
    work = os.path.abspath(a.out) + ".recording"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    meta = cp.build(name, work, a.segment_s, log=lambda m: print(m, file=sys.stderr, flush=True))
    os.makedirs(a.out, exist_ok=True)
    for f in ("steps.csv.gz", "segments.jsonl", "meta.json"):
        shutil.copy(os.path.join(work, f), os.path.join(a.out, f))
    subprocess.run(["tar", "czf", os.path.join(a.out, "otlp.tgz"), "-C", work, "otlp"], check=True)
    try:
        shutil.copy(os.path.join(work, "engine.log"), os.path.join(a.out, "engine.log"))
    except OSError:
        pass
    print(f"corpus {name}: {meta['steps']} steps in {meta['segments']} configurations, "
          f"{time.time() - t0:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
