"""Decoding an OTLP trace export request, what the gRPC and HTTP front ends and the receiver share.

Protobuf and OTLP/JSON bodies become an ``ExportTraceServiceRequest`` or raise :class:`Malformed`
(INVALID_ARGUMENT / 400); :func:`drop_invalid_spans` removes the spans whose ids are invalid (an OTLP
partial success) and keeps the rest.
"""

from __future__ import annotations

import base64
import binascii
import json

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from prism_otel.otlp_json import _walk_ids  # the id walker of our OTLP/JSON codec, with a lenient converter


class Malformed(ValueError):
    """The request could not be decoded (INVALID_ARGUMENT / 400)."""


def decode_protobuf(raw: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Malformed(f"cannot decode protobuf ExportTraceServiceRequest: {exc}") from None
    return req


_BAD_ID = base64.b64encode(b"\0").decode("ascii")  # one byte: an invalid id, dropped with its span


def _lenient_id(value: str, size: int, key: str) -> str:
    """Hex id -> the base64 ParseDict reads; a bad one becomes an id of the wrong length (that span only)."""
    if value == "":
        return value
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return _BAD_ID
    return base64.b64encode(raw).decode("ascii") if len(raw) == size else _BAD_ID


def decode_json(raw: bytes) -> ExportTraceServiceRequest:
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise Malformed("cannot decode OTLP/JSON ExportTraceServiceRequest: the top level must be an object")
        _walk_ids(obj, _lenient_id)
        return json_format.ParseDict(obj, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except RecursionError:
        raise Malformed("cannot decode OTLP/JSON ExportTraceServiceRequest: nested too deep") from None
    except (ValueError, UnicodeDecodeError, TypeError, binascii.Error, json_format.ParseError) as exc:
        if isinstance(exc, Malformed):
            raise
        raise Malformed(f"cannot decode OTLP/JSON ExportTraceServiceRequest: {exc}") from None


def drop_invalid_spans(req: ExportTraceServiceRequest) -> tuple[int, int, str]:
    """Remove spans whose ids are not 16/8 bytes (or all zero); returns (kept, dropped, first reason)."""
    kept = dropped = 0
    reason = ""
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            spans = ss.spans
            bad = []
            for i, s in enumerate(spans):
                tid, sid, pid = s.trace_id, s.span_id, s.parent_span_id
                if len(tid) != 16 or len(sid) != 8 or (pid and len(pid) != 8) or not any(tid) or not any(sid):
                    bad.append(i)
                    if not reason:
                        reason = (f"span {s.name!r}: trace_id must be 16 bytes and span_id 8 bytes, non-zero "
                                  f"(got {len(tid)} and {len(sid)})")
            for i in reversed(bad):
                del spans[i]
            dropped += len(bad)
            kept += len(spans)
    return kept, dropped, reason
