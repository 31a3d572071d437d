"""Recorded real-fault runs: what ``prism-otel eval`` scores per fault, beside the held-out corpus.

Each run is ``prism-otel simulate --engine E --fault F --duration 90`` (a 30 s fault-free warm-up, then
two episodes of the fault), recorded once on this machine and shipped compressed under
``corpus_data/faults/<engine>-<fault>/``: ``steps.csv.gz``, ``labels.csv.gz`` (with ``scored``: the
engine's recovery after each episode is set aside), ``train.csv.gz`` (the warm-up) and ``meta.json``
(the injectors' reports, effect sizes, recovery). ``prism-otel corpus build faults`` records them.

Scored twice per detector: online from a cold start (the warm-up is judged as part of the stream and
the detector learns as it goes), and with ``--train`` (the warm-up fits a baseline first). For prism,
the root cause too (:mod:`prism_eval.simulate.rcscore`): on the steps flagged inside the fault's windows,
the share whose main root cause is the one the fault stands for, and what the false positives say.
The runs carry the evidence the pipeline joined to each step (``signal_<name>`` columns).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Sequence
from typing import Optional

import numpy as np

from prism_eval.simulate import corpus as cp
from prism_eval.simulate import rcscore
from prism_eval.simulate.baselines import BASELINES
from prism_eval.simulate.stepcsv import parse_row
from prism_eval.simulate.suite import Score, prism_flags
from prism_eval.simulate.synthetic import Stream

FAULTS = ("cpu_contention", "cpu_throttle", "membw_contention", "gc_storm", "stage_stall", "io_stall")
ENGINES = ("transformers", "vllm")
FAULT_DIR = os.path.join(cp.DATA_DIR, "faults")
_FILES = ("steps.csv", "labels.csv", "train.csv")


def record(engine: str, fault: str, out_dir: str, duration_s: float = 90.0, log=print) -> dict:
    """Run the fault on the engine (``prism-otel simulate``'s quick form) and keep the compressed stream."""
    from prism_eval.simulate import scenario

    work = out_dir + ".recording"
    shutil.rmtree(work, ignore_errors=True)
    sc = scenario.quick(engine, "small", fault, duration_s)
    meta = scenario.run(sc, work, log=log)
    os.makedirs(out_dir, exist_ok=True)
    for name in _FILES:
        with open(os.path.join(work, name), "rb") as src, gzip.GzipFile(os.path.join(out_dir, name + ".gz"), "wb",
                                                                         mtime=0) as dst:
            shutil.copyfileobj(src, dst)
    keep = {k: meta[k] for k in ("scenario", "versions", "machine", "windows", "effects", "recovery", "settled",
                                 "steps")}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(keep, f, indent=1, default=str)
    shutil.rmtree(work, ignore_errors=True)
    return keep


def available(directory: Optional[str] = None) -> dict[str, str]:
    d = directory or FAULT_DIR
    if not os.path.isdir(d):
        return {}
    return {n: os.path.join(d, n) for n in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, n, "steps.csv.gz"))}


def _read(path: str) -> list[dict]:
    import csv

    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def stream(name: str, path: str) -> Stream:
    rows = _read(os.path.join(path, "steps.csv.gz"))
    labs = _read(os.path.join(path, "labels.csv.gz"))
    train = [s for s in (parse_row(r, i + 1)[0] for i, r in enumerate(_read(os.path.join(path, "train.csv.gz"))))
             if s is not None]
    steps, labels, lrows = [], [], []
    for i, (r, lb) in enumerate(zip(rows, labs)):
        s, _ = parse_row(r, i + 1)
        if s is None:
            continue
        steps.append(s)
        v = int(lb["anomaly"])
        labels.append(-1 if lb.get("scored", "1") == "0" else v)
        lrows.append({"anomaly": v, "start_ns": s.start_ns, "end_ns": s.end_ns, "fault": lb.get("fault", ""),
                      "scored": lb.get("scored", "1")})
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    fault = meta["scenario"]["faults"][0]["fault"]
    return Stream(name=name, steps=steps, labels=labels, slowdown=[0.0] * len(steps), train=train,
                  meta={"shape": fault, "fault": fault, "engine": meta["scenario"]["engine"]["kind"],
                        "effect": meta["effects"].get(fault, {}).get("ratio"), "windows": meta["windows"],
                        "label_rows": lrows})


