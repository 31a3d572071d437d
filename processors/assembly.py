"""Spans back into records: the inverse of :mod:`prism_otel.spans`, on OTLP protobuf spans.

A ``prism.step`` span and its ``prism.stage.<name>`` / ``prism.kernels.<group>`` children become
one :class:`~prism_otel.record.StepRecord` again (same names, from :mod:`prism_otel.semconv`); a
request span (one carrying ``prism.request.id``) becomes a :class:`~prism_otel.record.RequestRecord`.
After the processors ran, :func:`tag_step` / :func:`tag_request` write what they concluded back
onto the original protobuf span (verdict attributes, new extras, the alert event), so the spans the
collector forwards are the ones it received plus the verdict.

The attribute types are not trusted: OTLP lets any sender put any value under any key. A known
prism attribute with a value of the wrong type (``prism.kv_cache.usage = "abc"``, a bool for a count,
a non-finite number) makes :func:`step_from_span` / :func:`request_from_span` raise :class:`BadSpan`;
the assembler then leaves that one span out of the processors, counts it and forwards it as received.

Pure functions; the stateful part (waiting for children) is :mod:`processors.assembler`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from prism_otel import semconv as sc
from prism_otel.record import BatchChange, RequestRecord, StepRecord, Verdict
from prism_otel.spans import verdict_attributes

STAGE = 0
KERNEL = 1
ChildInfo = Tuple[int, str, int, int]  # (STAGE|KERNEL, name, start_ns, end_ns)

_STEP_KEYS = frozenset((
    sc.STEP_INDEX, sc.STEP_PHASE, sc.STEP_INSTANCE, sc.STEP_DURATION_MS, sc.STEP_LINKS_DROPPED, sc.STEP_CHILDREN,
    sc.BATCH_SIZE, sc.BATCH_PREFILL_TOKENS, sc.BATCH_DECODE_TOKENS, sc.BATCH_CONTEXT_TOKENS,
    sc.BATCH_MAX_CONTEXT_TOKENS, sc.BATCH_REQUEST_IDS, sc.KV_CACHE_USAGE, sc.DEVICE_TIME_MS,
    sc.BATCH_REQUESTS_JOINED, sc.BATCH_REQUESTS_LEFT, sc.BATCH_TOKENS_JOINED, sc.BATCH_SIZE_BEFORE,
    sc.BATCH_STEPS_SINCE_CHANGE))
_CHANGE_KEYS = (sc.BATCH_REQUESTS_JOINED, sc.BATCH_REQUESTS_LEFT, sc.BATCH_TOKENS_JOINED, sc.BATCH_SIZE_BEFORE,
                sc.BATCH_STEPS_SINCE_CHANGE)
_SIGNAL_PREFIX_LEN = len(sc.SIGNAL_PREFIX)
VERDICT_KEYS = (sc.ANOMALY, sc.ANOMALY_SCORE, sc.LATENCY_EXPECTED_MS, sc.ANOMALY_ROOT_CAUSE, sc.SLO_VIOLATED)
_KNOWN = _STEP_KEYS | frozenset(VERDICT_KEYS)
_STAGE_PREFIX_LEN = len(sc.STAGE_SPAN_PREFIX)
_KERNEL_PREFIX_LEN = len(sc.KERNEL_SPAN_PREFIX)


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def attrs_of(kvs: Iterable) -> Dict[str, Any]:
    out = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "int_value":
            out[kv.key] = v.int_value
        elif kind == "string_value":
            out[kv.key] = v.string_value
        elif kind == "double_value":
            out[kv.key] = v.double_value
        elif kind == "bool_value":
            out[kv.key] = v.bool_value
        else:
            out[kv.key] = any_value(v)
    return out


def is_step(span) -> bool:
    return span.name == sc.STEP_SPAN


def child_info(span) -> Optional[ChildInfo]:
    """(kind, name, start, end) for a stage or kernel-group span that has a parent; else None."""
    name = span.name
    if not span.parent_span_id:
        return None
    if name.startswith(sc.STAGE_SPAN_PREFIX):
        return (STAGE, name[_STAGE_PREFIX_LEN:], span.start_time_unix_nano, span.end_time_unix_nano)
    if name.startswith(sc.KERNEL_SPAN_PREFIX):
        return (KERNEL, name[_KERNEL_PREFIX_LEN:], span.start_time_unix_nano, span.end_time_unix_nano)
    return None


def expected_children(span) -> Optional[int]:
    for kv in span.attributes:
        if kv.key == sc.STEP_CHILDREN:
            return kv.value.int_value
    return None


class BadSpan(ValueError):
    """A known prism attribute has a value of the wrong type; ``key`` names it."""

    def __init__(self, key: str, value: Any) -> None:
        super().__init__(f"attribute {key}: unexpected value {value!r:.80}")
        self.key = key


def _num(a: Mapping[str, Any], key: str) -> Optional[float]:
    """A finite number, or None when absent."""
    v = a.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadSpan(key, v)
    return v


def _int(a: Mapping[str, Any], key: str) -> int:
    v = _num(a, key)
    return 0 if v is None else int(v)


def _str(a: Mapping[str, Any], key: str) -> Optional[str]:
    v = a.get(key)
    if v is not None and not isinstance(v, str):
        raise BadSpan(key, v)
    return v


def _strs(a: Mapping[str, Any], key: str) -> Tuple[str, ...]:
    v = a.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
        raise BadSpan(key, v)
    return tuple(str(x) for x in v)


# how step_from_span reads each known attribute: (kind, field); one dict lookup per attribute
_NUM, _INT, _STR, _STRS, _BOOL, _SKIP = range(6)
_STEP_FIELDS: Dict[str, Tuple[int, str]] = {
    sc.STEP_INDEX: (_INT, "index"), sc.STEP_PHASE: (_STR, "phase"), sc.STEP_INSTANCE: (_STR, "instance"),
    sc.BATCH_SIZE: (_INT, "batch_size"), sc.BATCH_PREFILL_TOKENS: (_INT, "prefill_tokens"),
    sc.BATCH_DECODE_TOKENS: (_INT, "decode_tokens"), sc.BATCH_CONTEXT_TOKENS: (_INT, "context_tokens"),
    sc.BATCH_MAX_CONTEXT_TOKENS: (_INT, "max_context_tokens"), sc.KV_CACHE_USAGE: (_NUM, "kv"),
    sc.DEVICE_TIME_MS: (_NUM, "dev"), sc.BATCH_REQUEST_IDS: (_STRS, "request_ids"),
    sc.BATCH_REQUESTS_JOINED: (_INT, "c0"), sc.BATCH_REQUESTS_LEFT: (_INT, "c1"),
    sc.BATCH_TOKENS_JOINED: (_INT, "c2"), sc.BATCH_SIZE_BEFORE: (_INT, "c3"),
    sc.BATCH_STEPS_SINCE_CHANGE: (_INT, "c4"),
    sc.ANOMALY: (_BOOL, "anomaly"), sc.ANOMALY_SCORE: (_NUM, "score"), sc.LATENCY_EXPECTED_MS: (_NUM, "expected"),
    sc.ANOMALY_ROOT_CAUSE: (_STR, "root"), sc.SLO_VIOLATED: (_STRS, "slo"),
}
for _k in _KNOWN:  # known, not read back (derived when the span is rendered)
    _STEP_FIELDS.setdefault(_k, (_SKIP, ""))
_PRISM_PREFIX = "prism."
_ABSENT = object()


def _typed(key: str, kind: int, v: AnyValue):
    """One known attribute's value, type-checked as :func:`_num` / :func:`_str` / :func:`_strs` do."""
    which = v.WhichOneof("value")
    if which is None and kind != _BOOL:  # an empty value reads as absent, as before
        return _ABSENT
    if kind == _NUM or kind == _INT:
        if which == "int_value":
            x = v.int_value
            return x if kind == _NUM else int(x)
        if which == "double_value":
            x = v.double_value
            if math.isfinite(x):
                return x if kind == _NUM else int(x)
        raise BadSpan(key, any_value(v))
    if kind == _STR:
        if which == "string_value":
            return v.string_value
        raise BadSpan(key, any_value(v))
    if kind == _BOOL:
        if which == "bool_value":
            return v.bool_value
        raise BadSpan(key, any_value(v))
    # _STRS: an array of strings (ints accepted, as ids)
    if which != "array_value":
        raise BadSpan(key, any_value(v))
    out = []
    for x in v.array_value.values:
        w = x.WhichOneof("value")
        if w == "string_value":
            out.append(x.string_value)
        elif w == "int_value":
            out.append(str(x.int_value))
        else:
            raise BadSpan(key, any_value(v))
    return tuple(out)


