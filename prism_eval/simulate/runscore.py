"""Scoring a detector on simulation runs: per-fault precision, recall, F1, false-positive rate, lag.

A run directory (what ``prism-otel simulate`` writes) holds ``steps.csv``, ``labels.csv`` and
``train.csv``. The detector is the project's own, run the way a user would run it offline and
online-as-live: ``prism-otel detect --input steps.csv --train train.csv --output verdicts.csv``
(its ``anomaly`` column). When the engine ran with in-process detection, the verdicts it put on
the spans (``online_anomaly`` in ``steps.csv``) are scored too.

Per-fault scores on a run with several faults: each episode owns the steps from halfway through
the fault-free gap before it to halfway through the gap after it (the run's ends for the first and
last), so every fault is judged on its own windows *and* its share of normal steps, as if it had
had a run of its own. ``fpr`` is over normal steps; ``lag_batches`` is the mean, over windows, of
the number of steps from a window's first step to its first flagged step (windows never flagged
count as missed, not in the mean); ``lag_ms`` the same in time.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Optional

from prism_eval.simulate import dataset


def _int_rows(rows: list[dict]) -> list[dict]:
    for r in rows:
        for k in ("start_ns", "end_ns"):
            if k in r and r[k] != "":
                r[k] = int(r[k])
        if "anomaly" in r:
            r["anomaly"] = int(r["anomaly"])
    return rows


def run_detect(run_dir: str, out_name: str = "verdicts.csv", timeout: float = 900) -> list[int]:
    """``prism-otel detect`` over the run (trained on its warm-up): one 0/1 per scored step."""
    out = os.path.join(run_dir, out_name)
    cmd = [sys.executable, "-m", "prism_otel.cli", "detect", "--input", os.path.join(run_dir, "steps.csv"),
           "--output", out]
    train = os.path.join(run_dir, "train.csv")
    if os.path.exists(train) and os.path.getsize(train) > 0:
        cmd += ["--train", train]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"prism-otel detect failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    with open(out, newline="") as f:
        return [int(float(r["anomaly"] or 0)) for r in csv.DictReader(f)]


def episodes(labels: Sequence[dict], windows: Sequence[dict]) -> list[int]:
    """Which episode (index into ``windows`` sorted by start) owns each step (see the module docstring)."""
    if not windows:
        return [-1 for _ in labels]
    wins = sorted(windows, key=lambda w: w["t_start"])
    cuts = [(a["t_end"] + b["t_start"]) / 2 for a, b in zip(wins, wins[1:])]
    return [sum(1 for c in cuts if lb["start_ns"] >= c) for lb in labels]


def segments(labels: Sequence[dict], windows: Sequence[dict]) -> list[str]:
    """Which fault's episode owns each step."""
    wins = sorted(windows, key=lambda w: w["t_start"])
    return [wins[i]["fault"] if i >= 0 else "" for i in episodes(labels, windows)]


def split_episodes(run_dir: str, dest: str) -> list[str]:
    """One run directory per episode, under ``dest/<fault>/<run>-<k>``: the steps it owns (contiguous
    in time), their labels, the run's ``train.csv`` and a ``meta.json`` with that window, so
    ``prism-otel eval --runs dest/<fault>`` scores one fault, each episode as a stream of its own."""
    import shutil

    with open(os.path.join(run_dir, "meta.json")) as f:
        meta = json.load(f)
    wins = sorted(meta["windows"], key=lambda w: w["t_start"])
    with open(os.path.join(run_dir, "steps.csv"), newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        steps = list(reader)
    labels = dataset.read_csv(os.path.join(run_dir, "labels.csv"))
    own = episodes(_int_rows([dict(lb) for lb in labels]), wins)
    name = os.path.basename(os.path.normpath(run_dir))
    out = []
    for k, w in enumerate(wins):
        idx = [i for i, o in enumerate(own) if o == k]
        d = os.path.join(dest, w["fault"], f"{name}-{k}")
        os.makedirs(d, exist_ok=True)
        dataset.write_csv(os.path.join(d, "steps.csv"), [steps[i] for i in idx], header)
        dataset.write_csv(os.path.join(d, "labels.csv"), [labels[i] for i in idx], dataset.LABEL_COLUMNS)
        shutil.copy(os.path.join(run_dir, "train.csv"), d)
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"scenario": meta["scenario"], "windows": [w], "episode": k, "source": run_dir,
                       "effects": {w["fault"]: meta["effects"].get(w["fault"])}}, f, indent=1)
        out.append(d)
    return out


