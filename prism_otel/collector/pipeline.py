"""One traces pipeline: intake → step assembly and the prism processors → exporters.

A single thread per pipeline takes requests from the intake (bounded; see
:mod:`prism_otel.collector.intake`), runs them through the pipeline's
:class:`~processors.assembler.StepAssembler`, and fans the (tagged) requests out to its exporters.

Persistent pipelines (an exporter has ``sending_queue.storage``) keep every accepted request in a
log on disk until each persistent exporter has delivered all of its spans (a
:class:`~prism_otel.collector.delivery.Ledger` decides how far the log may be committed); each
persistent exporter filters spans it already delivered (:class:`DeliveredIDs`), so a replay after
a crash, or a client re-sending a request whose answer it lost, does not send a span twice. When a
persistent exporter's queue is full the pipeline waits (the log fills, then receivers push back);
an in-memory exporter's full queue drops and counts, as in the Collector. Replayed records go to
persistent exporters only.

Nothing stops the pipeline thread: a record the log cannot give back intact is counted
(``prism.collector.queue.corrupt_records``) and settled; a request the processors fail on as a whole
(a bug: single bad spans are handled in the assembler) is counted in ``prism.dropped{reason=
pipeline_error}`` and settled. Either way it is never replayed again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional, Union

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from prism_otel import semconv as sc
from prism_otel.collector.delivery import DeliveredIDs, Ledger, request_keys
from prism_otel.collector.exporters.base import OutItem, QueuedExporter
from prism_otel.collector.intake import DiskIntake, MemoryIntake
from prism_otel.collector.wal import WAL
from processors.assembler import StepAssembler

logger = logging.getLogger(__name__)

_TICK_S = 0.05
_CURSOR_EVERY_S = 0.1


def _noop(ok: bool) -> None:
    pass


def _without(req: ExportTraceServiceRequest, drop: list[bool]) -> ExportTraceServiceRequest:
    out = ExportTraceServiceRequest()
    out.CopyFrom(req)
    i = 0
    for rs in out.resource_spans:
        for ss in rs.scope_spans:
            n = len(ss.spans)
            for j in reversed(range(n)):
                if drop[i + j]:
                    del ss.spans[j]
            i += n
    return out


class Pipeline:
    store_class = WAL  # the persistent queue's store (docs/collector.md says why this one, not SQLite)

    def __init__(self, name: str, assembler: StepAssembler, exporters: list[tuple[QueuedExporter, bool]], telemetry,
                 storage_dir: Optional[str] = None, fsync: bool = False, max_records: int = 1000,
                 intake_bytes: int = 256 << 20) -> None:
        self.name = name
        self.assembler = assembler
        self.telemetry = telemetry
        self.wal: Optional[WAL] = None
        self.ledger: Optional[Ledger] = None  # set with the log (persistent pipelines only)
        self.targets: list[tuple[QueuedExporter, Optional[DeliveredIDs]]] = []
        self.intake: Union[DiskIntake, MemoryIntake]
        if storage_dir is not None:
            self.wal = wal = self.store_class(storage_dir, fsync=fsync)
            self.ledger = Ledger(wal.cursor)
            self.intake = DiskIntake(wal, max_records=max_records, on_corrupt=self._corrupt,
                                     max_bytes=intake_bytes)
            if wal.pending:
                logger.info("pipeline %s: %d records to replay from %s", name, self.wal.pending, storage_dir)
        else:
            self.intake = MemoryIntake(max_bytes=intake_bytes)
        for exp, persistent in exporters:
            ids = None
            if persistent and storage_dir is not None:
                ids = DeliveredIDs(os.path.join(storage_dir, f"delivered-{exp.id.replace('/', '_')}.keys"))
            self.targets.append((exp, ids))
        self.n_persistent = sum(1 for _, ids in self.targets if ids is not None)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_cursor = 0.0

    # -- receivers call this ----------------------------------------------------------------------
    def consume(self, req: ExportTraceServiceRequest, raw: bytes, n_spans: int) -> None:
        self.intake.put(req, raw, n_spans)

    def admit(self, wire_bytes: int = 0) -> None:
        self.intake.admit(wire_bytes)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"prism-pipeline-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests, process what the intake holds (memory) or leave it in the log
        (persistent), release held steps, and hand everything to the exporters."""
        self.intake.close()
        self._stop.set()
        finished = True
        if self._thread is not None:
            self._thread.join(timeout)
            finished = not self._thread.is_alive()
            self._thread = None
        if isinstance(self.intake, MemoryIntake):  # no log: nothing else holds what is left: lost, and counted
            # (held steps only once the thread is done: until then it may still flush them)
            left = self.intake.drain_spans() + (self.assembler.held if finished else 0)
            if left:
                self.telemetry.add(sc.METRIC_DROPPED, left, pipeline=self.name, reason="shutdown")
                logger.warning("pipeline %s: %d spans not processed by the shutdown deadline are lost (counted)",
                               self.name, left)

    def close(self) -> None:
        """After the exporters have stopped: persist the log cursor and close files."""
        if self.wal is not None:
            self._commit(force=True)
            self.wal.close()
        for _, ids in self.targets:
            if ids is not None:
                ids.close()
        self.assembler.shutdown()

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if stopping and (self.wal is not None or not len(self.intake)):
                break
            try:
                item = self.intake.get(_TICK_S)
            except Exception:  # noqa: BLE001 - the intake settles bad records itself; this is a bug
                logger.exception("pipeline %s: reading the intake failed", self.name)
                item = None
            if item is not None:
                self._process(item)
            try:
                self._dispatch(self.assembler.expire())
            except Exception:  # noqa: BLE001 - never let one request stop the pipeline
                logger.exception("pipeline %s: releasing held steps failed", self.name)
            self._commit()
        self._dispatch(self.assembler.flush())
        self._commit(force=True)

    def _process(self, item) -> None:
        seq, req, n, replay = item
        if replay:
            self.telemetry.add(sc.COLLECTOR_REPLAYED_RECORDS, pipeline=self.name)
        if self.ledger is not None:
            self.ledger.open(seq, n * self.n_persistent)
        if req is None:  # a record the log could not give back: counted by the intake, settled here
            return
        try:
            outs = self.assembler.process(req, seq)
        except Exception:  # noqa: BLE001 - settle the request: counted, never replayed forever
            logger.exception("pipeline %s: the processors failed on a request; its %d spans are dropped", self.name, n)
            self.telemetry.add(sc.METRIC_DROPPED, n, pipeline=self.name, reason="pipeline_error")
            if self.ledger is not None:
                self.ledger.pay({seq: n}, self.n_persistent)
            return
        self._dispatch(outs)

    def _corrupt(self, seq: int, why: str) -> None:
        self.telemetry.add(sc.COLLECTOR_CORRUPT_RECORDS, pipeline=self.name)

    def _commit(self, force: bool = False) -> None:
        if self.wal is None or self.ledger is None:  # (both set, or neither)
            return
        now = time.monotonic()
        if force or now - self._last_cursor >= _CURSOR_EVERY_S:
            self._last_cursor = now
            self.wal.commit(self.ledger.committable())
            self.wal.flush_cursor()

    def _is_replay(self, sources) -> bool:
        wal = self.wal
        return wal is not None and all(s is not None and s < wal.recovered_end for s in sources)

    def _dispatch(self, outs) -> None:
        for req, sources in outs:
            n = sum(sources.values())
            try:
                payload = req.SerializeToString()
                keys: list[bytes] = request_keys(req) if self.n_persistent else []  # for persistent targets only
            except Exception:  # noqa: BLE001 - settle it: counted, never replayed forever
                logger.exception("pipeline %s: cannot encode an outgoing request; %d spans dropped", self.name, n)
                self.telemetry.add(sc.METRIC_DROPPED, n, pipeline=self.name, reason="pipeline_error")
                if self.ledger is not None:
                    self.ledger.pay(sources, self.n_persistent)
                continue
            replay = self._is_replay(sources)
            for exp, ids in self.targets:
                if ids is None:
                    if not replay:
                        exp.enqueue(OutItem(req, payload, n, sources), _noop)
                else:
                    self._enqueue_persistent(exp, ids, req, payload, n, sources, keys)

    def _enqueue_persistent(self, exp: QueuedExporter, ids: DeliveredIDs, req, payload, n, sources,
                            keys: list[bytes]) -> None:
        dups = ids.reserve(keys)
        ledger = self.ledger
        assert ledger is not None, "a persistent target exists only with the log, and so the ledger"
        if any(dups):
            n_dup = sum(dups)
            self.telemetry.add(sc.COLLECTOR_DUPLICATE_SPANS, n_dup, exporter=exp.id)
            if n_dup == len(keys):
                ledger.pay(sources)
                return
            req = _without(req, dups)
            payload = req.SerializeToString()
            keys = [k for k, d in zip(keys, dups) if not d]
            n = len(keys)
        item = OutItem(req, payload, n, sources, keys)

        def done(ok: bool) -> None:
            if ok:
                ids.delivered(keys)  # item.keys
            else:
                ids.release(keys)
            ledger.pay(sources)

        exp.enqueue(item, done, block=True)