def step_from_span(span, resource: Mapping[str, Any], children: Iterable[ChildInfo] = ()) -> StepRecord:
    """One pass over the span's attributes: known ones are type-checked into their fields, signals into
    ``signals``, anything else kept as an engine extra (the collector's per-step hot path)."""
    f: Dict[str, Any] = {}
    extras: Dict[str, Any] = {}
    signals: Dict[str, float] = {}
    fields = _STEP_FIELDS
    for kv in span.attributes:
        key = kv.key
        spec = fields.get(key)
        if spec is not None:
            kind = spec[0]
            if kind != _SKIP:
                x = _typed(key, kind, kv.value)
                if x is _ABSENT:
                    f.pop(spec[1], None)
                else:
                    f[spec[1]] = x
            continue
        if key.startswith(_PRISM_PREFIX):
            if key.startswith(sc.SIGNAL_PREFIX):
                x = _typed(key, _NUM, kv.value)
                if x is _ABSENT:
                    raise BadSpan(key, None)
                signals[key[_SIGNAL_PREFIX_LEN:]] = x
                continue
            if key.startswith(sc.FPM_PREFIX):  # derived from the fields when the span is rendered (ecosystem)
                continue
        v = kv.value
        which = v.WhichOneof("value")
        extras[key] = getattr(v, which) if which in _SCALARS else any_value(v)
    stages: Dict[str, Tuple[int, int]] = {}
    kernels: Dict[str, int] = {}
    if children:
        for kind, name, t0, t1 in sorted(children, key=lambda c: c[2]):
            if kind == STAGE:
                stages[name] = (t0, t1)
            else:
                kernels[name] = t1 - t0
    verdict = None
    if "anomaly" in f:
        verdict = Verdict(expected_ms=f.get("expected"), score=f.get("score"), anomaly=f["anomaly"],
                          root_cause=f.get("root"), alert=any(e.name == sc.ALERT_EVENT for e in span.events),
                          slo_violations=f.get("slo", ()))
    change = None
    if "c4" in f and "c0" in f and "c1" in f and "c2" in f and "c3" in f:
        change = BatchChange(f["c0"], f["c1"], f["c2"], f["c3"], f["c4"])
    kv = f.get("kv")
    dev = f.get("dev")
    instance = f.get("instance") or resource.get(sc.RES_SERVICE_INSTANCE_ID) or ""
    return StepRecord(
        instance=str(instance), index=f.get("index", 0),
        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
        phase=f.get("phase") or "idle", batch_size=f.get("batch_size", 0),
        prefill_tokens=f.get("prefill_tokens", 0), decode_tokens=f.get("decode_tokens", 0),
        context_tokens=f.get("context_tokens", 0), max_context_tokens=f.get("max_context_tokens", 0),
        kv_usage=float(kv) if kv is not None else None, stages=stages, kernel_groups=kernels,
        device_ns=int(round(dev * 1e6)) if dev is not None else None,
        request_ids=f.get("request_ids", ()), verdict=verdict, change=change, attributes=extras, signals=signals)


