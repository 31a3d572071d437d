"""Exporter choice from the standard ``OTEL_*`` variables, and the embedded default.

* ``OTEL_TRACES_EXPORTER`` (comma list) names exporters as the SDK does: ``otlp`` (protocol from
  ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` (default),
  ``http/protobuf``), ``otlp_proto_grpc``, ``otlp_proto_http``, ``console``, ``none``, or any
  ``opentelemetry_traces_exporter`` entry point.
* ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`` alone implies ``otlp``.
* With none of these set, the embedded default writes OTLP JSON lines under ``./prism-out/``
  (``PRISM_OTEL_OUT_DIR``), rotated at ``PRISM_OTEL_OUT_MAX_MB`` (64) with ``PRISM_OTEL_OUT_FILES`` (4)
  files kept, and a per-stage summary is printed at exit.
"""

from __future__ import annotations

import logging
import os
import threading
from importlib.metadata import entry_points
from typing import List, Optional, Sequence, Tuple

from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from prism_otel import semconv as sc

logger = logging.getLogger(__name__)


class OTLPJSONFileExporter(SpanExporter):
    """Writes each export batch as one OTLP/JSON ``ExportTraceServiceRequest`` line (hex ids).

    Bounded on disk: when the file passes ``max_bytes`` it is rotated (``traces-<pid>.jsonl`` becomes
    ``traces-<pid>.1.jsonl``, ``.1`` becomes ``.2``, ...) and at most ``keep`` files are kept, the oldest
    removed: ``max_bytes * keep`` at most (``PRISM_OTEL_OUT_MAX_MB``, 64 MB, and ``PRISM_OTEL_OUT_FILES``,
    4, for the embedded default; a busy engine writes a few hundred KB a second).
    """

    def __init__(self, directory: str, filename: Optional[str] = None, max_bytes: int = 0, keep: int = 4) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, filename or f"traces-{os.getpid()}.jsonl")
        self.max_bytes = max(0, int(max_bytes))
        self.keep = max(1, int(keep))
        self.rotations = 0
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown
        self._size = self._fh.tell()

    def _rotated(self, n: int) -> str:
        stem, ext = os.path.splitext(self.path)
        return f"{stem}.{n}{ext}"

    def _rotate(self) -> None:
        self._fh.close()
        oldest = self._rotated(self.keep - 1)
        if self.keep == 1:
            os.remove(self.path)
        else:
            if os.path.exists(oldest):
                os.remove(oldest)
            for n in range(self.keep - 2, 0, -1):
                if os.path.exists(self._rotated(n)):
                    os.replace(self._rotated(n), self._rotated(n + 1))
            os.replace(self.path, self._rotated(1))
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._size = 0
        self.rotations += 1

    def export(self, spans: Sequence) -> SpanExportResult:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        from prism_otel.otlp_json import request_to_json

        try:
            line = request_to_json(encode_spans(spans))
            with self._lock:
                if self._fh.closed:
                    return SpanExportResult.FAILURE
                if self.max_bytes and self._size and self._size + len(line) + 1 > self.max_bytes:
                    self._rotate()
                self._fh.write(line + "\n")
                self._fh.flush()
                self._size += len(line) + 1
            return SpanExportResult.SUCCESS
        except Exception:  # noqa: BLE001 - an exporter reports failure, it does not raise
            logger.warning("prism-otel: writing %s failed", self.path, exc_info=True)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _protocol() -> str:
    return (os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or os.environ.get(sc.OTEL_EXPORTER_OTLP_PROTOCOL)
            or "grpc").strip().lower()


def _named_exporter(name: str) -> Optional[SpanExporter]:
    if name == "none":
        return None
    if name == "otlp":
        name = "otlp_proto_http" if _protocol().startswith("http") else "otlp_proto_grpc"
    if name == "otlp_proto_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "otlp_proto_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

        return HTTPExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    for ep in entry_points(group="opentelemetry_traces_exporter"):
        if ep.name == name:
            return ep.load()()
    raise ValueError(f"{sc.OTEL_TRACES_EXPORTER}: unknown exporter {name!r}")


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


def exporters_from_env(pid: Optional[int] = None) -> Tuple[List[SpanExporter], bool]:
    """The exporters the environment asks for, and whether that is the embedded default.
    ``pid`` names the embedded default's file (the engine's, when a companion writes it)."""
    names = os.environ.get(sc.OTEL_TRACES_EXPORTER, "").strip()
    if not names and (os.environ.get(sc.OTEL_EXPORTER_OTLP_ENDPOINT)
                      or os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)):
        names = "otlp"
    if not names:
        out = os.environ.get(sc.ENV_OUT_DIR) or os.path.join(os.getcwd(), "prism-out")
        return [OTLPJSONFileExporter(out, f"traces-{pid or os.getpid()}.jsonl", _env_mb(sc.ENV_OUT_MAX_MB, 64.0),
                                     _env_n(sc.ENV_OUT_FILES, 4))], True
    exporters = []
    for n in names.split(","):
        n = n.strip().lower()
        if not n:
            continue
        try:
            e = _named_exporter(n)
        except Exception as exc:  # noqa: BLE001 - a bad name is reported, the others still work
            logger.error("prism-otel: cannot create exporter %r: %s", n, exc)
            continue
        if e is not None:
            exporters.append(e)
    return exporters, False


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, plus a count of the spans it drops when its queue is full.

    The SDK drops the oldest queued span silently (one log line); prism-otel counts every such drop
    in ``prism.dropped{reason="export_queue_full"}``. The queue is read through a private attribute;
    if a future SDK moves it, counting stops and exporting goes on unchanged.
    """

    def __init__(self, exporter: SpanExporter, on_drop) -> None:
        try:
            super().__init__(exporter)
        except ValueError as exc:  # inconsistent OTEL_BSP_* settings: say so, keep exporting
            logger.error("prism-otel: OTEL_BSP_* settings rejected (%s); using the SDK defaults", exc)
            super().__init__(exporter, max_queue_size=2048, schedule_delay_millis=5000, max_export_batch_size=512)
        self._on_drop = on_drop
        inner = getattr(self, "_batch_processor", None)
        self._queue = getattr(inner, "_queue", None)

    def on_end(self, span) -> None:
        q = self._queue
        if q is not None and q.maxlen is not None and len(q) >= q.maxlen:
            try:
                self._on_drop()
            except Exception:  # noqa: BLE001
                pass
        super().on_end(span)
