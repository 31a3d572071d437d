"""The ``otlp`` receiver: what the gRPC and HTTP front ends share.

Both decode a request, then call :meth:`OTLPReceiver.accept`, which drops spans with invalid ids
(answered as an OTLP partial success, counted), counts what came in, and hands the request to the
pipelines' intake. The intake may refuse (:class:`~prism_otel.collector.errors.Refused`); the front
ends turn that into the OTLP backpressure statuses. Nothing here blocks on the pipelines.

Both front ends wait on an asyncio loop (:mod:`receivers.otlp.aio`): a slow or half-open client
costs a coroutine, not a worker. They check, in this order and before reading a body: credentials
(as soon as the headers are in), the path, the pipelines' room, and the memory budget's receive share
(:mod:`prism_otel.collector.memory`); every refusal carries a retry hint.

OTLP/JSON: a span whose id is not hex of the right length is dropped as a partial success, as the
protobuf path does; the rest of the request is kept.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

import base64
import binascii
import json

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

from prism_otel import semconv as sc
from prism_otel.collector.errors import ConfigError, Refused
from prism_otel.otlp_json import _walk_ids  # the id walker of our OTLP/JSON codec, with a lenient converter
from receivers.otlp.config import OTLPReceiverConfig, parse_endpoint

logger = logging.getLogger(__name__)

Consumer = Callable[[ExportTraceServiceRequest, bytes, int], None]


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


def drop_invalid_spans(req: ExportTraceServiceRequest) -> Tuple[int, int, str]:
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


class OTLPReceiver:
    def __init__(self, settings, cfg: OTLPReceiverConfig, consumer: Consumer) -> None:
        self.id = str(settings.id)
        self.cfg = cfg
        self.telemetry = settings.telemetry
        self.consumer = consumer
        self.grpc = None
        self.http = None
        self.grpc_auth = None
        self.http_auth = None
        self.budget = settings.budget.receive  # bodies being read and decoded, all front ends together

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, host) -> None:
        p = self.cfg.protocols
        prefix = f"receivers::{self.id}::protocols"
        for proto, server in (("grpc", p.grpc), ("http", p.http)):
            if server is not None and server.auth is not None and server.tls is None:
                host_addr = parse_endpoint(server.endpoint)[0]
                where = "loopback" if host_addr.startswith("127.") or host_addr == "::1" else host_addr
                logger.warning("%s::%s: bearer token authentication without TLS: the token crosses the network in "
                               "clear text (listening on %s); configure tls", prefix, proto, where)
        if p.grpc is not None:
            from receivers.otlp.grpc import GRPCFrontEnd

            self.grpc_auth = host.extension(p.grpc.auth.authenticator) if p.grpc.auth else None
            self.grpc = GRPCFrontEnd(self, p.grpc)
            try:
                self.grpc.start()
            except OSError as exc:
                raise ConfigError(f"{prefix}::grpc::endpoint", f"cannot listen on {p.grpc.endpoint}: {exc}") from None
        if p.http is not None:
            from receivers.otlp.http import HTTPFrontEnd

            self.http_auth = host.extension(p.http.auth.authenticator) if p.http.auth else None
            self.http = HTTPFrontEnd(self, p.http)
            try:
                self.http.start()
            except OSError as exc:
                self.shutdown()
                raise ConfigError(f"{prefix}::http::endpoint", f"cannot listen on {p.http.endpoint}: {exc}") from None

    def shutdown(self) -> None:
        for fe in (self.grpc, self.http):
            if fe is not None:
                fe.stop()

    @property
    def grpc_port(self) -> Optional[int]:
        return self.grpc.port if self.grpc else None

    @property
    def http_port(self) -> Optional[int]:
        return self.http.port if self.http else None

    # -- per request ----------------------------------------------------------------------------
    def refused(self, transport: str, exc: Refused) -> None:
        self.telemetry.add(sc.COLLECTOR_REFUSED_REQUESTS, receiver=self.id, transport=transport, reason=exc.reason)

    def _memory_refused(self, transport: str) -> Refused:
        exc = Refused("memory limit: the receivers hold all the data their budget allows", 1.0)
        self.refused(transport, exc)
        return exc

    def memory_room(self, transport: str) -> None:
        """Raise Refused (counted) while the receive share of the memory budget is in use."""
        if self.budget.full:
            raise self._memory_refused(transport)

    def reserve(self, n: int, transport: str) -> None:
        """Take ``n`` bytes of the receive share, or raise Refused (counted)."""
        if not self.budget.try_take(n):
            raise self._memory_refused(transport)

    def admit(self, transport: str, wire_bytes: int = 0) -> None:
        """Refuse before decoding when the pipelines are full (or could not take ``wire_bytes`` more):
        overload then costs little CPU."""
        admit = getattr(self.consumer, "admit", None)
        if admit is None:
            return
        try:
            admit(wire_bytes) if wire_bytes else admit()
        except Refused as exc:
            self.refused(transport, exc)
            raise

    def malformed(self, transport: str, reason: str) -> None:
        self.telemetry.add(sc.COLLECTOR_MALFORMED_REQUESTS, receiver=self.id, transport=transport, reason=reason)

    def unauthenticated(self, transport: str) -> None:
        self.telemetry.add(sc.COLLECTOR_UNAUTHENTICATED, receiver=self.id, transport=transport)

    def accept(self, req: ExportTraceServiceRequest, raw: Optional[bytes], transport: str) -> ExportTraceServiceResponse:
        """Validate, count and hand on ``req``; ``raw`` is its protobuf encoding when it came as one.
        Raises :class:`Refused` when the pipelines cannot take it now."""
        kept, dropped, reason = drop_invalid_spans(req)
        resp = ExportTraceServiceResponse()
        if dropped:
            self.telemetry.add(sc.COLLECTOR_REJECTED_SPANS, dropped, receiver=self.id, transport=transport)
            resp.partial_success.rejected_spans = dropped
            resp.partial_success.error_message = reason
            raw = None
        if not kept:
            return resp
        if raw is None:
            raw = req.SerializeToString()
        try:
            self.consumer(req, raw, kept)
        except Refused as exc:
            self.telemetry.add(sc.COLLECTOR_REFUSED_SPANS, kept, receiver=self.id, transport=transport,
                               reason=exc.reason)
            raise
        self.telemetry.add(sc.COLLECTOR_RECEIVED_SPANS, kept, receiver=self.id, transport=transport)
        return resp
