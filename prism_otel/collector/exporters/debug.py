"""``debug`` exporter: writes what passes to the log, as the Collector's does.

``verbosity``: ``basic`` (one line per request: span and anomaly counts), ``normal`` (one line per
span: name, ids, duration, prism verdict), ``detailed`` (the request as OTLP/JSON). After the first
``sampling_initial`` requests each second, only every ``sampling_thereafter``-th is written.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

from prism_otel import semconv as sc
from prism_otel.collector.component import EXPORTER, Factory
from prism_otel.collector.decode import check
from prism_otel.collector.exporters.base import OutItem, QueuedExporter, SendingQueueConfig
from prism_otel.otlp_json import request_to_json
from processors.assembly import any_value

logger = logging.getLogger("prism_otel.collector.debug")


@dataclass
class DebugExporterConfig:
    verbosity: Literal["basic", "normal", "detailed"] = "basic"
    sampling_initial: int = 2
    sampling_thereafter: int = 1
    use_internal_logger: bool = True

    def validate(self) -> None:
        check(self.sampling_initial >= 0, "sampling_initial", "must not be negative")
        check(self.sampling_thereafter >= 1, "sampling_thereafter", "must be at least 1")


class DebugExporter(QueuedExporter):
    def __init__(self, settings, cfg: DebugExporterConfig) -> None:
        super().__init__(settings)
        self.cfg = cfg
        self.queue = SendingQueueConfig(enabled=False)
        self._lock = threading.Lock()
        self._second = 0
        self._n = 0

    def _sampled(self) -> bool:
        with self._lock:
            now = int(time.monotonic())
            if now != self._second:
                self._second, self._n = now, 0
            self._n += 1
            n = self._n
        return n <= self.cfg.sampling_initial or (n - self.cfg.sampling_initial) % self.cfg.sampling_thereafter == 0

    def _emit(self, text: str) -> None:
        if self.cfg.use_internal_logger:
            logger.info("%s", text)
        else:
            print(text, flush=True)

    def send(self, item: OutItem) -> None:
        if not self._sampled():
            return
        req = item.request
        if self.cfg.verbosity == "detailed":
            self._emit(request_to_json(req))
            return
        spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
        anomalies = sum(1 for s in spans for kv in s.attributes if kv.key == sc.ANOMALY and kv.value.bool_value)
        self._emit(f"Traces {self.id}: resource spans {len(req.resource_spans)}, spans {len(spans)}, "
                   f"anomalous steps {anomalies}")
        if self.cfg.verbosity == "normal":
            for s in spans:
                flags = " ".join(f"{kv.key}={any_value(kv.value)}" for kv in s.attributes
                                 if kv.key.startswith((sc.ANOMALY, sc.FLEET_SLOW)))
                self._emit(f"  {s.name} trace={s.trace_id.hex()} span={s.span_id.hex()} "
                           f"{(s.end_time_unix_nano - s.start_time_unix_nano) / 1e6:.3f}ms {flags}".rstrip())


def factory() -> Factory:
    return Factory("debug", EXPORTER, DebugExporterConfig, DebugExporter)
