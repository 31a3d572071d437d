"""Exporters from the standard ``OTEL_*`` variables, as the collector's exporter components.

The companion hands OTLP request bytes (:mod:`prism_otel.otlp_encode`) to these; they are the
collector's own exporters (:mod:`prism_otel.collector.exporters`: one queue, one retry policy, one set
of counters), configured the way the OpenTelemetry SDK reads the same variables:

* ``OTEL_TRACES_EXPORTER`` (comma list): ``otlp`` (protocol from ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``
  / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` (default), ``http/protobuf``), ``otlp_proto_grpc``,
  ``otlp_proto_http``, ``console``, ``none``; any other name is an ``opentelemetry_traces_exporter``
  entry point (an SDK ``SpanExporter``: the companion then builds SDK spans for it, at the SDK's cost);
* ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`` (alone it implies ``otlp``), ``_HEADERS``, ``_TIMEOUT``
  (seconds, 10), ``_COMPRESSION`` (``gzip`` or none, the default), ``_INSECURE``, ``_CERTIFICATE``,
  ``_CLIENT_KEY``, ``_CLIENT_CERTIFICATE``;
* ``OTEL_BSP_MAX_QUEUE_SIZE`` (spans, 2048), ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,
  ``OTEL_BSP_SCHEDULE_DELAY`` (ms, 5000): the batching (``BatchSettings``). Unset, the export batch
  is the queue size up to 2048 spans (the SDK's 512 made five requests a second of a busy engine, each a
  wake-up of the exporter and a gRPC call: about 10 us of the companion's CPU per step at batch 16),
  and a request never passes ``BATCH_BYTES`` (1 MiB, a quarter of the usual 4 MiB receive limit);
* with none of these set, the embedded default writes OTLP/JSON lines under ``./prism-out/``
  (``PRISM_OTEL_OUT_DIR``), one request per line, rotated at ``PRISM_OTEL_OUT_MAX_MB`` (64) with
  ``PRISM_OTEL_OUT_FILES`` (4) files kept, and a per-stage summary is printed at exit.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import IO, Any, Optional
from urllib.parse import unquote

from prism_otel import config
from prism_otel import semconv as sc

logger = logging.getLogger(__name__)


BATCH_BYTES = 1 << 20  # an export request's encoded spans stay below this (bytes)
DEFAULT_BATCH_SPANS = 2048  # without OTEL_BSP_MAX_EXPORT_BATCH_SIZE: the queue size, at most this


@dataclass
class BatchSettings:
    max_queue_spans: int = 2048
    batch_spans: int = 2048
    delay_s: float = 5.0
    batch_bytes: int = BATCH_BYTES

    @classmethod
    def from_env(cls) -> BatchSettings:
        q = config.env_int(sc.OTEL_BSP_MAX_QUEUE_SIZE, 2048)
        b = config.env_int(sc.OTEL_BSP_MAX_EXPORT_BATCH_SIZE, min(max(q, 1), DEFAULT_BATCH_SPANS))
        d = config.env_float(sc.OTEL_BSP_SCHEDULE_DELAY, 5000.0) / 1e3
        if q < 1 or b < 1 or b > q or d < 0:
            logger.error("prism-otel: OTEL_BSP_* settings rejected (queue %s, batch %s, delay %s s); using the "
                         "SDK defaults", q, b, d)
            return cls()
        return cls(q, b, d)


_ITEM = None


def _item(payload: bytes, n_spans: int):
    """An exporter work item whose decoded request is made only if an exporter asks (JSON, debug)."""
    global _ITEM
    if _ITEM is None:
        from prism_otel.collector.exporters.base import OutItem

        class _Item(OutItem):
            __slots__ = ("_req",)

            @property
            def request(self):
                if self._req is None:
                    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                    self._req = ExportTraceServiceRequest.FromString(self.payload)
                return self._req

            @request.setter
            def request(self, value) -> None:
                self._req = value

        _ITEM = _Item
    return _ITEM(None, payload, n_spans, {})


class QueuedBytes:
    """One of the collector's exporters fed with request bytes (``export``), started at construction."""

    def __init__(self, inner, name: str) -> None:
        from prism_otel.collector.component import Host

        self.inner = inner
        self.name = name
        inner.start(Host())

    def export(self, payload: bytes, n_spans: int) -> None:
        self.inner.enqueue(_item(payload, n_spans), _done)

    def force_flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        inner = self.inner
        while (len(inner) or inner._inflight) and time.monotonic() < deadline:
            time.sleep(0.005)
        return not (len(inner) or inner._inflight)

    def shutdown(self, timeout: float = 10.0) -> None:
        self.inner.shutdown(timeout, drain=True)