_SCALARS = frozenset(("string_value", "int_value", "double_value", "bool_value"))


def request_id_of(span) -> Optional[str]:
    for kv in span.attributes:
        if kv.key == sc.REQUEST_ID:
            return kv.value.string_value
    return None


def request_from_span(span, resource: Mapping[str, Any]) -> RequestRecord:
    a = attrs_of(span.attributes)
    t0 = span.start_time_unix_nano

    def at(key: str) -> Optional[int]:
        v = _num(a, key)
        return None if v is None else t0 + int(round(v * 1e6))

    n_out = _int(a, sc.GEN_AI_USAGE_OUTPUT_TOKENS)
    first = at(sc.REQUEST_TTFT_MS)
    tpot = _num(a, sc.REQUEST_TPOT_MS)
    last = first + int(round(tpot * 1e6 * (n_out - 1))) if first is not None and tpot is not None else first
    return RequestRecord(
        instance=str(resource.get(sc.RES_SERVICE_INSTANCE_ID) or ""), request_id=str(_str(a, sc.REQUEST_ID)),
        arrival_ns=t0, end_ns=span.end_time_unix_nano, first_scheduled_ns=at(sc.REQUEST_QUEUE_MS),
        first_token_ns=first, last_token_ns=last, prompt_tokens=_int(a, sc.GEN_AI_USAGE_INPUT_TOKENS),
        output_tokens=n_out, steps=_int(a, sc.REQUEST_STEPS), status=_str(a, sc.REQUEST_STATUS) or "finished",
        slo_violations=_strs(a, sc.SLO_VIOLATED))


