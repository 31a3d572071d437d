"""A run's labelled step stream: OTLP/JSON spans -> ``steps.csv`` + ``labels.csv``, and effect sizes.

The steps come from prism-otel itself: the engine ran under it with the embedded default exporter,
which writes OTLP/JSON lines (``traces-<pid>.jsonl``) under the run's ``otlp/`` directory. Every
``prism.step`` span becomes one row, in start order, with the columns ``prism-otel detect`` reads
(:data:`STEP_COLUMNS`) followed by extras: the step index, the host-stage durations of its child
``prism.stage.*`` spans (``stage_<name>_us``) and the in-process detector's verdict when it ran
(``online_anomaly``, ``online_score``, ``online_expected_us``, ``online_root_cause``; empty otherwise) and the
evidence the pipeline joined to the step (``signal_<name>``: ``prism.signal.<name>``, see prism_otel.signals).

Labels: a step is anomalous (``anomaly=1``, ``fault=<name>``; ``label`` repeats ``anomaly`` for readers
of the ``label`` column, :mod:`prism_eval.simulate.stepcsv`) when its ``[start, end]`` overlaps an
injection window ``[t_start, t_end]`` (wall-clock ns, as recorded by the injector: from the moment
the fault acted to the moment it was fully undone). Windows are closed intervals, so a step that
ends exactly when a fault starts counts as overlapping.

After a fault the engine is not always itself at once (a queue to drain, caches to refill). The steps
from a window's end until the engine is back within 5% of its baseline (:func:`recovery_periods`) are
neither anomalous nor normal: ``scored=0`` in labels.csv, left out of scoring and reported apart.
At most 20% of a run's steps are set aside this way.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable, Sequence
from typing import Optional

from prism_eval.simulate.stepcsv import CHANGE_COLUMNS
from prism_otel import otlp_json
from prism_otel import semconv as sc
from prism_otel.otlp_json import request_from_json, request_to_dict

STEP_COLUMNS = ("instance", "start_ns", "duration_us", "phase", "batch_size", "prefill_tokens", "decode_tokens",
                "context_tokens", "max_context_tokens")
SIGNAL_COLUMN_PREFIX = "signal_"  # signal_<name>: StepRecord.signals (prism.signal.<name>), read back by stepcsv
LABEL_COLUMNS = ("index", "start_ns", "end_ns", "anomaly", "fault", "label", "scored")
_CHANGE = (sc.BATCH_REQUESTS_JOINED, sc.BATCH_REQUESTS_LEFT, sc.BATCH_TOKENS_JOINED, sc.BATCH_SIZE_BEFORE,
           sc.BATCH_STEPS_SINCE_CHANGE)
_FEATURES = {sc.BATCH_SIZE: "batch_size", sc.BATCH_PREFILL_TOKENS: "prefill_tokens",
             sc.BATCH_DECODE_TOKENS: "decode_tokens", sc.BATCH_CONTEXT_TOKENS: "context_tokens",
             sc.BATCH_MAX_CONTEXT_TOKENS: "max_context_tokens"}


def read_spans(paths: Iterable[str]) -> list[dict]:
    """Every span in the OTLP/JSON line files, flattened: name, ids, times (ns), attributes, resource."""
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    doc = request_to_dict(request_from_json(line))  # validates, normalises ids
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not an OTLP/JSON export request: {exc}") from exc
                for rs in doc.get("resourceSpans", []):
                    res = otlp_json.attributes(rs.get("resource", {}).get("attributes"))
                    for ss in rs.get("scopeSpans", []):
                        for s in ss.get("spans", []):
                            out.append({"name": s.get("name", ""), "span_id": s.get("spanId", ""),
                                        "parent_id": s.get("parentSpanId", ""),
                                        "start_ns": int(s.get("startTimeUnixNano", 0)),
                                        "end_ns": int(s.get("endTimeUnixNano", 0)),
                                        "attrs": otlp_json.attributes(s.get("attributes")), "resource": res})
    return out


def otlp_files(otlp_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(otlp_dir, "*.jsonl")))


def steps_from_spans(spans: Sequence[dict]) -> list[dict]:
    """One row per ``prism.step`` span, in start order (see the module docstring for the columns)."""
    children: dict[str, dict[str, int]] = {}
    for s in spans:
        if s["name"].startswith(sc.STAGE_SPAN_PREFIX) and s["parent_id"]:
            stage = s["name"][len(sc.STAGE_SPAN_PREFIX):]
            d = children.setdefault(s["parent_id"], {})
            d[stage] = d.get(stage, 0) + (s["end_ns"] - s["start_ns"])
    rows = []
    for s in spans:
        if s["name"] != sc.STEP_SPAN:
            continue
        a = s["attrs"]
        row = {"instance": a.get(sc.STEP_INSTANCE) or s["resource"].get(sc.RES_SERVICE_INSTANCE_ID, ""),
               "start_ns": s["start_ns"], "end_ns": s["end_ns"],
               "duration_us": round((s["end_ns"] - s["start_ns"]) / 1e3, 3),
               "phase": a.get(sc.STEP_PHASE, ""), "index": a.get(sc.STEP_INDEX, "")}
        for attr, col in _FEATURES.items():
            row[col] = int(a.get(attr, 0) or 0)
        if all(attr in a for attr in _CHANGE):  # what changed since the previous step, as the hooks knew it
            for attr, col in zip(_CHANGE, CHANGE_COLUMNS):
                row[col] = int(a[attr] or 0)
        for stage, ns in children.get(s["span_id"], {}).items():
            row[f"stage_{stage}_us"] = round(ns / 1e3, 3)
        for k, v in a.items():  # evidence over the step (prism.signal.*): signal_<name> columns
            if k.startswith(sc.SIGNAL_PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[SIGNAL_COLUMN_PREFIX + k[len(sc.SIGNAL_PREFIX):]] = v
        row["online_anomaly"] = "" if sc.ANOMALY not in a else int(bool(a[sc.ANOMALY]))
        row["online_root_cause"] = a.get(sc.ANOMALY_ROOT_CAUSE, "")
        row["online_score"] = a.get(sc.ANOMALY_SCORE, "")
        exp = a.get(sc.LATENCY_EXPECTED_MS)
        row["online_expected_us"] = "" if exp is None else round(float(exp) * 1e3, 3)
        rows.append(row)
    rows.sort(key=lambda r: (r["start_ns"], r["instance"]))
    return rows


def label(rows: Sequence[dict], windows: Sequence[dict]) -> list[dict]:
    """One label per row: the first window (``fault``, ``t_start``, ``t_end``) the step overlaps."""
    out = []
    for i, r in enumerate(rows):
        fault = ""
        for w in windows:
            if r["start_ns"] <= w["t_end"] and r["end_ns"] >= w["t_start"]:
                fault = w["fault"]
                break
        out.append({"index": i, "start_ns": r["start_ns"], "end_ns": r["end_ns"], "anomaly": int(bool(fault)),
                    "fault": fault, "label": int(bool(fault)), "scored": 1})
    return out


def write_csv(path: str, rows: Sequence[dict], first: Sequence[str]) -> None:
    extra: list[str] = []
    for r in rows:
        for k in r:
            if k not in first and k not in extra:
                extra.append(k)
    stage_cols = sorted(k for k in extra if k.startswith("stage_"))
    signal_cols = sorted(k for k in extra if k.startswith(SIGNAL_COLUMN_PREFIX))
    extra = [k for k in extra if not k.startswith(("stage_", SIGNAL_COLUMN_PREFIX))] + stage_cols + signal_cols
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(first) + extra, restval="", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- effect size -----------------------------------------------------------------------------------

def _median(xs: list[float]) -> Optional[float]:
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def _median_of(xs: list[float]) -> float:
    """The median of values the caller knows there are."""
    m = _median(xs)
    if m is None:
        raise ValueError("the median of no values")
    return m


def _bucket(n: int) -> int:
    return 0 if n <= 0 else int(n).bit_length()  # 0, 1, 2-3, 4-7, 8-15, ...


def _keys(r: dict):
    ph = r["phase"]
    b, p = _bucket(int(r["batch_size"])), _bucket(int(r["prefill_tokens"]))
    return ((ph, b, p), (ph, b), (ph,))


class Yardstick:
    """What a step of this shape costs when nothing is wrong: the median latency of baseline steps
    of the same phase, batch-size bucket and prefill-token bucket (powers of two), falling back to
    coarser groups with fewer than ``min_n`` steps. Used so that "slower during the fault" is not
    just "bigger batches during the fault" (an open-loop queue grows while the engine is slow)."""

    def __init__(self, baseline: Sequence[dict], min_n: int = 5) -> None:
        groups: dict[tuple, list[float]] = {}
        for r in baseline:
            for k in _keys(r):
                groups.setdefault(k, []).append(float(r["duration_us"]))
        self.med = {k: _median(v) for k, v in groups.items() if len(v) >= min_n}

    def relative(self, group: Sequence[dict]) -> list[float]:
        out = []
        for r in group:
            m = next((self.med[k] for k in _keys(r) if k in self.med), None)
            if m:
                out.append(float(r["duration_us"]) / m)
        return out


def _baseline(rows: Sequence[dict], labels: Sequence[dict], exclude_s: float) -> list[dict]:
    """Steps outside every window and not within ``exclude_s`` after one (recovery is not baseline)."""
    out = []
    last_end = None
    for r, lb in zip(rows, labels):
        if lb["anomaly"]:
            last_end = r["end_ns"]
            continue
        if last_end is not None and r["start_ns"] - last_end < exclude_s * 1e9:
            continue
        out.append(r)
    return out


def effect(rows: Sequence[dict], labels: Sequence[dict], fault: str, exclude_s: float = 1.0) -> dict:
    """Step latency during ``fault`` vs outside every fault: the raw median ratio, and ``ratio``, the
    median of latency / yardstick (:class:`Yardstick`) during vs outside (the number to read: it does not
    count a queue built up by the fault, i.e. bigger batches, as the fault's effect)."""
    inside = [r for r, lb in zip(rows, labels) if lb["fault"] == fault]
    outside = _baseline(rows, labels, exclude_s)
    res = {"fault": fault, "steps_in": len(inside), "steps_out": len(outside)}
    if not inside or not outside:
        return res
    mi = _median_of([float(r["duration_us"]) for r in inside])
    mo = _median_of([float(r["duration_us"]) for r in outside])
    res.update(median_us_in=round(mi, 1), median_us_out=round(mo, 1), raw_ratio=round(mi / mo, 3))
    ys = Yardstick(outside)
    rel_in, rel_out = ys.relative(inside), ys.relative(outside)
    res["ratio"] = round(_median_of(rel_in) / _median_of(rel_out), 3) if rel_in and rel_out else res["raw_ratio"]
    return res


def recovery(rows: Sequence[dict], labels: Sequence[dict], window: dict, after_s: float = 0.5,
             span_s: float = 3.0) -> dict:
    """Did the engine recover after ``window``? Steps starting in ``[t_end + after_s, + span_s]`` vs
    the baseline, relative to the yardstick (``ratio`` near 1: recovered)."""
    lo = window["t_end"] + after_s * 1e9
    hi = lo + span_s * 1e9
    after = [r for r in rows if lo <= r["start_ns"] < hi]
    res = {"fault": window["fault"], "t_end": window["t_end"], "steps_after": len(after)}
    outside = _baseline(rows, labels, 1.0)
    if not after or not outside:
        return res
    ys = Yardstick(outside)
    rel_a, rel_o = ys.relative(after), ys.relative(outside)
    if rel_a and rel_o:
        res["ratio"] = round(_median_of(rel_a) / _median_of(rel_o), 3)
    return res


def recovery_periods(rows: Sequence[dict], labels: list[dict], windows: Sequence[dict], baseline: Sequence[dict],
                     within: float = 0.05, span: int = 20, max_frac: float = 0.2) -> list[dict]:
    """When the engine is back after each window: the first step from which the median latency of the
    next ``span`` steps, relative to what steps of their shape cost in ``baseline`` (:class:`Yardstick`),
    is within ``within`` of the baseline's own. The steps between the window's end and that one get
    ``scored = 0`` in ``labels`` (in place); every other label gets ``scored = 1``. Returns per window:
    seconds to recover, whether it did before the next window, steps set aside. If more than
    ``max_frac`` of the steps would be set aside, each period is cut back in proportion (``capped``)."""
    for lb in labels:
        lb["scored"] = 1
    ys = Yardstick(baseline)
    ref = _median(ys.relative(baseline))
    out: list[dict] = []
    spans: list[tuple] = []
    ws = sorted(windows, key=lambda w: w["t_start"])
    for k, w in enumerate(ws):
        nxt = ws[k + 1]["t_start"] if k + 1 < len(ws) else None
        idx = [i for i, r in enumerate(rows) if r["start_ns"] > w["t_end"] and (nxt is None or r["start_ns"] < nxt)
               and not labels[i]["anomaly"]]
        rec = {"fault": w["fault"], "t_end": w["t_end"], "recovered": False, "recovery_s": None, "steps_set_aside": 0}
        if ref is None or not idx:
            out.append(rec)
            spans.append(())
            continue
        rel = []
        for i in idx:
            v = ys.relative([rows[i]])
            rel.append(v[0] if v else None)
        stop = len(idx)
        for j in range(len(idx)):
            win = [v for v in rel[j:j + span] if v is not None]
            if len(win) >= min(span, len(idx) - j) and win and _median_of(win) <= ref * (1.0 + within):
                stop = j
                rec["recovered"] = True
                rec["recovery_s"] = round((rows[idx[j]]["start_ns"] - w["t_end"]) / 1e9, 3)
                break
        spans.append(tuple(idx[:stop]))
        out.append(rec)
    total = sum(len(sp) for sp in spans)
    budget = int(max_frac * len(rows))
    keep = 1.0 if total <= budget else budget / total
    for rec, sp in zip(out, spans):
        n = int(len(sp) * keep)
        rec["steps_set_aside"] = n
        rec["capped"] = keep < 1.0
        for i in sp[:n]:
            labels[i]["scored"] = 0
    return out
