"""The detection evaluation behind ``prism-otel eval``: a labelled suite, the detectors, the scores.

Protocol (LatencyPrism's, extended): every stream has a normal warm-up that each detector may learn
from, then a monitored part judged online, step by step, in order. Scores pool the scored steps of
all streams (label -1, the first few percent of a drift ramp, is not scored):

* precision, recall, F1 and false-positive rate per step (FPR over the normal steps);
* lag per anomaly episode: steps (``lag_batches``) and milliseconds of stream time (``lag_ms``)
  from the first anomalous step's end to the end of the first flagged step of the episode;
  averaged over the episodes that were caught (``missed`` counts the others).

The synthetic suite (:func:`suite`) crosses the four engine profiles of
:mod:`prism_eval.simulate.synthetic` with six shapes: no anomaly (workload shifts only), single
spikes (+30% to +300%), small sustained slowdowns (+10% to +30%), large ones (+50% to +200%),
gradual drift (a ramp to +30% to +100%), and one stage stalling. Real runs join with
:func:`load_runs` (a directory of ``steps.csv`` + ``labels.csv`` [+ ``train.csv``], as
``prism-otel simulate`` writes them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from prism_eval.simulate import stepcsv
from prism_eval.simulate.baselines import BASELINES
from prism_eval.simulate.synthetic import PROFILES, WORKLOADS, Anomaly, Stream, simulate
from prism_otel import semconv as sc

SHAPES = ("none", "spike", "slowdown_small", "slowdown_large", "drift", "stall")
STALL_STAGES = (sc.STAGE_SCHEDULE, sc.STAGE_FORWARD, sc.STAGE_SAMPLE, sc.STAGE_UPDATE)
DEFAULT_SEED = 20260101


def _episodes(shape: str, n: int, rng: np.random.Generator, overlap: bool) -> list[Anomaly]:
    if shape == "none":
        return []
    out: list[Anomaly] = []
    if shape == "spike":
        for pos in np.sort(rng.choice(np.arange(200, n - 50, 97), size=8, replace=False)):
            out.append(Anomaly("spike", int(pos), 1, float(rng.choice([0.3, 0.5, 1.0, 2.0, 3.0]))))
        return out
    count = 2 if shape == "drift" else 3
    seg = (n - 200) // count
    for i in range(count):
        lo = 200 + i * seg
        if shape == "drift":
            ramp, hold = int(rng.integers(300, 600)), int(rng.integers(100, 250))
            length = min(ramp + hold, seg - 150)
            out.append(Anomaly("drift", int(lo + rng.integers(0, 100)), length, float(rng.choice([0.3, 0.5, 1.0])),
                               ramp=min(ramp, length - 50)))
            continue
        length = int(rng.integers(50, 300))
        start = int(lo + rng.integers(0, max(1, seg - length - 150)))
        if shape == "slowdown_small":
            out.append(Anomaly("slowdown", start, length, float(rng.choice([0.10, 0.15, 0.2, 0.3]))))
        elif shape == "slowdown_large":
            out.append(Anomaly("slowdown", start, length, float(rng.choice([0.5, 1.0, 2.0]))))
        else:
            stages = (sc.STAGE_SCHEDULE, sc.STAGE_UPDATE, sc.STAGE_FORWARD) if overlap else STALL_STAGES
            out.append(Anomaly("stall", start, length, float(rng.choice([0.2, 0.5, 1.0])),
                               stage=str(rng.choice(stages))))
    return out


def suite(size: str = "full", seed: int = DEFAULT_SEED) -> list[Stream]:
    """The labelled synthetic suite. ``full``: 4 profiles x 6 shapes (24 streams of 1500 warm-up +
    4000 judged steps); ``small``: 1 profile x 6 shapes, shorter (for tests)."""
    if size not in ("full", "small"):
        raise ValueError(f"suite size must be 'full' or 'small', got {size!r}")
    profiles = list(PROFILES) if size == "full" else ["gpu8b"]
    n_train, n_steps = (1500, 4000) if size == "full" else (800, 1800)
    workloads = list(WORKLOADS)
    out = []
    i = 0
    for pname in profiles:
        for shape in SHAPES:
            rng = np.random.default_rng(seed + i)
            eps = _episodes(shape, n_steps, rng, PROFILES[pname].overlap)
            w = WORKLOADS[workloads[i % len(workloads)]]
            s = simulate(PROFILES[pname], w, n_steps, seed=seed + 1000 + i, anomalies=eps, instance=f"sim-{i}",
                         n_train=n_train, name=f"{pname}/{w.name}/{shape}")
            s.meta["shape"] = shape
            out.append(s)
            i += 1
    return out


def load_runs(directory: str) -> list[Stream]:
    """Real-run streams: every sub-directory (or the directory itself) holding ``steps.csv`` and
    ``labels.csv`` (and optionally ``train.csv``, normal warm-up steps). Without ``train.csv`` the
    first ``min(1000, 20%)`` rows are the warm-up. Episodes are the runs of label 1."""
    if not os.path.isdir(directory):
        raise ValueError(f"--runs: {directory} is not a directory")
    cands = [directory] + [os.path.join(directory, d) for d in sorted(os.listdir(directory))]
    out = []
    for d in cands:
        sp, lp = os.path.join(d, "steps.csv"), os.path.join(d, "labels.csv")
        if not (os.path.isfile(sp) and os.path.isfile(lp)):
            continue
        _, _, steps, _ = stepcsv.read(sp)
        labels = stepcsv.read_labels(lp)
        if len(labels) != len(steps):
            raise ValueError(f"{lp}: {len(labels)} labels for {len(steps)} steps")
        keep = [i for i, s in enumerate(steps) if s is not None]
        labels = [labels[i] for i in keep]
        steps = [s for s in steps if s is not None]
        tp = os.path.join(d, "train.csv")
        if os.path.isfile(tp):
            train = [s for s in stepcsv.read(tp)[2] if s is not None]
        else:
            n = min(1000, len(steps) // 5)
            train, steps, labels = steps[:n], steps[n:], labels[n:]
        out.append(Stream(name=os.path.relpath(d, directory) if d != directory else os.path.basename(d),
                          steps=steps, labels=labels, slowdown=[0.0] * len(steps), train=train,
                          meta={"shape": "run"}))
    return out


def _episode_ranges(stream: Stream) -> list[tuple]:
    lab = np.asarray(stream.labels)
    if stream.episodes:
        out = []
        for a in stream.episodes:
            idx = np.flatnonzero(lab[a.start:a.start + a.length] == 1)
            if len(idx):
                out.append((a.start + int(idx[0]), a.start + a.length, a))
        return out
    out, i, n = [], 0, len(lab)
    while i < n:
        if lab[i] == 1:
            j = i
            while j < n and lab[j] == 1:
                j += 1
            out.append((i, j, None))
            i = j
        else:
            i += 1
    return out


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    lags: list[int] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    missed: int = 0
    by_shape: dict[str, list[int]] = field(default_factory=dict)  # shape -> [tp, fn, fp]
    rc_hits: int = 0
    rc_total: int = 0
    aside: int = 0  # steps not scored (label -1: a real run's recovery after a fault, a ramp's first steps)
    aside_flagged: int = 0

    def add(self, stream: Stream, flags: np.ndarray, root: Optional[list[Optional[str]]] = None) -> None:
        lab = np.asarray(stream.labels)
        f = np.asarray(flags, dtype=bool)
        tp, fp = int(np.sum(f & (lab == 1))), int(np.sum(f & (lab == 0)))
        fn, tn = int(np.sum(~f & (lab == 1))), int(np.sum(~f & (lab == 0)))
        self.tp, self.fp, self.fn, self.tn = self.tp + tp, self.fp + fp, self.fn + fn, self.tn + tn
        self.aside += int(np.sum(lab == -1))
        self.aside_flagged += int(np.sum(f & (lab == -1)))
        b = self.by_shape.setdefault(stream.meta.get("shape", "?"), [0, 0, 0])
        b[0], b[1], b[2] = b[0] + tp, b[1] + fn, b[2] + fp
        for first, end, a in _episode_ranges(stream):
            hit = np.flatnonzero(f[first:end])
            if not len(hit):
                self.missed += 1
                continue
            j = first + int(hit[0])
            self.lags.append(j - first)
            self.lags_ms.append((stream.steps[j].end_ns - stream.steps[first].end_ns) / 1e6)
            if root is not None and a is not None and a.kind == "stall":
                for i in range(first, end):
                    if f[i] and lab[i] == 1:
                        self.rc_total += 1
                        self.rc_hits += root[i] == sc.ROOT_STAGE_PREFIX + a.stage

    def summary(self) -> dict:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4),
                "fpr": round(self.fp / (self.fp + self.tn), 5) if self.fp + self.tn else 0.0,
                "lag_batches": round(float(np.mean(self.lags)), 3) if self.lags else None,
                "lag_ms": round(float(np.mean(self.lags_ms)), 2) if self.lags_ms else None}


def prism_flags(stream: Stream, config: Optional[dict] = None) -> tuple:
    """Run the prism detector over a stream (warm-up via ``train``, then online): (flags, roots, processor)."""
    from processors.anomaly import AnomalyProcessor

    cfg = {"background": False, "alert_file": "none", "alert_log": False}
    cfg.update(config or {})
    proc = AnomalyProcessor(cfg)
    proc.train(stream.train)
    flags = np.zeros(len(stream.steps), dtype=bool)
    roots: list[Optional[str]] = [None] * len(stream.steps)
    for i, s in enumerate(stream.steps):
        v = proc.process(s).verdict
        if v is not None:
            flags[i] = v.anomaly
            roots[i] = v.root_cause
    proc.shutdown()
    return flags, roots, proc


def run(streams: Sequence[Stream], detectors: Optional[Sequence[str]] = None,
        prism_config: Optional[dict] = None, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Score every detector on every stream; returns ``{"detectors": {name: summary}, ...}``."""
    names = list(detectors or (["prism"] + list(BASELINES)))
    unknown = [n for n in names if n != "prism" and n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown detector {unknown[0]!r} (known: prism, {', '.join(BASELINES)})")
    scores = {n: Score() for n in names}
    secs = {n: 0.0 for n in names}
    for s in streams:
        for n in names:
            t0 = time.perf_counter()
            if n == "prism":
                flags, roots, _ = prism_flags(s, prism_config)
                scores[n].add(s, flags, roots)
            else:
                scores[n].add(s, BASELINES[n](s.train, s.steps))
            secs[n] += time.perf_counter() - t0
        if progress:
            progress(s.name)
    out: dict[str, Any] = {"detectors": {n: scores[n].summary() for n in names}}
    out["details"] = {n: {"missed_episodes": scores[n].missed, "episodes": scores[n].missed + len(scores[n].lags),
                          "seconds": round(secs[n], 2),
                          "recall_by_shape": {k: round(v[0] / (v[0] + v[1]), 4) if v[0] + v[1] else None
                                              for k, v in scores[n].by_shape.items()},
                          "false_positives_by_shape": {k: v[2] for k, v in scores[n].by_shape.items()},
                          "not_scored": scores[n].aside, "not_scored_flagged": scores[n].aside_flagged}
                      for n in names}
    if "prism" in scores and scores["prism"].rc_total:
        out["details"]["prism"]["root_cause_accuracy"] = round(scores["prism"].rc_hits / scores["prism"].rc_total, 4)
    out["suite"] = {"streams": len(streams), "steps": int(sum(len(s.steps) for s in streams)),
                    "anomalous_steps": int(sum(int(np.sum(np.asarray(s.labels) == 1)) for s in streams))}
    return out


def render(result: dict) -> str:
    lines = [f"{'detector':<18} {'precision':>9} {'recall':>7} {'f1':>7} {'fpr':>8} {'lag_batches':>11} "
             f"{'lag_ms':>8} {'missed':>7}"]
    for name, m in result["detectors"].items():
        det = result.get("details", {}).get(name, {})
        lag = "-" if m["lag_batches"] is None else f"{m['lag_batches']:.2f}"
        lms = "-" if m["lag_ms"] is None else f"{m['lag_ms']:.1f}"
        lines.append(f"{name:<18} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {m['fpr'] * 100:>7.3f}% "
                     f"{lag:>11} {lms:>8} {det.get('missed_episodes', 0):>3}/{det.get('episodes', 0):<3}")
    su = result.get("suite", {})
    lines.append(f"suite: {su.get('streams')} streams, {su.get('steps')} judged steps, "
                 f"{su.get('anomalous_steps')} anomalous")
    p = result.get("details", {}).get("prism")
    if p:
        lines.append("prism recall by shape: " + ", ".join(f"{k} {v}" for k, v in p["recall_by_shape"].items()))
        if "root_cause_accuracy" in p:
            lines.append(f"prism root-cause hint accuracy on stage stalls: {p['root_cause_accuracy']:.3f}")
    return "\n".join(lines)