def score(pred: Sequence[int], labels: Sequence[dict], windows: Sequence[dict]) -> dict:
    """precision, recall, f1, fpr, lag over one set of steps (``labels`` in step order)."""
    tp = fp = fn = tn = 0
    for p, lb in zip(pred, labels):
        a = lb["anomaly"]
        tp += p and a
        fp += p and not a
        fn += (not p) and a
        tn += (not p) and (not a)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    lags, lag_ms, missed = [], [], 0
    for w in windows:
        idx = [i for i, lb in enumerate(labels) if lb["anomaly"] and lb["start_ns"] <= w["t_end"]
               and lb["end_ns"] >= w["t_start"]]
        if not idx:
            continue
        hit = next((i for i in idx if pred[i]), None)
        if hit is None:
            missed += 1
            continue
        lags.append(hit - idx[0])
        lag_ms.append((labels[hit]["end_ns"] - labels[idx[0]]["start_ns"]) / 1e6)
    return {"steps": len(labels), "anomalous": tp + fn, "tp": tp, "fp": fp, "fn": fn,
            "precision": round(prec, 4), "recall": round(rec, 4),
            "f1": round(2 * prec * rec / (prec + rec), 4) if prec + rec else 0.0,
            "fpr": round(fp / (fp + tn), 5) if fp + tn else 0.0,
            "lag_batches": round(sum(lags) / len(lags), 2) if lags else None,
            "lag_ms": round(sum(lag_ms) / len(lag_ms), 1) if lag_ms else None, "windows_missed": missed}


def score_run(run_dir: str, pred: Optional[Sequence[int]] = None) -> dict[str, dict]:
    """Per-fault scores of ``pred`` (default: ``prism-otel detect``) on one run; key ``"all"`` too."""
    labels = _int_rows(dataset.read_csv(os.path.join(run_dir, "labels.csv")))
    with open(os.path.join(run_dir, "meta.json")) as f:
        meta = json.load(f)
    if pred is None:
        pred = run_detect(run_dir)
    if len(pred) != len(labels):
        raise ValueError(f"{run_dir}: {len(pred)} verdicts for {len(labels)} labelled steps")
    windows = meta["windows"]
    owner = segments(labels, windows)
    out = {"all": score(pred, labels, windows)}
    for fault in dict.fromkeys(w["fault"] for w in windows):
        idx = [i for i, o in enumerate(owner) if o == fault]
        out[fault] = score([pred[i] for i in idx], [labels[i] for i in idx],
                           [w for w in windows if w["fault"] == fault])
    return out


def online_verdicts(run_dir: str) -> Optional[list[int]]:
    """The in-process detector's verdicts recorded on the spans, if it ran (steps it gave no verdict,
    before it had learned enough, count as not flagged: what an operator watching it would see)."""
    rows = dataset.read_csv(os.path.join(run_dir, "steps.csv"))
    if not rows or all(r.get("online_anomaly", "") == "" for r in rows):
        return None
    return [int(r.get("online_anomaly") or 0) for r in rows]  # no verdict yet (still learning): not flagged


def find_runs(root: str) -> list[str]:
    """Run directories under ``root`` (itself, or any folder below with steps.csv + labels.csv + meta.json)."""
    out = []
    for d, _, files in os.walk(root, followlinks=True):
        if {"steps.csv", "labels.csv", "meta.json"} <= set(files):
            out.append(d)
    return sorted(out)
