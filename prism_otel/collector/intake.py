"""Bounded hand-off from receivers (many threads) to a pipeline (one thread).

* :class:`MemoryIntake`: a queue bounded in requests and bytes (the decoded size: see
  :mod:`prism_otel.collector.memory`). Full means
  :class:`~prism_otel.collector.errors.Refused` (the receiver answers RESOURCE_EXHAUSTED / 429 with
  a retry delay); nothing is queued beyond the bound.
* :class:`DiskIntake`: every accepted request is appended to the pipeline's log
  (:mod:`prism_otel.collector.wal`) *before* the sender is answered, so what was acknowledged
  survives a crash. Bounded by records not yet delivered (``queue_size``). The pipeline normally
  gets the already-decoded request handed over in memory; when it lags, it reads the log.
  Records found on disk at start are handed out first, marked ``replay``. A record that cannot be
  read back (:class:`~prism_otel.collector.errors.CorruptRecord`, or bytes that do not decode) is
  handed out as ``(seq, None, 0, replay)``: counted, then settled by the pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Optional

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from prism_otel.collector.errors import CorruptRecord, Refused
from prism_otel.collector.memory import decoded_bytes

logger = logging.getLogger(__name__)

# (seq, request, spans, replay); request None: a log record that did not come back intact (counted, settled)
Item = tuple[Optional[int], Optional[ExportTraceServiceRequest], int, bool]


class MemoryIntake:
    def __init__(self, max_requests: int = 256, max_bytes: int = 256 << 20, retry_after: float = 1.0) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.retry_after = retry_after
        self._q: deque = deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self._closed = False

    def admit(self, wire_bytes: int = 0) -> None:
        """Cheap check before a request is even decoded: raises Refused when it could not be queued."""
        if self._closed:
            raise Refused("shutting down", self.retry_after, overloaded=False)
        if self._q and (len(self._q) >= self.max_requests
                        or self._bytes + max(1, decoded_bytes(wire_bytes)) > self.max_bytes):
            raise Refused("intake queue full", self.retry_after)

    def put(self, req: ExportTraceServiceRequest, raw: bytes, n_spans: int) -> None:
        with self._cv:
            if self._closed:
                raise Refused("shutting down", self.retry_after, overloaded=False)
            size = decoded_bytes(len(raw))
            if self._q and (len(self._q) >= self.max_requests or self._bytes + size > self.max_bytes):
                raise Refused("intake queue full", self.retry_after)
            self._q.append((req, size, n_spans))
            self._bytes += size
            self._cv.notify()

    def get(self, timeout: float) -> Optional[Item]:
        with self._cv:
            if not self._q:
                self._cv.wait(timeout)
                if not self._q:
                    return None
            req, size, n = self._q.popleft()
            self._bytes -= size
            return (None, req, n, False)

    def __len__(self) -> int:
        return len(self._q)

    def drain_spans(self) -> int:
        """Empty the queue (after close); returns how many spans it held."""
        with self._cv:
            n = sum(item[2] for item in self._q)
            self._q.clear()
            self._bytes = 0
            return n

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class DiskIntake:
    def __init__(self, wal, max_records: int = 1000, retry_after: float = 1.0, handoff: int = 64,
                 on_corrupt: Callable[[int, str], None] = lambda seq, why: None, max_bytes: int = 256 << 20) -> None:
        self.wal = wal
        self.on_corrupt = on_corrupt
        self.max_records = max_records
        self.retry_after = retry_after
        self._handoff: deque = deque()  # (seq, request, spans, bytes): decoded requests kept for the pipeline
        self._handoff_max = handoff
        self._handoff_bytes = 0
        self.max_bytes = max_bytes
        self._next = wal.cursor  # next seq the pipeline gets
        self._cv = threading.Condition()
        self._closed = False

    def admit(self, wire_bytes: int = 0) -> None:
        if self._closed:
            raise Refused("shutting down", self.retry_after, overloaded=False)
        if self.wal.pending >= self.max_records:
            raise Refused("persistent queue full", self.retry_after)

    def put(self, req: ExportTraceServiceRequest, raw: bytes, n_spans: int) -> None:
        with self._cv:
            if self._closed:
                raise Refused("shutting down", self.retry_after, overloaded=False)
            if self.wal.pending >= self.max_records:
                raise Refused("persistent queue full", self.retry_after)
            try:
                seq = self.wal.append(raw)
            except OSError as exc:
                raise Refused(f"persistent queue cannot write: {exc.strerror}", self.retry_after,
                              overloaded=False) from exc
            size = decoded_bytes(len(raw))
            while self._handoff and (len(self._handoff) >= self._handoff_max
                                     or self._handoff_bytes + size > self.max_bytes):
                self._handoff_bytes -= self._handoff.popleft()[3]  # read back from the log when its turn comes
            self._handoff.append((seq, req, n_spans, size))
            self._handoff_bytes += size
            self._cv.notify()

    def get(self, timeout: float) -> Optional[Item]:
        with self._cv:
            if self._next >= self.wal.next_seq:
                self._cv.wait(timeout)
                if self._next >= self.wal.next_seq:
                    return None
            seq = self._next
            self._next += 1
            handoff = self._handoff
            while handoff and handoff[0][0] < seq:
                self._handoff_bytes -= handoff.popleft()[3]
            if handoff and handoff[0][0] == seq:
                _, req, n, size = handoff.popleft()
                self._handoff_bytes -= size
                return (seq, req, n, False)
        replay = seq < self.wal.recovered_end
        req = ExportTraceServiceRequest()
        try:
            req.ParseFromString(self.wal.read(seq))
        except (CorruptRecord, DecodeError) as exc:
            why = exc.why if isinstance(exc, CorruptRecord) else f"does not decode ({exc})"
            logger.warning("persistent queue %s: record %d %s; counted and skipped", self.wal.directory, seq, why)
            self.on_corrupt(seq, why)
            return (seq, None, 0, replay)
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        return (seq, req, n, replay)

    def __len__(self) -> int:
        return self.wal.next_seq - self._next

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
