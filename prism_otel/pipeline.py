"""The in-process pipeline thread: raw records → `StepRecord` → processors → spans → exporter.

One daemon thread drains the :class:`~prism_otel.record.Recorder` ring, assembles
:class:`StepRecord` s and :class:`RequestRecord` s, runs the processors, and materialises spans
(:mod:`prism_otel.spans`) that the tracer provider's span processor hands to its exporter. Nothing
here runs on the engine's threads. Every structure is bounded; what has to be dropped is counted
by reason (``prism.dropped``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

from opentelemetry import metrics

from prism_otel import semconv as sc
from prism_otel.record import (GC, REQUEST, SPAN, STAGE, STEP, BatchChange, Pacer, Recorder, RequestRecord,
                               StepRecord, clock_ns, to_epoch_ns)
from prism_otel.signals import GcPauses
from prism_otel.spans import SpanMaterializer
from prism_otel.stats import StageStats

logger = logging.getLogger(__name__)

FINISH_GRACE_NS = 1_000_000_000  # a finish no step covers (an abort while idle) closes its span after this



class _OpenRequest:
    __slots__ = ("span", "arrival_ns", "prompt_tokens", "first_sched", "first_token", "last_token", "n_out",
                 "n_steps", "links", "last_link", "finish_ns", "status")

    def __init__(self, span, arrival_ns: int, prompt_tokens: int) -> None:
        self.span = span
        self.arrival_ns = arrival_ns
        self.prompt_tokens = prompt_tokens
        self.first_sched: Optional[int] = None
        self.first_token: Optional[int] = None
        self.last_token: Optional[int] = None
        self.n_out = 0
        self.n_steps = 0
        self.links: list = []
        self.last_link = None
        self.finish_ns: Optional[int] = None
        self.status = "finished"


class ChangeTracker:
    """The :class:`BatchChange` of each step, from the request ids of the engine's previous step."""

    __slots__ = ("_prev", "_since", "_batch")

    def __init__(self) -> None:
        self._prev: frozenset = frozenset()
        self._since = 0
        self._batch = 0

    def change(self, reqs) -> BatchChange:
        ids = frozenset(r[0] for r in reqs)
        prev = self._prev
        if ids == prev:
            self._since += 1
            joined = left = tokens = 0
        else:
            self._since = 0
            new = ids - prev
            joined = len(new)
            left = len(prev - ids)
            tokens = sum(int(r[1]) for r in reqs if r[0] in new) if new else 0
        out = BatchChange(joined, left, tokens, self._batch, self._since)
        self._prev = ids
        self._batch = len(reqs)
        return out


