"""``prism-otel report DIR|FILE... -o report.html``: one self-contained HTML page of a run.

From the spans prism-otel wrote (the embedded default's ``prism-out/``, a collector's file exporter,
any OTLP/JSON capture) and its incident logs, one page that opens offline (uPlot, vendored under
``vendor/``, and the data are inlined; nothing is fetched) with:

* step latency against the latency expected for its workload, over time, per phase, anomalous steps
  marked and incidents shaded;
* the share of step time each host stage took, over time;
* the incidents: start, duration, root cause and its evidence, peak, steps affected, phases, stages;
* requests: TTFT / TPOT / duration percentiles, requests and tokens per second over time;
* the detector's state: steps judged and not judged per phase, and where its baseline came from.

Incidents come from the incident logs when the inputs have them (what was notified live); otherwise
they are replayed from the steps' verdicts with the live rules (:func:`processors.incidents.replay`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.record import StepRecord
from prism_otel.report.load import Loaded, NoData, load, requests_of, steps_of

MAX_POINTS = 12000  # per phase: every anomalous step, and normal ones evenly thinned to fit
BUCKETS = 120
_HERE = os.path.dirname(os.path.abspath(__file__))


def _pct(vals: list[float], q: float) -> Optional[float]:
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1 if q > 0 else 0)]


def _r(x, n=3):
    return None if x is None else round(float(x), n)


def _expected_ms(step: StepRecord) -> Optional[float]:
    v = step.verdict
    return _r(v.expected_ms, 4) if v and v.expected_ms else None


def _anomalous(step: StepRecord) -> int:
    v = step.verdict
    return 1 if (v is not None and v.anomaly) else 0


def _incidents(loaded: Loaded, steps) -> tuple:
    if loaded.incident_events:
        by_id: dict[str, dict] = {}
        for ev in sorted(loaded.incident_events, key=lambda e: e.get("time_unix_nano") or 0):
            inc = ev.get("incident") or {}
            if "id" in inc:
                by_id[inc["id"]] = inc
        return sorted(by_id.values(), key=lambda i: i.get("start_ns", 0)), "incident log (as notified live)"
    from processors.incidents import replay

    incs = [i.to_dict() for i in replay(steps)]
    return incs, "replayed from the steps' verdicts (no incident log in the inputs)"


def build(paths: Iterable[str]) -> dict:
    """The report's data (what the page plots), from the input paths."""
    loaded = load(paths)
    steps = steps_of(loaded.spans)
    if not steps:
        where = ", ".join(loaded.skipped[:3])
        raise NoData("no prism.step spans found" + (f" ({loaded.skipped_n} lines skipped: {where})" if where else "")
                     + ": give the directory prism-otel wrote (prism-out/) or OTLP/JSON span files")
    reqs = requests_of(loaded.spans)
    t0 = min(s.start_ns for s in steps)
    t1 = max(s.end_ns for s in steps)
    span_s = max((t1 - t0) / 1e9, 1e-3)
    phases: dict[str, dict] = {}
    for ph in [p for p in sc.PHASES if any(s.phase == p for s in steps)]:
        ss = [s for s in steps if s.phase == ph]
        anom = [i for i, s in enumerate(ss) if s.verdict is not None and s.verdict.anomaly]
        k = max(1, int(math.ceil((len(ss) - len(anom)) / max(1, MAX_POINTS - len(anom)))))
        keep = sorted(set(anom) | set(range(0, len(ss), k)))
        judged = [s for s in ss if s.verdict is not None and s.verdict.expected_ms is not None]
        first = next((i for i, s in enumerate(ss) if s.verdict is not None and s.verdict.expected_ms is not None), None)
        phases[ph] = {
            "t": [_r((ss[i].end_ns - t0) / 1e9, 4) for i in keep],
            "ms": [_r(ss[i].duration_ms, 4) for i in keep],
            "exp": [_expected_ms(ss[i]) for i in keep],
            "anom": [_anomalous(ss[i]) for i in keep],
            "steps": len(ss), "shown": len(keep), "thinned": k, "judged": len(judged),
            "unjudged": len(ss) - len(judged), "anomalous": len(anom),
            "first_judged_s": None if first is None else _r((ss[first].end_ns - t0) / 1e9, 3),
            "baseline": ("no model yet: nothing judged" if first is None else
                         "loaded (or trained offline): judged from its first step" if first == 0 else
                         f"learned in this run from its first {first} steps"),
            "p50_ms": _r(_pct([s.duration_ms for s in ss], 0.5)), "p99_ms": _r(_pct([s.duration_ms for s in ss], 0.99)),
        }
    # stage shares over time
    bw = span_s / BUCKETS
    step_ns = [0] * BUCKETS
    stage_tot: dict[str, list[int]] = {}
    for s in steps:
        b = min(BUCKETS - 1, int((s.end_ns - t0) / 1e9 / bw))
        step_ns[b] += s.duration_ns
        for name, (a, e) in s.stages.items():
            stage_tot.setdefault(name, [0] * BUCKETS)[b] += e - a
    order = sorted(stage_tot, key=lambda n: -sum(stage_tot[n]))
    shares = {n: [_r(stage_tot[n][b] / step_ns[b], 4) if step_ns[b] else None for b in range(BUCKETS)] for n in order}
    totals = {n: _r(sum(stage_tot[n]) / max(1, sum(step_ns)), 4) for n in order}
    # requests and tokens per second, in buckets of at least a second
    nb = max(1, min(BUCKETS, int(span_s)))
    bw2 = span_s / nb
    done = [0] * nb
    tokens = [0] * nb
    for r in reqs:
        done[min(nb - 1, max(0, int((r["end_ns"] - t0) / 1e9 / bw2)))] += 1
    for s in steps:
        tokens[min(nb - 1, int((s.end_ns - t0) / 1e9 / bw2))] += s.tokens
    pct = {}
    for key in ("ttft_ms", "tpot_ms", "duration_ms"):
        vals = [float(r[key]) for r in reqs if r.get(key) is not None]
        pct[key] = {q: _r(_pct(vals, v)) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
        pct[key]["n"] = len(vals)
    incidents, inc_source = _incidents(loaded, steps)
    for inc in incidents:
        inc["t_start"] = _r((inc.get("start_ns", t0) - t0) / 1e9, 3)
        inc["t_end"] = _r(((inc.get("end_ns") or inc.get("start_ns", t0)) - t0) / 1e9, 3)
    instances = sorted({s.instance for s in steps})
    services = sorted({str(sp["resource"].get(sc.RES_SERVICE_NAME, "")) for sp in loaded.spans if sp["name"] == sc.STEP_SPAN})
    return {
        "title": f"prism-otel report: {', '.join(services) or 'engine'}",
        "t0_unix_s": t0 / 1e9, "span_s": _r(span_s, 3), "instances": instances, "services": services,
        "files": loaded.files, "skipped": loaded.skipped, "skipped_n": loaded.skipped_n,
        "steps": len(steps), "requests": len(reqs), "phases": phases,
        "stages": {"t": [_r((b + 0.5) * bw, 3) for b in range(BUCKETS)], "shares": shares, "totals": totals,
                   "empty": [1 if not step_ns[b] else 0 for b in range(BUCKETS)]},
        "throughput": {"t": [_r((b + 0.5) * bw2, 3) for b in range(nb)],
                       "requests_per_s": [_r(x / bw2, 3) for x in done], "tokens_per_s": [_r(x / bw2, 1) for x in tokens]},
        "ttft": {"t": [_r((r["end_ns"] - t0) / 1e9, 3) for r in reqs if r.get("ttft_ms") is not None],
                 "ms": [_r(r["ttft_ms"]) for r in reqs if r.get("ttft_ms") is not None]},
        "percentiles": pct, "incidents": incidents, "incident_source": inc_source,
    }


def render(data: dict) -> str:
    def read(name: str) -> str:
        with open(os.path.join(_HERE, name), encoding="utf-8") as f:
            return f.read()

    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    html = read("template.html")
    return (html.replace("/*UPLOT_CSS*/", read("vendor/uPlot.min.css"))
            .replace("/*UPLOT_JS*/", read("vendor/uPlot.iife.min.js").replace("</script", "<\\/script"))
            .replace("/*REPORT_JS*/", read("report.js"))
            .replace("__TITLE__", _html_escape(data["title"]))
            .replace("/*DATA*/", payload))


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_report(paths: Iterable[str], out_path: str) -> dict:
    data = build(paths)
    html = render(data)
    d = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(d, exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(html)
    os.replace(tmp, out_path)
    return data


__all__ = ["build", "render", "write_report", "NoData"]
