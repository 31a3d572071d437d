"""OTLP/JSON encoding and decoding, done right.

OTLP/JSON departs from the proto3 JSON mapping: trace and span ids are hex (not base64), enums are
integers, keys are lowerCamelCase. ``google.protobuf.json_format.Parse`` would silently read a
32-character hex trace id as base64 and yield 24 bytes, so ids are converted by hand here, in both
directions. Used by the embedded file exporter, the collector's HTTP receiver and its file exporter.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_ID_KEYS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


class OTLPJSONError(ValueError):
    """The payload is not valid OTLP/JSON."""


def _walk_ids(obj: Any, convert) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _ID_KEYS and isinstance(v, str):
                obj[k] = convert(v, _ID_KEYS[k], k)
            else:
                _walk_ids(v, convert)
    elif isinstance(obj, list):
        for v in obj:
            _walk_ids(v, convert)


def _b64_to_hex(v: str, size: int, key: str) -> str:
    return base64.b64decode(v).hex()


def _hex_to_b64(v: str, size: int, key: str) -> str:
    if v == "":
        return v
    try:
        raw = bytes.fromhex(v)
    except ValueError as exc:
        raise OTLPJSONError(f"{key} is not hex: {v!r}") from exc
    if len(raw) != size:
        raise OTLPJSONError(f"{key} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def request_to_dict(req: ExportTraceServiceRequest) -> dict:
    d = json_format.MessageToDict(req, preserving_proto_field_name=False, use_integers_for_enums=True)
    _walk_ids(d, _b64_to_hex)
    return d


def request_to_json(req: ExportTraceServiceRequest) -> str:
    return json.dumps(request_to_dict(req), separators=(",", ":"))


def request_from_json(data) -> ExportTraceServiceRequest:
    """Parse an OTLP/JSON ``ExportTraceServiceRequest`` (bytes, str or an already-parsed dict)."""
    try:
        obj = json.loads(data) if isinstance(data, (bytes, bytearray, str)) else data
    except (ValueError, UnicodeDecodeError) as exc:
        raise OTLPJSONError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise OTLPJSONError("top level must be a JSON object")
    _walk_ids(obj, _hex_to_b64)
    try:
        return json_format.ParseDict(obj, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error, TypeError, ValueError) as exc:
        raise OTLPJSONError(str(exc)) from exc


def any_value(v: dict):
    """An OTLP/JSON ``AnyValue`` (a dict) as a Python value (ints from their string form; kvlists and
    bytes as None)."""
    for k in ("stringValue", "boolValue", "doubleValue"):
        if k in v:
            return v[k]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [any_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def attributes(items) -> dict:
    """An OTLP/JSON attribute list as a dict."""
    return {a.get("key", ""): any_value(a.get("value", {})) for a in items or ()}
