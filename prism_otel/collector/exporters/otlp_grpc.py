"""``otlp_grpc`` exporter (``otlp`` is its old name): OTLP/gRPC ``TraceService/Export`` to a backend.

The channel reconnects at most a second after a backend comes back. Retries only what OTLP calls
retryable: CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE,
UNAVAILABLE and DATA_LOSS, and RESOURCE_EXHAUSTED only when the server sent ``RetryInfo``, whose
delay is honoured. Anything else is permanent (dropped, counted). A partial success is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel import semconv as sc
from prism_otel.collector.component import EXPORTER, Factory
from prism_otel.collector.decode import Duration, check
from prism_otel.collector.errors import PermanentError
from prism_otel.collector.exporters.base import OutItem, QueuedExporter, Retryable, RetryConfig, SendingQueueConfig
from prism_otel.collector.tls import AuthConfig, TLSClientConfig

logger = logging.getLogger(__name__)

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRYABLE = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
RETRY_INFO_KEY = "google.rpc.retryinfo-bin"


@dataclass
class OTLPGRPCExporterConfig:
    endpoint: str = ""
    tls: TLSClientConfig = field(default_factory=TLSClientConfig)
    headers: dict[str, str] = field(default_factory=dict)
    compression: Literal["gzip", "none", ""] = "gzip"
    timeout: Duration = Duration(5.0)
    wait_for_ready: bool = False
    sending_queue: SendingQueueConfig = field(default_factory=SendingQueueConfig)
    retry_on_failure: RetryConfig = field(default_factory=RetryConfig)
    auth: Optional[AuthConfig] = None

    def validate(self) -> None:
        check(bool(self.endpoint), "endpoint", "required: host:port of the OTLP/gRPC backend")
        target = self.endpoint.split("://", 1)[-1]
        check(":" in target.rsplit("]", 1)[-1], "endpoint", f"needs a port: {self.endpoint!r}")
        check(not self.tls.insecure_skip_verify, "tls::insecure_skip_verify",
              "not supported by the gRPC exporter; give tls.ca_file instead")
        check(self.timeout > 0, "timeout", "must be greater than 0")


def parse_retry_info(metadata) -> Optional[float]:
    for key, value in metadata or ():
        if key == RETRY_INFO_KEY:
            try:
                from google.rpc.error_details_pb2 import RetryInfo

                info = RetryInfo.FromString(value)
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            except Exception:  # noqa: BLE001 - a bad RetryInfo is just no RetryInfo
                return None
    return None


class OTLPGRPCExporter(QueuedExporter):
    def __init__(self, settings, cfg: OTLPGRPCExporterConfig) -> None:
        super().__init__(settings)
        self.cfg = cfg
        self.queue = cfg.sending_queue
        self.retry = cfg.retry_on_failure
        self._channel = None
        self._call = None
        self._metadata = tuple((k.lower(), v) for k, v in cfg.headers.items())
        self._compression = grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression

    def start(self, host) -> None:
        cfg = self.cfg
        if cfg.auth is not None:
            self._metadata += (host.extension(cfg.auth.authenticator).client_header(),)
        scheme, _, target = cfg.endpoint.rpartition("://")
        # Reconnect within a second of a backend's return: grpc's own backoff grows to 120 s (16-17 s
        # after a typical outage); our retry_on_failure already paces the calls.
        options: list[tuple[str, Any]] = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        if cfg.tls.insecure or scheme == "http":
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            t = cfg.tls

            def read(path):
                if not path:
                    return None
                with open(path, "rb") as fh:
                    return fh.read()

            creds = grpc.ssl_channel_credentials(read(t.ca_file), read(t.key_file), read(t.cert_file))
            if t.server_name_override:
                options.append(("grpc.ssl_target_name_override", t.server_name_override))
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._call = self._channel.unary_unary(EXPORT_METHOD, request_serializer=None,
                                               response_deserializer=ExportTraceServiceResponse.FromString)
        super().start(host)

    def send(self, item: OutItem) -> None:
        call = self._call
        if call is None:  # send before start(): a failed send, as the queue counts it
            raise RuntimeError(f"exporter {self.cfg.endpoint!r} is not started")
        try:
            resp = call(item.payload, timeout=self.cfg.timeout, metadata=self._metadata,
                        compression=self._compression, wait_for_ready=self.cfg.wait_for_ready)
        except grpc.RpcError as exc:
            code = exc.code()
            delay = parse_retry_info(exc.trailing_metadata())
            msg = f"{code.name}: {exc.details()}"
            if code in _RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None):
                raise Retryable(msg, delay, uncertain=code == grpc.StatusCode.DEADLINE_EXCEEDED) from None
            raise PermanentError(msg) from None
        ps = resp.partial_success
        if ps.rejected_spans:
            self.telemetry.add(sc.COLLECTOR_EXPORT_FAILED_SPANS, ps.rejected_spans, exporter=self.id,
                               reason="rejected_by_backend")
            logger.warning("exporter %s: backend rejected %d spans: %s", self.id, ps.rejected_spans,
                           ps.error_message)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def factory() -> Factory:
    return Factory("otlp_grpc", EXPORTER, OTLPGRPCExporterConfig, OTLPGRPCExporter, aliases=("otlp",))