class Pipeline:
    """Owns the pipeline thread. ``start`` / ``stop`` are idempotent; ``flush`` waits for the ring to empty."""

    def __init__(self, recorder: Recorder, tracer_provider, instance: str,
                 processors: Sequence = (), max_step_links: int = 128, max_request_links: int = 16,
                 max_open_requests: int = 10000, model_name: Optional[str] = None,
                 provider_name: str = "prism", on_step: Optional[Callable[[StepRecord], None]] = None) -> None:
        self.recorder = recorder
        self.instance = instance
        self.processors = list(processors)
        self.materializer = SpanMaterializer(tracer_provider, max_step_links, max_request_links,
                                             model_name, provider_name)
        self.max_open_requests = max_open_requests
        self.on_step = on_step
        self.stats = StageStats()
        self.dropped: Dict[str, int] = {}
        self.processor_errors = 0
        self.cpu_ns = 0  # CPU time the pipeline thread spent processing (it shares the GIL with the engine)
        self.steps_seen = 0
        self.requests_seen = 0
        self.handoff_ns: List[int] = []  # step end -> span ended (handed to the exporter), bounded sample
        self._pending_stages: Dict[object, list] = {}
        self._open: "OrderedDict[str, _OpenRequest]" = OrderedDict()
        self._closed: "OrderedDict[str, None]" = OrderedDict()  # recently closed ids: a late step must not reopen one
        # rid -> finish time (perf ns). A finish can reach the ring before the step that produced the
        # request's last token (transformers finishes requests inside the step's update stage), so a
        # finishing request is closed once a step ending at or after its finish has been handled, or
        # after FINISH_GRACE_NS with no such step (an abort while idle).
        self._finishing: Dict[str, int] = {}
        self._last_step_t1 = 0
        self._step_index = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.pacer = Pacer()
        self._lock = threading.Lock()  # serialises processing between the thread and flush()
        self._ring_dropped_reported = 0
        self._changes = ChangeTracker()
        self.gc_pauses = GcPauses()
        # evidence sources joined to each step (prism_otel.signals): polled once per wake-up
        self.signal_sources: list = [self.gc_pauses]
        meter = metrics.get_meter(sc.SCOPE)
        # step, stage, request and anomaly metrics are recorded by the metrics processor (prism_otel.metrics)
        self._m_dropped = meter.create_counter(sc.METRIC_DROPPED)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prism-otel-pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain what is left, close open request spans, stop the thread."""
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None
        self.process_pending()
        with self._lock:
            self._finalize_finishing(force=True)
            for rid in list(self._open):
                self._close_request(rid, status="shutdown")
        for p in self.processors:
            try:
                p.shutdown()
            except Exception:  # noqa: BLE001 - a processor must not break shutdown
                logger.debug("processor shutdown failed", exc_info=True)

    def after_fork_in_child(self) -> None:
        """The child of a fork inherits no thread: start a fresh one with empty state."""
        self._thread = None
        self._lock = threading.Lock()
        self._open.clear()
        self._pending_stages.clear()
        self._finishing.clear()
        self.start()

    def wake(self) -> None:
        """Process what is on the ring now instead of at the next poll."""
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.recorder) and time.monotonic() < deadline:
            self.process_pending()
        return not len(self.recorder)

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        tt = time.thread_time_ns
        pacer = self.pacer
        while not self._stop.is_set():
            c0 = tt()
            n = self.process_pending()
            self.cpu_ns += tt() - c0
            self._wake.wait(pacer.wait_s(n, time.monotonic()))
            self._wake.clear()

    def process_pending(self) -> int:
        total = 0
        with self._lock:
            while True:
                batch = self.recorder.drain()
                if not batch:
                    break
                total += len(batch)
                for rec in batch:
                    try:
                        self._handle(rec)
                    except Exception:  # noqa: BLE001 - never let one bad record stop the pipeline
                        self._drop("bad_record")
                        logger.debug("failed to process record %r", rec[:3], exc_info=True)
            if not total:
                self._finalize_finishing(now=clock_ns())
            self._poll_sources()
            rd = self.recorder.dropped
            if rd > self._ring_dropped_reported:
                self._drop("ring_full", rd - self._ring_dropped_reported)
                self._ring_dropped_reported = rd
        return total

    def _poll_sources(self) -> None:
        sources = self.signal_sources
        if len(sources) > 1:
            now = to_epoch_ns(clock_ns())
            for src in sources:
                try:
                    src.poll(now)
                except Exception:  # noqa: BLE001 - evidence is optional; the step goes on without it
                    self._drop("signal_error")

    def _signals(self, start: int, end: int) -> dict:
        out: dict = {}
        for src in self.signal_sources:
            try:
                got = src.overlap(start, end)
            except Exception:  # noqa: BLE001
                self._drop("signal_error")
                continue
            if got:
                out.update(got)
        return out

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self._m_dropped.add(n, {sc.DROP_REASON: reason})

    def _handle(self, rec: tuple) -> None:
        kind = rec[0]
        if kind == STEP:
            self._handle_step(rec)
        elif kind == STAGE:
            _, key, name, t0, t1 = rec
            pending = self._pending_stages.setdefault(key, [])
            if len(pending) < 64:
                pending.append((name, t0, t1))
            if len(self._pending_stages) > 1024:  # stages whose step never came
                self._pending_stages.pop(next(iter(self._pending_stages)))
                self._drop("orphan_stage")
        elif kind == REQUEST:
            self._handle_request_event(rec)
        elif kind == SPAN:
            _, name, t0, t1, attrs = rec
            self.materializer.detached_stage(name, to_epoch_ns(t0), to_epoch_ns(t1), attrs)
        elif kind == GC:
            self.gc_pauses.add(to_epoch_ns(rec[1]), to_epoch_ns(rec[2]), rec[3])

    # -- requests -----------------------------------------------------------------------------
    def _handle_request_event(self, rec: tuple) -> None:
        _, rid, event, t, info = rec
        if event == "arrive":
            self._ensure_request(rid, t, info)
        elif event == "finish":
            r = self._open.get(rid)
            if r is not None and r.finish_ns is None:
                r.finish_ns = to_epoch_ns(t)
                if info and info.get("status"):
                    r.status = info["status"]
                self._finishing[rid] = t

    def _ensure_request(self, rid: str, t_perf: int, info: Optional[dict]) -> _OpenRequest:
        r = self._open.get(rid)
        if r is not None:
            return r
        if len(self._open) >= self.max_open_requests:
            old = next(iter(self._open))
            self._close_request(old, status="evicted")
            self._drop("open_requests_full")
        info = info or {}
        arrival = to_epoch_ns(t_perf)
        span = self.materializer.open_request(rid, arrival, info.get("parent"), info.get("prompt_tokens", 0),
                                              info.get("max_tokens"))
        r = _OpenRequest(span, arrival, info.get("prompt_tokens", 0))
        self._open[rid] = r
        self.requests_seen += 1
        return r

    def _close_request(self, rid: str, status: Optional[str] = None) -> None:
        r = self._open.pop(rid, None)
        if r is None:
            return
        self._closed[rid] = None
        if len(self._closed) > 4096:
            self._closed.popitem(last=False)
        end = r.finish_ns or r.last_token or r.arrival_ns
        rec = RequestRecord(instance=self.instance, request_id=rid, arrival_ns=r.arrival_ns, end_ns=end,
                            first_scheduled_ns=r.first_sched, first_token_ns=r.first_token,
                            last_token_ns=r.last_token, prompt_tokens=r.prompt_tokens, output_tokens=r.n_out,
                            steps=r.n_steps, status=status or r.status)
        for p in self.processors:
            try:
                rec = p.process_request(rec)
            except Exception:  # noqa: BLE001
                self.processor_errors += 1
        links = list(r.links)
        if r.last_link is not None:
            links.append(r.last_link)
        self.materializer.close_request(r.span, rec, links, r.n_steps)

    def _finalize_finishing(self, now: Optional[int] = None, force: bool = False) -> None:
        if not self._finishing:
            return
        seen = self._last_step_t1
        late = now - FINISH_GRACE_NS if now is not None else -1
        done = [rid for rid, t in self._finishing.items() if force or t <= seen or t <= late]
        for rid in done:
            del self._finishing[rid]
            self._close_request(rid)

    # -- steps --------------------------------------------------------------------------------
    def _handle_step(self, rec: tuple) -> None:
        _, key, t0, t1, feat, reqs, device, stages = rec[:8]
        self.pacer.saw_step(t1)
        if t1 > self._last_step_t1:
            self._last_step_t1 = t1
        stage_map = {}
        for name, s0, s1 in stages or ():
            stage_map[name] = (to_epoch_ns(s0), to_epoch_ns(s1))
        for name, s0, s1 in self._pending_stages.pop(key, ()):
            stage_map.setdefault(name, (to_epoch_ns(s0), to_epoch_ns(s1)))
        device_ns, attrs = _device_time(device, stage_map)
        groups = {}
        if device is not None and hasattr(device, "details"):  # a DeepDive step: kernel groups + burst attributes
            groups, extra = device.details()
            attrs = {**attrs, **extra}
        if len(rec) > 8 and rec[8]:
            attrs = {**attrs, **rec[8]}
        start, end = to_epoch_ns(t0), to_epoch_ns(t1)
        self._step_index += 1
        step = StepRecord(instance=self.instance, index=self._step_index, start_ns=start, end_ns=end,
                          phase=feat.phase, batch_size=feat.batch_size, prefill_tokens=feat.prefill_tokens,
                          decode_tokens=feat.decode_tokens, context_tokens=feat.context_tokens,
                          max_context_tokens=feat.max_context_tokens, kv_usage=feat.kv_usage, stages=stage_map,
                          device_ns=device_ns, request_ids=tuple(r[0] for r in reqs), attributes=attrs,
                          kernel_groups=groups, change=self._changes.change(reqs), signals=self._signals(start, end))
        for p in self.processors:
            try:
                step = p.process(step)
            except Exception:  # noqa: BLE001 - a failing processor leaves the step untagged
                self.processor_errors += 1
            if step is None:  # a processor took the step out of this pipeline (a rank forwarding to its leader)
                return
        self.steps_seen += 1
        self.stats.add(step)
        # Requests served by this step: open spans as needed, note scheduling and token times.
        ctxs = []
        for rid, _q, new_token in reqs:
            r = self._open.get(rid)
            if r is None:
                if rid in self._closed:  # finished already (e.g. aborted while its batch was in flight)
                    continue
                r = self._ensure_request(rid, t0, None)  # arrival not seen (attached mid-flight)
            if r.first_sched is None:
                r.first_sched = start
            if new_token:
                r.n_out += 1
                if r.first_token is None:
                    r.first_token = end
                r.last_token = end
            ctxs.append(r.span.get_span_context())
        step_ctx = self.materializer.step(step, ctxs)
        cap = self.materializer.max_request_links - 1
        for rid, _q, _n in reqs:
            r = self._open.get(rid)
            if r is None:
                continue
            r.n_steps += 1
            if len(r.links) < cap:
                r.links.append(step_ctx)
            else:
                r.last_link = step_ctx
        self._finalize_finishing()
        if len(self.handoff_ns) < 100000:
            self.handoff_ns.append(clock_ns() - t1)
        if self.on_step is not None:
            try:
                self.on_step(step)
            except Exception:  # noqa: BLE001
                self.processor_errors += 1


def _device_time(device, stage_map) -> tuple:
    """Device ns of the step's forward: device events when recorded, else the host clock of the forward."""
    if device is not None:
        for _ in range(50):  # sync engines have finished the events by the step's end; async ones soon after
            ns, timing = device.resolve()
            if timing != "pending":
                return ns, {sc.DEVICE_TIMING: timing}
            time.sleep(0.001)
        return None, {sc.DEVICE_TIMING: "unavailable"}
    fwd = stage_map.get(sc.STAGE_FORWARD)
    if fwd is None:
        return None, {}
    return fwd[1] - fwd[0], {sc.DEVICE_TIMING: "host"}


def replace_verdict(step: StepRecord, **kw) -> StepRecord:
    """Helper for processors: a copy of ``step`` with a new verdict."""
    from prism_otel.record import Verdict

    v = step.verdict or Verdict()
    return dataclasses.replace(step, verdict=dataclasses.replace(v, **kw))
