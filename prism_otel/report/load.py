"""Read what prism-otel wrote (OTLP/JSON span lines, incident logs) into plain records for the report.

Inputs: a directory (searched recursively for ``*.jsonl`` / ``*.json``) or files. Each line is either an
OTLP/JSON ``ExportTraceServiceRequest`` (the embedded default's ``traces-<pid>.jsonl``, the collector's
file exporter, an OTLP/JSON capture) or an incident event (``incidents-<pid>.jsonl``). A line that is
neither is counted and skipped with its file and line number; the rest is still read.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable

from prism_otel import otlp_json
from prism_otel import semconv as sc
from prism_otel.otlp_json import OTLPJSONError, request_from_json, request_to_dict
from prism_otel.record import StepRecord, Verdict


class NoData(ValueError):
    """Nothing prism-otel wrote was found in the inputs."""


def input_files(paths: Iterable[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for ext in ("*.jsonl", "*.json"):
                out += glob.glob(os.path.join(p, "**", ext), recursive=True)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return sorted(set(out))


class Loaded:
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.incident_events: list[dict] = []
        self.skipped: list[str] = []  # "file:line: reason", the first few
        self.skipped_n = 0
        self.files: list[str] = []

    def skip(self, where: str, why: str) -> None:
        self.skipped_n += 1
        if len(self.skipped) < 10:
            self.skipped.append(f"{where}: {why}")


def load(paths: Iterable[str]) -> Loaded:
    out = Loaded()
    files = input_files(paths)
    for path in files:
        n_before = len(out.spans) + len(out.incident_events)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            out.skip(path, str(exc))
            continue
        lines = text.splitlines()
        if path.endswith(".json") and not text.lstrip().startswith("{\"resourceSpans\"") and len(lines) > 1:
            lines = [text]  # one pretty-printed document
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{n}"
            try:
                doc = json.loads(line)
            except ValueError as exc:
                out.skip(where, f"not JSON ({exc})")
                continue
            if isinstance(doc, dict) and str(doc.get("event", "")).startswith("prism.incident"):
                out.incident_events.append(doc)
                continue
            if not isinstance(doc, dict) or "resourceSpans" not in doc:
                out.skip(where, "neither an OTLP/JSON trace export nor an incident event")
                continue
            try:
                doc = request_to_dict(request_from_json(doc))
            except OTLPJSONError as exc:
                out.skip(where, f"not an OTLP/JSON export request: {exc}")
                continue
            for rs in doc.get("resourceSpans", []):
                res = otlp_json.attributes(rs.get("resource", {}).get("attributes"))
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        out.spans.append({"name": s.get("name", ""), "span_id": s.get("spanId", ""),
                                          "parent_id": s.get("parentSpanId", ""),
                                          "start_ns": int(s.get("startTimeUnixNano", 0)),
                                          "end_ns": int(s.get("endTimeUnixNano", 0)),
                                          "attrs": otlp_json.attributes(s.get("attributes")), "resource": res,
                                          "status": (s.get("status") or {}).get("code", 0)})
        if len(out.spans) + len(out.incident_events) > n_before:
            out.files.append(path)
    return out


def steps_of(spans: list[dict]) -> list[StepRecord]:
    """``prism.step`` spans (and their stage children) as StepRecords with their verdicts, in time order."""
    stages: dict[str, dict[str, tuple]] = {}
    for s in spans:
        if s["name"].startswith(sc.STAGE_SPAN_PREFIX) and s["parent_id"]:
            stages.setdefault(s["parent_id"], {})[s["name"][len(sc.STAGE_SPAN_PREFIX):]] = (s["start_ns"], s["end_ns"])
    out = []
    for s in spans:
        if s["name"] != sc.STEP_SPAN:
            continue
        a = s["attrs"]
        v = None
        if sc.LATENCY_EXPECTED_MS in a or sc.ANOMALY in a:
            exp = a.get(sc.LATENCY_EXPECTED_MS)
            v = Verdict(expected_ms=float(exp) if exp is not None else None, score=a.get(sc.ANOMALY_SCORE),
                        anomaly=bool(a.get(sc.ANOMALY)), root_cause=a.get(sc.ANOMALY_ROOT_CAUSE),
                        test=a.get(sc.ANOMALY_TEST))
        extra = {k: val for k, val in a.items() if k.startswith(sc.ANOMALY_ROOT_CAUSE.rsplit(".", 1)[0] + ".evidence.")
                 or k == sc.DEEPDIVE}
        try:
            out.append(StepRecord(
                instance=str(a.get(sc.STEP_INSTANCE) or s["resource"].get(sc.RES_SERVICE_INSTANCE_ID, "")),
                index=int(a.get(sc.STEP_INDEX, 0) or 0), start_ns=s["start_ns"], end_ns=s["end_ns"],
                phase=str(a.get(sc.STEP_PHASE, "")), batch_size=int(a.get(sc.BATCH_SIZE, 0) or 0),
                prefill_tokens=int(a.get(sc.BATCH_PREFILL_TOKENS, 0) or 0),
                decode_tokens=int(a.get(sc.BATCH_DECODE_TOKENS, 0) or 0),
                stages=stages.get(s["span_id"], {}), verdict=v, attributes=extra))
        except (TypeError, ValueError):
            continue
    out.sort(key=lambda r: (r.start_ns, r.instance))
    return out


def requests_of(spans: list[dict]) -> list[dict]:
    out = []
    for s in spans:
        a = s["attrs"]
        if sc.REQUEST_ID not in a:
            continue
        out.append({"end_ns": s["end_ns"], "start_ns": s["start_ns"], "ttft_ms": a.get(sc.REQUEST_TTFT_MS),
                    "tpot_ms": a.get(sc.REQUEST_TPOT_MS), "duration_ms": a.get(sc.REQUEST_DURATION_MS),
                    "output_tokens": a.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS) or 0,
                    "status": a.get(sc.REQUEST_STATUS, "finished")})
    out.sort(key=lambda r: r["end_ns"])
    return out
