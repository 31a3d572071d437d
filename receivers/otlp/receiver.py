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
from typing import Callable, Optional

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from prism_otel import semconv as sc
from prism_otel.collector.errors import ConfigError, Refused
from receivers.otlp.config import OTLPReceiverConfig, parse_endpoint
from receivers.otlp.decode import drop_invalid_spans

logger = logging.getLogger(__name__)

Consumer = Callable[[ExportTraceServiceRequest, bytes, int], None]


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
            from receivers.otlp.grpc import GRPCFrontEnd  # lazy: grpcio loads only where gRPC is configured

            self.grpc_auth = host.extension(p.grpc.auth.authenticator) if p.grpc.auth else None
            self.grpc = GRPCFrontEnd(self, p.grpc)
            try:
                self.grpc.start()
            except OSError as exc:
                raise ConfigError(f"{prefix}::grpc::endpoint", f"cannot listen on {p.grpc.endpoint}: {exc}") from None
        if p.http is not None:
            from receivers.otlp.http import HTTPFrontEnd  # lazy: as the gRPC front end

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
