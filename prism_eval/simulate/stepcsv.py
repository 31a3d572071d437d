"""The ``steps.csv`` contract shared by ``prism-otel detect``, ``prism-otel eval --runs`` and recorders.

Columns: ``instance,start_ns,duration_us,phase,batch_size,prefill_tokens,decode_tokens,
context_tokens,max_context_tokens``. Only ``start_ns`` and ``duration_us`` are required; a missing
``instance`` reads as ``default``, missing counts as 0, a missing ``phase`` is derived from the token
counts (``decode`` when there are none). Optional ``stage_<name>_us`` columns give stage durations
(laid end to end from the step start); optional ``signal_<name>`` columns the evidence joined to the step
(``StepRecord.signals``, for root cause). Optional :data:`CHANGE_COLUMNS` give what changed since the
instance's previous step as the hooks knew it (:class:`~prism_otel.record.BatchChange`, from request
ids); where they are absent or empty the detector derives it from consecutive rows. Extra columns
are carried through untouched.

A row that cannot be read (a non-number, NaN, a negative value) becomes ``None`` in the parsed list
with its reason counted, so callers keep row order and lose nothing else.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Optional

from prism_otel.record import BatchChange, StepRecord, classify_phase

COLUMNS = ("instance", "start_ns", "duration_us", "phase", "batch_size", "prefill_tokens", "decode_tokens",
           "context_tokens", "max_context_tokens")
REQUIRED = ("start_ns", "duration_us")
CHANGE_COLUMNS = ("requests_joined", "requests_left", "tokens_joined", "batch_before", "steps_since_change")
_COUNTS = ("batch_size", "prefill_tokens", "decode_tokens", "context_tokens", "max_context_tokens")
STAGE_PREFIX, STAGE_SUFFIX = "stage_", "_us"
SIGNAL_PREFIX = "signal_"


def _num(text: Optional[str]) -> float:
    if text is None or text.strip() == "":
        return 0.0
    return float(text)


def parse_row(row: dict[str, str], index: int) -> tuple[Optional[StepRecord], Optional[str]]:
    """One CSV row as a StepRecord, or (None, reason)."""
    try:
        start = _num(row.get("start_ns"))
        dur = _num(row.get("duration_us"))
        counts = [_num(row.get(c)) for c in _COUNTS]
        stages = [(k[len(STAGE_PREFIX):-len(STAGE_SUFFIX)], _num(v)) for k, v in row.items()
                  if k and k.startswith(STAGE_PREFIX) and k.endswith(STAGE_SUFFIX) and v not in (None, "")]
        signals = {k[len(SIGNAL_PREFIX):]: float(v) for k, v in row.items()
                   if k and k.startswith(SIGNAL_PREFIX) and v not in (None, "")}
        change = None
        if all(row.get(c) not in (None, "") for c in CHANGE_COLUMNS):
            change = [_num(row.get(c)) for c in CHANGE_COLUMNS]
    except (TypeError, ValueError):
        return None, "unparsable"
    if any(not math.isfinite(v) for v in signals.values()):
        signals = {k: v for k, v in signals.items() if math.isfinite(v)}  # evidence is optional: drop, keep the step
    vals = [start, dur] + counts + [v for _, v in stages] + (change or [])
    if any(not math.isfinite(v) for v in vals):
        return None, "non_finite"
    if any(v < 0 for v in vals) or dur <= 0:
        return None, "negative"
    b, pre, dec, ctx, mx = (int(v) for v in counts)
    phase = (row.get("phase") or "").strip() or classify_phase(pre, dec)
    if phase == "idle" and not (pre or dec):
        phase = "decode"
    start_ns = int(start)
    end_ns = start_ns + max(1, int(round(dur * 1000)))
    st = {}
    t = start_ns
    for name, us in stages:
        t1 = t + int(round(us * 1000))
        st[name] = (t, t1)
        t = t1
    return StepRecord(instance=(row.get("instance") or "default").strip() or "default", index=index,
                      start_ns=start_ns, end_ns=end_ns, phase=phase, batch_size=b, prefill_tokens=pre,
                      decode_tokens=dec, context_tokens=ctx, max_context_tokens=mx, stages=st, signals=signals,
                      change=BatchChange(*(int(v) for v in change)) if change else None), None


def read(path: str) -> tuple[list[str], list[dict[str, str]], list[Optional[StepRecord]], dict[str, int]]:
    """(header, raw rows, parsed steps or None, bad-row counts by reason). Raises ValueError on a bad header."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {', '.join(missing)} "
                             f"(expected at least {', '.join(REQUIRED)}; full contract: {','.join(COLUMNS)})")
        raw = list(reader)
    steps: list[Optional[StepRecord]] = []
    bad: dict[str, int] = {}
    for i, row in enumerate(raw):
        s, why = parse_row(row, i + 1)
        steps.append(s)
        if why:
            bad[why] = bad.get(why, 0) + 1
    return header, raw, steps, bad


def write(path: str, steps: Sequence[StepRecord], extra: Optional[dict[str, Sequence]] = None) -> None:
    """Write steps in the contract's columns (plus stage columns, plus ``extra`` columns)."""
    names = sorted({n for s in steps for n in s.stages})
    changes = any(s.change is not None for s in steps)
    cols = list(COLUMNS) + (list(CHANGE_COLUMNS) if changes else []) + \
        [STAGE_PREFIX + n + STAGE_SUFFIX for n in names] + list(extra or {})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i, s in enumerate(steps):
            row = [s.instance, s.start_ns, round((s.end_ns - s.start_ns) / 1000.0, 3), s.phase, s.batch_size,
                   s.prefill_tokens, s.decode_tokens, s.context_tokens, s.max_context_tokens]
            if changes:
                row += list(s.change) if s.change is not None else [""] * len(CHANGE_COLUMNS)
            for n in names:
                iv = s.stages.get(n)
                row.append("" if iv is None else round((iv[1] - iv[0]) / 1000.0, 3))
            for vals in (extra or {}).values():
                row.append(vals[i])
            w.writerow(row)


def read_labels(path: str) -> list[int]:
    """labels.csv: a ``label`` (or ``anomaly``, as ``prism-otel simulate`` writes) column, one row per
    step: 1 anomalous, 0 normal, -1 not scored. A ``scored`` column of 0 (a step of the engine's
    recovery after a fault) makes that step -1 too."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        names = reader.fieldnames or []
        col = "label" if "label" in names else ("anomaly" if "anomaly" in names else None)
        if col is None:
            raise ValueError(f"{path}: missing column 'label' (or 'anomaly')")
        out = []
        for i, row in enumerate(reader):
            try:
                v = int(float(row[col]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {i + 2}: {col} {row[col]!r} is not -1, 0 or 1") from None
            if v not in (-1, 0, 1):
                raise ValueError(f"{path}: row {i + 2}: label {v} is not -1, 0 or 1")
            if row.get("scored", "1").strip() in ("0", "0.0"):
                v = -1
            out.append(v)
    return out
