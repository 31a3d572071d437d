"""The running collector: builds components from a checked config, starts and stops them in order.

Start order is the Collector's: extensions, exporters, pipelines (processors), then receivers, so
every consumer is ready before anything can send to it; a failure part-way (a port in use) stops
what was started and raises a :class:`~prism_otel.collector.errors.ConfigError` naming the YAML
path. Shutdown runs the other way: receivers stop taking data, pipelines drain (or leave it in their
log), exporters deliver what they hold within the timeout, extensions close.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Optional

from prism_otel.collector import registry
from prism_otel.collector.component import Component, Host, Settings
from prism_otel.collector.config import CollectorConfig
from prism_otel.collector.errors import ConfigError
from prism_otel.collector.exporters.base import QueuedExporter
from prism_otel.collector.memory import Budget
from prism_otel.collector.pipeline import Pipeline
from prism_otel.collector.prism_processors import instances_for
from prism_otel.collector.telemetry import Telemetry
from processors.assembler import StepAssembler

logger = logging.getLogger(__name__)


class _FanOut:
    """A receiver's consumer: every pipeline that lists the receiver, in config order."""

    def __init__(self, pipelines: list[Pipeline]) -> None:
        self.pipelines = pipelines

    def admit(self, wire_bytes: int = 0) -> None:
        for p in self.pipelines:
            p.admit(wire_bytes)

    def __call__(self, req, raw, n_spans) -> None:
        if len(self.pipelines) == 1:
            self.pipelines[0].consume(req, raw, n_spans)
            return
        for i, p in enumerate(self.pipelines):
            # Pipelines may mutate (tag) what they get; each but the last gets its own copy.
            if i < len(self.pipelines) - 1:
                copy = type(req)()
                copy.CopyFrom(req)
                p.consume(copy, raw, n_spans)
            else:
                p.consume(req, raw, n_spans)


class Service:
    def __init__(self, config: CollectorConfig, telemetry: Optional[Telemetry] = None) -> None:
        self.config = config
        self.telemetry = telemetry or Telemetry()
        self.host = Host()
        self.extensions: dict[str, Component] = {}
        self.exporters: dict[str, QueuedExporter] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.receivers: dict[str, Component] = {}
        pipes = config.pipelines.values()
        self.budget = Budget(config.memory, n_pipelines=len(config.pipelines),
                             n_exporters=len({e for p in pipes for e in p.exporters}),
                             n_assemblers=sum(1 for p in pipes if p.processors) or 1)
        self._started = False
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def _settings(self, comp, pipeline: Optional[str] = None) -> Settings:
        return Settings(comp.id, self.telemetry, pipeline, self.budget)

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        c = self.config
        for eid in c.enabled_extensions:
            comp = c.extensions[eid]
            ext = comp.factory.create(self._settings(comp), comp.config)
            self._start_one(ext, f"extensions::{eid}")
            self.extensions[eid] = ext
            self.host.extensions[eid] = ext
        used_exporters = {e for p in c.pipelines.values() for e in p.exporters}
        for xid in used_exporters:
            comp = c.exporters[xid]
            self.exporters[xid] = comp.factory.create(self._settings(comp), comp.config)
            self._start_one(self.exporters[xid], f"exporters::{xid}")
        for pid, p in c.pipelines.items():
            self.pipelines[pid] = self._build_pipeline(pid, p)
            self.pipelines[pid].start()
        used_receivers = [r for r in c.receivers if any(r in p.receivers for p in c.pipelines.values())]
        for rid in used_receivers:
            comp = c.receivers[rid]
            consumer = _FanOut([self.pipelines[pid] for pid, p in c.pipelines.items() if rid in p.receivers])
            recv = comp.factory.create(self._settings(comp), comp.config, consumer)
            self.receivers[rid] = recv
            self._start_one(recv, f"receivers::{rid}")
        logger.info("prism collector started: %d pipeline(s), receivers %s, exporters %s", len(self.pipelines),
                    ", ".join(self.receivers), ", ".join(self.exporters))

    def _start_one(self, comp, path: str) -> None:
        try:
            comp.start(self.host)
        except ConfigError:
            raise
        except OSError as exc:
            raise ConfigError(path, f"cannot start: {exc}") from None

    def _build_pipeline(self, pid: str, p) -> Pipeline:
        c = self.config
        procs = [c.processors[x] for x in p.processors]
        step_procs = [comp.factory.create(self._settings(comp, pid), comp.config) for comp in procs]
        a = registry.assembly_for(procs)
        count = lambda name, n=1, **lab: self.telemetry.add(name, n, pipeline=pid, **lab)  # noqa: E731
        assembler = StepAssembler(step_procs, wait_s=a.wait, max_pending_steps=a.max_pending_steps,
                                  max_pending_children=a.max_pending_children, max_pending_bytes=self.budget.held_bytes,
                                  count=count, instances=instances_for(step_procs, self.budget, count))
        exporters: list[tuple[QueuedExporter, bool]] = []
        storage, queue_sizes = None, []
        for xid in p.exporters:
            q = getattr(c.exporters[xid].config, "sending_queue", None)
            persistent = False
            if q is not None and q.storage:
                persistent = True
                storage = self.host.extension(q.storage)
                queue_sizes.append(q.queue_size)
            exporters.append((self.exporters[xid], persistent))
        storage_dir = storage.path_for("pipeline_" + pid) if storage is not None else None
        return Pipeline(pid, assembler, exporters, self.telemetry, storage_dir=storage_dir,
                        fsync=bool(storage and storage.fsync), max_records=min(queue_sizes) if queue_sizes else 1000,
                        intake_bytes=self.budget.intake_bytes)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Idempotent; safe before or after a failed start."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        for rid, r in self.receivers.items():
            self._quietly(r.shutdown, f"receiver {rid}")
        for p in self.pipelines.values():
            self._quietly(lambda p=p: p.stop(timeout), f"pipeline {p.name}")
        persistent = {x.id for p in self.pipelines.values() for x, ids in p.targets if ids is not None}
        for xid, x in self.exporters.items():
            self._quietly(lambda x=x, xid=xid: x.shutdown(timeout, drain=xid not in persistent), f"exporter {xid}")
        for p in self.pipelines.values():
            self._quietly(p.close, f"pipeline {p.name}")
        for eid, e in self.extensions.items():
            self._quietly(e.shutdown, f"extension {eid}")
        logger.info("prism collector stopped; counters: %s", json.dumps(self.telemetry.snapshot(), sort_keys=True))

    @staticmethod
    def _quietly(fn, what: str) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - shutdown carries on with the rest
            logger.warning("shutting down %s failed", what, exc_info=True)

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)