def _cold(s: Stream) -> Stream:
    """The same run judged from a cold start: the warm-up is part of the stream (label 0), nothing trained."""
    return Stream(name=s.name, steps=list(s.train) + list(s.steps), labels=[0] * len(s.train) + list(s.labels),
                  slowdown=[0.0] * (len(s.train) + len(s.steps)), train=[], meta=s.meta)


def evaluate(runs: dict[str, str], detectors: Optional[Sequence[str]] = None, prism_config: Optional[dict] = None,
             progress=None) -> dict:
    names = list(detectors or (["prism"] + list(BASELINES)))
    out: dict[str, dict] = {}
    for rname, path in runs.items():
        s = stream(rname, path)
        res = {"fault": s.meta["fault"], "engine": s.meta["engine"], "effect": s.meta["effect"],
               "steps": len(s.steps), "anomalous": int(sum(v == 1 for v in s.labels)),
               "set_aside": int(sum(v == -1 for v in s.labels)), "detectors": {}}
        for n in names:
            row = {}
            for mode, st in (("train", s), ("cold", _cold(s))):
                if n == "prism":
                    flags, roots, _ = prism_flags(st, prism_config)
                    if mode == "train":
                        res["root_cause"] = rcscore.score(flags, roots, s.meta["label_rows"], s.meta["windows"])
                elif not st.train:
                    flags = None  # a baseline needs its warm-up: not scored cold
                else:
                    flags = BASELINES[n](st.train, st.steps)
                if flags is None:
                    continue
                sc = Score()
                sc.add(st, np.asarray(flags, dtype=bool))
                row[mode] = dict(sc.summary(), set_aside_flagged=sc.aside_flagged)
            res["detectors"][n] = row
            if progress:
                progress(f"{rname} {n}: " + ", ".join(f"{m} F1 {v['f1']}" for m, v in row.items()))
        out[rname] = res
    return out


def render(result: dict) -> str:
    lines = ["real CPU faults (prism-otel simulate, recorded on this machine; recovery after each episode set aside)",
             f"{'run':<30} {'effect':>6} {'detector':<18} {'F1 --train':>10} {'F1 cold':>8} {'FPR':>7} "
             f"{'lag':>5} {'flagged in recovery':>19}"]
    for rname, r in result.items():
        for n, row in r["detectors"].items():
            tr, co = row.get("train", {}), row.get("cold")
            eff = "-" if r["effect"] is None else f"{r['effect']:.2f}x"
            lag = "-" if tr.get("lag_batches") is None else f"{tr['lag_batches']:.1f}"
            lines.append(f"{rname:<30} {eff:>6} {n:<18} {tr.get('f1', 0):>10.3f} "
                         f"{'-' if co is None else format(co['f1'], '.3f'):>8} {tr.get('fpr', 0) * 100:>6.2f}% "
                         f"{lag:>5} {tr.get('set_aside_flagged', 0):>8} of {r['set_aside']:<8}")
    rc = [(rname, r["root_cause"]) for rname, r in result.items() if r.get("root_cause")]
    if rc:
        lines += ["", "root cause on the steps prism flagged (--train): top-1 = flagged in-window steps naming the "
                      "fault's cause; hon. = false positives saying unknown or workload", rcscore.HEADER]
        for rname, r in rc:
            lines += rcscore.render(rname, {k: v for k, v in r.items() if k != "all"})
    return "\n".join(lines)
