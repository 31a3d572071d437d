"""``file`` exporter: every request as one OTLP/JSON line (hex ids), or length-prefixed protobuf.

Keys as in the Collector's file exporter: ``path``, ``format`` (``json`` | ``proto``: a 4-byte
big-endian length before each message), ``append`` (false: the file is truncated at start) and
``flush_interval``.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Literal, Optional

from prism_otel.collector.component import EXPORTER, Factory
from prism_otel.collector.decode import Duration, check
from prism_otel.collector.exporters.base import OutItem, QueuedExporter, SendingQueueConfig
from prism_otel.otlp_json import request_to_json


@dataclass
class FileExporterConfig:
    path: str = ""
    format: Literal["json", "proto"] = "json"
    append: bool = False
    flush_interval: Duration = Duration(1.0)

    def validate(self) -> None:
        check(bool(self.path), "path", "required: the file to write")
        check(not os.path.isdir(self.path), "path", f"{self.path!r} is a directory")


class FileExporter(QueuedExporter):
    def __init__(self, settings, cfg: FileExporterConfig) -> None:
        super().__init__(settings)
        self.cfg = cfg
        self.queue = SendingQueueConfig(num_consumers=1, queue_size=1000, block_on_overflow=True)
        self._fh: Optional[IO[Any]] = None  # text (json) or binary (proto); open between start() and close()
        self._lock = threading.Lock()
        self._last_flush = 0.0

    def start(self, host) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.cfg.path)), exist_ok=True)
        mode = ("a" if self.cfg.append else "w") + ("b" if self.cfg.format == "proto" else "")
        if "b" in mode:
            self._fh = open(self.cfg.path, mode)  # noqa: SIM115
        else:
            self._fh = open(self.cfg.path, mode, encoding="utf-8")  # noqa: SIM115
        super().start(host)

    def send(self, item: OutItem) -> None:
        with self._lock:
            fh = self._fh
            if fh is None:  # send before start() or after close(): a failed send, as the queue counts it
                raise RuntimeError(f"file exporter {self.cfg.path!r} is not open")
            if self.cfg.format == "json":
                fh.write(request_to_json(item.request) + "\n")
            else:
                fh.write(struct.pack(">I", len(item.payload)) + item.payload)
            now = time.monotonic()
            if now - self._last_flush >= self.cfg.flush_interval:
                fh.flush()
                self._last_flush = now

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def factory() -> Factory:
    return Factory("file", EXPORTER, FileExporterConfig, FileExporter)