# -- writing back ---------------------------------------------------------------------------------
def _fill(target: AnyValue, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, (list, tuple)):
        arr = target.array_value
        del arr.values[:]
        for v in value:
            _fill(arr.values.add(), v)
    else:
        target.string_value = str(value)


def set_attribute(span, key: str, value: Any, index: Optional[Dict[str, Any]] = None) -> None:
    kv = index.get(key) if index is not None else next((k for k in span.attributes if k.key == key), None)
    if kv is not None:
        kv.value.Clear()
        _fill(kv.value, value)
        return
    kv = span.attributes.add()
    kv.key = key
    _fill(kv.value, value)
    if index is not None:
        index[key] = kv


def remove_attribute(span, key: str) -> None:
    for i, kv in enumerate(span.attributes):
        if kv.key == key:
            del span.attributes[i]
            return


def tag_step(span, before: StepRecord, after: StepRecord) -> bool:
    """Write ``after``'s verdict and new/changed extras onto ``span``. True if anything changed."""
    verdict_changed = after.verdict != before.verdict
    extras_changed = after.attributes is not before.attributes
    if not verdict_changed and not extras_changed:
        return False
    index = {kv.key: kv for kv in span.attributes}
    changed = False
    if verdict_changed:
        changed = True
        new = verdict_attributes(after.verdict) if after.verdict is not None else {}
        for key in VERDICT_KEYS:
            if key in new:
                set_attribute(span, key, new[key], index)
            elif key in index:
                remove_attribute(span, key)
                index = {kv.key: kv for kv in span.attributes}
        v = after.verdict
        if v is not None and v.alert and not any(e.name == sc.ALERT_EVENT for e in span.events):
            ev = span.events.add()
            ev.name = sc.ALERT_EVENT
            ev.time_unix_nano = after.end_ns
            for k, val in ((sc.ANOMALY_SCORE, float(v.score or 0.0)),
                           (sc.LATENCY_EXPECTED_MS, float(v.expected_ms or 0.0)),
                           (sc.STEP_DURATION_MS, after.duration_ms)):
                kv = ev.attributes.add()
                kv.key = k
                _fill(kv.value, val)
    if extras_changed:
        old = before.attributes
        for key, val in after.attributes.items():
            if old.get(key, _MISSING) != val:
                set_attribute(span, key, val, index)
                changed = True
    return changed


def tag_request(span, before: RequestRecord, after: RequestRecord) -> bool:
    if after.slo_violations == before.slo_violations:
        return False
    if after.slo_violations:
        set_attribute(span, sc.SLO_VIOLATED, list(after.slo_violations))
    else:
        remove_attribute(span, sc.SLO_VIOLATED)
    return True


_MISSING = object()