def _done(ok: bool) -> None:
    pass


class ConsoleBytes:
    """``console``: each span as one JSON document on stdout (OTLP/JSON field names, hex ids)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def export(self, payload: bytes, n_spans: int) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        from prism_otel.otlp_json import request_to_dict

        d = request_to_dict(ExportTraceServiceRequest.FromString(payload))
        lines = []
        for rs in d.get("resourceSpans", ()):
            res = rs.get("resource", {})
            for ss in rs.get("scopeSpans", ()):
                for s in ss.get("spans", ()):
                    lines.append(json.dumps({**s, "resource": res, "scope": ss.get("scope", {})}, indent=4))
        with self._lock:
            print("\n".join(lines), flush=True)

    def shutdown(self, timeout: float = 10.0) -> None:
        pass


def _protocol() -> str:
    return (os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or os.environ.get(sc.OTEL_EXPORTER_OTLP_PROTOCOL)
            or "grpc").strip().lower()


def _env2(traces: str, general: str, default: str = "") -> str:
    return os.environ.get(traces) or os.environ.get(general) or default


def _headers() -> dict:
    raw = _env2(sc.OTEL_EXPORTER_OTLP_TRACES_HEADERS, sc.OTEL_EXPORTER_OTLP_HEADERS)
    out = {}
    for part in raw.split(","):
        k, sep, v = part.partition("=")
        if sep and k.strip():
            out[unquote(k.strip()).lower()] = unquote(v.strip())
    return out


def _timeout() -> float:
    try:
        return float(_env2(sc.OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, sc.OTEL_EXPORTER_OTLP_TIMEOUT, "10"))
    except ValueError:
        return 10.0


def _settings(name: str, telemetry):
    from prism_otel.collector.component import ComponentID, Settings

    return Settings(id=ComponentID(name), telemetry=telemetry)


def _queue_retry(batch: BatchSettings):
    from prism_otel.collector.decode import Duration
    from prism_otel.collector.exporters.base import RetryConfig, SendingQueueConfig

    # Like the SDK, up to max_queue spans wait, one request in flight. Counted in spans, not requests:
    # batches shipped on the timer are small, and a queue of ceil(max_queue / batch) requests (one, at
    # the default 2048/2048) dropped whole ones while another was in flight.
    queue = SendingQueueConfig(num_consumers=1, queue_size=max(1, batch.max_queue_spans), sizer="items")
    t = _timeout()
    retry = RetryConfig(initial_interval=Duration(min(1.0, t)), max_interval=Duration(max(1.0, t)),
                        max_elapsed_time=Duration(max(1.0, t)))
    return queue, retry


def _otlp_grpc(telemetry, batch: BatchSettings):
    from prism_otel.collector.decode import Duration
    from prism_otel.collector.exporters.otlp_grpc import OTLPGRPCExporter, OTLPGRPCExporterConfig
    from prism_otel.collector.tls import TLSClientConfig

    endpoint = _env2(sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, sc.OTEL_EXPORTER_OTLP_ENDPOINT, "http://localhost:4317")
    insecure_env = _env2(sc.OTEL_EXPORTER_OTLP_TRACES_INSECURE, sc.OTEL_EXPORTER_OTLP_INSECURE).strip().lower()
    scheme = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
    insecure = scheme == "http" or (scheme != "https" and insecure_env == "true")
    tls = TLSClientConfig(insecure=insecure, ca_file=_env2("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                                                            sc.OTEL_EXPORTER_OTLP_CERTIFICATE),
                          cert_file=os.environ.get(sc.OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE, ""),
                          key_file=os.environ.get(sc.OTEL_EXPORTER_OTLP_CLIENT_KEY, ""))
    target = endpoint.split("://", 1)[-1].rstrip("/")
    if ":" not in target.rsplit("]", 1)[-1]:
        target += ":4317"
    queue, retry = _queue_retry(batch)
    comp = _env2(sc.OTEL_EXPORTER_OTLP_TRACES_COMPRESSION, sc.OTEL_EXPORTER_OTLP_COMPRESSION).strip().lower()
    cfg = OTLPGRPCExporterConfig(endpoint=(f"{scheme}://" if scheme else "") + target, tls=tls, headers=_headers(),
                                 compression="gzip" if comp == "gzip" else "none", timeout=Duration(_timeout()),
                                 sending_queue=queue, retry_on_failure=retry)
    cfg.validate()
    return QueuedBytes(OTLPGRPCExporter(_settings("otlp_grpc", telemetry), cfg), "otlp_grpc")


def _otlp_http(telemetry, batch: BatchSettings):
    from prism_otel.collector.decode import Duration
    from prism_otel.collector.exporters.otlp_http import OTLPHTTPExporter, OTLPHTTPExporterConfig
    from prism_otel.collector.tls import TLSClientConfig

    full = os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    base = os.environ.get(sc.OTEL_EXPORTER_OTLP_ENDPOINT, "http://localhost:4318")
    queue, retry = _queue_retry(batch)
    comp = _env2(sc.OTEL_EXPORTER_OTLP_TRACES_COMPRESSION, sc.OTEL_EXPORTER_OTLP_COMPRESSION).strip().lower()
    tls = TLSClientConfig(ca_file=_env2("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", sc.OTEL_EXPORTER_OTLP_CERTIFICATE),
                          cert_file=os.environ.get(sc.OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE, ""),
                          key_file=os.environ.get(sc.OTEL_EXPORTER_OTLP_CLIENT_KEY, ""))
    cfg = OTLPHTTPExporterConfig(endpoint=base, traces_endpoint=full or "", tls=tls, headers=_headers(),
                                 compression="gzip" if comp == "gzip" else "none", timeout=Duration(_timeout()),
                                 sending_queue=queue, retry_on_failure=retry)
    cfg.validate()
    return QueuedBytes(OTLPHTTPExporter(_settings("otlp_http", telemetry), cfg), "otlp_http")


def file_exporter(path: str, telemetry, max_bytes: int = 0, keep: int = 4):
    """OTLP/JSON lines, one request per line (the embedded default's format); rotated past ``max_bytes``
    (0: never) with at most ``keep`` files kept."""
    from prism_otel.collector.decode import Duration
    from prism_otel.collector.exporters.file import FileExporterConfig

    cfg = FileExporterConfig(path=path, format="json", append=True, flush_interval=Duration(0.0))
    return QueuedBytes(_rotating_file_class()(_settings("file", telemetry), cfg, max_bytes, keep), "file")


_ROTATING = None


def _rotating_file_class():
    """The collector's ``file`` exporter, bounded on disk: when the file would pass ``max_bytes`` it is
    rotated (``traces-<pid>.jsonl`` becomes ``traces-<pid>.1.jsonl``, ``.1`` becomes ``.2``, ...) and at
    most ``keep`` files are kept, the oldest removed: ``max_bytes * keep`` at most (``PRISM_OTEL_OUT_MAX_MB``,
    64 MB, and ``PRISM_OTEL_OUT_FILES``, 4, for the embedded default; a busy engine writes a few hundred
    KB a second). Every line stays a whole export request."""
    global _ROTATING
    if _ROTATING is not None:
        return _ROTATING
    from prism_otel.collector.exporters.file import FileExporter
    from prism_otel.otlp_json import request_to_json

    class RotatingFileExporter(FileExporter):
        def __init__(self, settings, cfg, max_bytes: int = 0, keep: int = 4) -> None:
            super().__init__(settings, cfg)
            self.max_bytes = max(0, int(max_bytes))
            self.keep = max(1, int(keep))
            self.rotations = 0
            self._size = 0

        def start(self, host) -> None:
            super().start(host)
            fh = self._fh  # opened by start()
            self._size = fh.tell() if fh is not None else 0

        def _rotated(self, n: int) -> str:
            stem, ext = os.path.splitext(self.cfg.path)
            return f"{stem}.{n}{ext}"

        def _rotate(self, fh: IO[Any]) -> IO[Any]:
            fh.close()
            path = self.cfg.path
            if self.keep == 1:
                os.remove(path)
            else:
                oldest = self._rotated(self.keep - 1)
                if os.path.exists(oldest):
                    os.remove(oldest)
                for n in range(self.keep - 2, 0, -1):
                    if os.path.exists(self._rotated(n)):
                        os.replace(self._rotated(n), self._rotated(n + 1))
                os.replace(path, self._rotated(1))
            self._fh = fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._size = 0
            self.rotations += 1
            return fh

        def send(self, item) -> None:
            if not self.max_bytes or self.cfg.format != "json":
                return super().send(item)
            line = request_to_json(item.request) + "\n"
            n = len(line.encode("utf-8")) if not line.isascii() else len(line)
            with self._lock:
                fh = self._fh
                if fh is None:  # before start() or after close(): a failed send, as FileExporter's
                    raise RuntimeError(f"file exporter {self.cfg.path!r} is not open")
                if self._size and self._size + n > self.max_bytes:
                    fh = self._rotate(fh)
                fh.write(line)
                fh.flush()
                self._size += n

    _ROTATING = RotatingFileExporter
    return _ROTATING


class OTLPJSONFileExporter(QueuedBytes):
    """The embedded default: OTLP/JSON lines in ``directory`` (``filename``: ``traces-<pid>.jsonl``),
    rotated past ``max_bytes`` with ``keep`` files kept (see :func:`_rotating_file_class`)."""

    def __init__(self, directory: str, filename: Optional[str] = None, max_bytes: int = 0, keep: int = 4,
                 telemetry=None) -> None:
        from prism_otel.collector.decode import Duration
        from prism_otel.collector.exporters.file import FileExporterConfig
        from prism_otel.collector.telemetry import Telemetry

        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, filename or f"traces-{os.getpid()}.jsonl")
        cfg = FileExporterConfig(path=self.path, format="json", append=True, flush_interval=Duration(0.0))
        tel = telemetry if telemetry is not None else Telemetry()
        super().__init__(_rotating_file_class()(_settings("file", tel), cfg, max_bytes, keep), "file")

    @property
    def rotations(self) -> int:
        return self.inner.rotations


def _env_mb(name: str, default: float) -> int:
    try:
        return int(float(os.environ.get(name, default)) * 1024 * 1024)
    except ValueError:
        logger.warning("prism-otel: %s is not a number; using %g", name, default)
        return int(default * 1024 * 1024)


def _env_n(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        logger.warning("prism-otel: %s is not an integer; using %d", name, default)
        return default


def _named(name: str, telemetry, batch: BatchSettings):
    """(a bytes exporter or None, an SDK SpanExporter or None)."""
    if name == "none":
        return None, None
    if name == "otlp":
        name = "otlp_proto_http" if _protocol().startswith("http") else "otlp_proto_grpc"
    if name == "otlp_proto_grpc":
        return _otlp_grpc(telemetry, batch), None
    if name == "otlp_proto_http":
        return _otlp_http(telemetry, batch), None
    if name == "console":
        return ConsoleBytes(), None
    for ep in entry_points(group="opentelemetry_traces_exporter"):
        if ep.name == name:
            return None, ep.load()()
    raise ValueError(f"{sc.OTEL_TRACES_EXPORTER}: unknown exporter {name!r}")


def exporters_from_env(pid: Optional[int] = None, telemetry=None) -> tuple[list, list, bool]:
    """(bytes exporters, SDK span exporters, whether this is the embedded default) from the environment.
    ``pid`` names the embedded default's file (the engine's)."""
    from prism_otel.collector.telemetry import Telemetry

    telemetry = telemetry if telemetry is not None else Telemetry()
    batch = BatchSettings.from_env()
    names = os.environ.get(sc.OTEL_TRACES_EXPORTER, "").strip()
    if not names and (os.environ.get(sc.OTEL_EXPORTER_OTLP_ENDPOINT)
                      or os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)):
        names = "otlp"
    if not names:
        return [OTLPJSONFileExporter(config.out_dir(), f"traces-{pid or os.getpid()}.jsonl",
                                     _env_mb(sc.ENV_OUT_MAX_MB, 64.0), _env_n(sc.ENV_OUT_FILES, 4), telemetry)], [], True
    byte_exps: list = []
    sdk_exps: list = []
    for n in names.split(","):
        n = n.strip().lower()
        if not n:
            continue
        try:
            b, s = _named(n, telemetry, batch)
        except Exception as exc:  # noqa: BLE001 - a bad name is reported, the others still work
            logger.error("prism-otel: cannot create exporter %r: %s", n, exc)
            continue
        if b is not None:
            byte_exps.append(b)
        if s is not None:
            sdk_exps.append(s)
    return byte_exps, sdk_exps, False
