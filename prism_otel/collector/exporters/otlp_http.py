"""``otlp_http`` exporter (old name ``otlphttp``): OTLP/HTTP POST of protobuf or JSON (hex ids).

``endpoint`` is the base URL (``/v1/traces`` is appended) unless ``traces_endpoint`` gives the full
URL. Retries 429, 502, 503, 504 and connection failures, honouring ``Retry-After`` (seconds or an
HTTP date); any other non-2xx answer is permanent (dropped, counted).
"""

from __future__ import annotations

import email.utils
import gzip
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel import semconv as sc
from prism_otel.collector.component import EXPORTER, Factory
from prism_otel.collector.decode import Duration, check
from prism_otel.collector.errors import PermanentError
from prism_otel.collector.exporters.base import OutItem, QueuedExporter, Retryable, RetryConfig, SendingQueueConfig
from prism_otel.collector.tls import AuthConfig, TLSClientConfig
from prism_otel.otlp_json import request_to_json

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = (429, 502, 503, 504)


@dataclass
class OTLPHTTPExporterConfig:
    endpoint: str = ""
    traces_endpoint: str = ""
    tls: TLSClientConfig = field(default_factory=TLSClientConfig)
    headers: dict[str, str] = field(default_factory=dict)
    compression: Literal["gzip", "none", ""] = "gzip"
    encoding: Literal["proto", "json"] = "proto"
    timeout: Duration = Duration(30.0)
    sending_queue: SendingQueueConfig = field(default_factory=SendingQueueConfig)
    retry_on_failure: RetryConfig = field(default_factory=RetryConfig)
    auth: Optional[AuthConfig] = None

    def validate(self) -> None:
        check(bool(self.endpoint or self.traces_endpoint), "endpoint", "required: the backend's base URL")
        for key in ("endpoint", "traces_endpoint"):
            url = getattr(self, key)
            check(not url or url.startswith(("http://", "https://")), key, f"must be an http(s) URL, got {url!r}")
        check(self.timeout > 0, "timeout", "must be greater than 0")

    @property
    def url(self) -> str:
        return self.traces_endpoint or self.endpoint.rstrip("/") + "/v1/traces"


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OTLPHTTPExporter(QueuedExporter):
    def __init__(self, settings, cfg: OTLPHTTPExporterConfig) -> None:
        super().__init__(settings)
        self.cfg = cfg
        self.queue = cfg.sending_queue
        self.retry = cfg.retry_on_failure
        self._local = threading.local()
        self._sessions: list = []
        self._sessions_lock = threading.Lock()
        self._headers = dict(cfg.headers)
        self._headers["Content-Type"] = "application/json" if cfg.encoding == "json" else "application/x-protobuf"
        if cfg.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        t = cfg.tls
        self._verify = False if t.insecure_skip_verify else (t.ca_file or True)
        self._cert = (t.cert_file, t.key_file) if t.cert_file else None

    def start(self, host) -> None:
        if self.cfg.auth is not None:
            name, value = host.extension(self.cfg.auth.authenticator).client_header()
            self._headers[name] = value
        super().start(host)

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            with self._sessions_lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()

    def send(self, item: OutItem) -> None:
        body = request_to_json(item.request).encode() if self.cfg.encoding == "json" else item.payload
        if self.cfg.compression == "gzip":
            body = gzip.compress(body, compresslevel=5)
        try:
            resp = self._session().post(self.cfg.url, data=body, headers=self._headers, timeout=self.cfg.timeout,
                                        verify=self._verify, cert=self._cert)
        except requests.RequestException as exc:
            self._local.session = None  # a fresh connection next time
            raise Retryable(f"{type(exc).__name__}: {exc}", uncertain=isinstance(exc, requests.ReadTimeout)) from None
        code = resp.status_code
        if 200 <= code < 300:
            self._partial(resp)
            return
        msg = f"HTTP {code}: {resp.text[:200]}"
        if code in RETRYABLE_STATUS:
            raise Retryable(msg, parse_retry_after(resp.headers.get("Retry-After")))
        raise PermanentError(msg)

    def _partial(self, resp) -> None:
        if not resp.content or "protobuf" not in resp.headers.get("Content-Type", ""):
            return
        try:
            ps = ExportTraceServiceResponse.FromString(resp.content).partial_success
        except Exception:  # noqa: BLE001 - a backend's odd success body is still a success
            return
        if ps.rejected_spans:
            self.telemetry.add(sc.COLLECTOR_EXPORT_FAILED_SPANS, ps.rejected_spans, exporter=self.id,
                               reason="rejected_by_backend")


def factory() -> Factory:
    return Factory("otlp_http", EXPORTER, OTLPHTTPExporterConfig, OTLPHTTPExporter, aliases=("otlphttp",))
