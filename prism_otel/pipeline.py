"""The pipeline: raw records → `StepRecord` / `RequestRecord` → processors → a span sink.

It reads a ring (:class:`~prism_otel.ring.RingReader`: the engine's shared-memory ring in the
companion process, or a recorder's own ring), assembles :class:`StepRecord` s and
:class:`RequestRecord` s from the named raw records (:mod:`prism_otel.record`), runs the processors
(:class:`processors.chain.ProcessorChain`: its rule for a processor returning None holds here and in
the collector; a step taken out of the chain gets no span here), and hands the results to a *sink*: the OTLP encoder (:mod:`prism_otel.otlp_encode`, the companion's
default) or :class:`~prism_otel.spans.SpanMaterializer` (SDK spans, for an application's own tracer
provider). :meth:`Pipeline.process_pending` does one pass; the companion calls it from its loop, and
``start()`` runs it on a thread where the pipeline lives in the engine's process (only when the
application brought its own provider). Every structure is bounded; what has to be dropped is counted
by reason (``prism.dropped``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Callable, Optional

from opentelemetry import metrics

from prism_otel import semconv as sc
from prism_otel.record import (
    _EPOCH_OFFSET_NS,
    DEVICE,
    GC,
    META,
    REQUEST,
    SPAN,
    STAGE,
    STEP,
    BatchChange,
    Pacer,
    RequestRecord,
    StepRecord,
    clock_ns,
    to_epoch_ns,
)
from prism_otel.signals import GcPauses
from prism_otel.spans import SpanMaterializer
from prism_otel.stats import StageStats
from processors.chain import ProcessorChain

logger = logging.getLogger(__name__)

FINISH_GRACE_NS = 1_000_000_000  # a finish no step covers (an abort while idle) closes its span after this
HOLD_DEVICE_NS = 2_000_000_000  # a step waits this long for its device record, then goes without it



class _OpenRequest:
    __slots__ = ("span", "ctx", "arrival_ns", "prompt_tokens", "first_sched", "first_token", "last_token", "n_out",
                 "n_steps", "links", "last_link", "finish_ns", "status")

    def __init__(self, span, arrival_ns: int, prompt_tokens: int) -> None:
        self.span = span
        self.ctx = span.get_span_context()  # what a step links to (fixed at arrival)
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

    def change(self, reqs, ids=None) -> BatchChange:
        """``ids``: the request ids of ``reqs`` when the caller has them already (any iterable)."""
        ids = frozenset([r[0] for r in reqs] if ids is None else ids)
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
    """Raw records in, spans out (see the module docstring). ``process_pending`` does one pass; ``start``
    runs passes on a thread of this process (the in-process pipeline), ``stop`` drains and closes."""

    def __init__(self, source, tracer_provider=None, instance: str = "",
                 processors: Sequence = (), max_step_links: int = 128, max_request_links: int = 16,
                 max_open_requests: int = 10000, model_name: Optional[str] = None,
                 provider_name: str = "prism", on_step: Optional[Callable[[StepRecord], None]] = None,
                 sink=None) -> None:
        """``source``: a :class:`~prism_otel.ring.RingReader`, or a recorder (its own ring is read).
        ``sink``: where spans go; by default SDK spans on ``tracer_provider``."""
        self.reader = source.reader() if hasattr(source, "reader") else source
        self.recorder = source if hasattr(source, "reader") else None
        self.instance = instance
        self.processors = list(processors)
        self.chain = ProcessorChain(self.processors, on_error=self._processor_failed)  # shares the list
        if sink is None:
            sink = SpanMaterializer(tracer_provider, max_step_links, max_request_links, model_name, provider_name)
        self.sink = sink
        self.materializer = sink  # the name instrumentations and benches know (model_name lives on it)
        self.max_open_requests = max_open_requests
        self.max_request_links = max(1, max_request_links)
        self.on_step = on_step
        self.stats = StageStats()
        self.dropped: dict[str, int] = {}
        self.processor_errors = 0
        self.cpu_ns = 0  # CPU time spent processing
        self.steps_seen = 0
        self.requests_seen = 0
        self.handoff_ns: list[int] = []  # step end -> span handed to the sink, bounded sample
        self._pending_stages: dict[object, list] = {}
        self._open: OrderedDict[str, _OpenRequest] = OrderedDict()
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently closed ids: a late step must not reopen one
        # rid -> finish time (perf ns). A finish can reach the ring before the step that produced the
        # request's last token (transformers finishes requests inside the step's update stage), so a
        # finishing request is closed once a step ending at or after its finish has been handled, or
        # after FINISH_GRACE_NS with no such step (an abort while idle).
        self._finishing: dict[str, int] = {}
        self._last_step_t1 = 0
        self._step_index = 0
        self._queue: deque = deque()  # records read, in order, not handled yet (a step awaiting its device)
        self._devices: dict[int, object] = {}  # device slot -> RawDevice, read ahead of their steps
        self._held_since: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.pacer = Pacer()
        self._lock = threading.Lock()  # serialises processing between the thread and flush()
        self._reported = {"ring_full": 0, "lost_string": 0, "bad_record": 0}
        self._changes = ChangeTracker()
        self.gc_pauses = GcPauses()
        # evidence sources joined to each step (prism_otel.signals): polled once per pass
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
        self.process_pending(final=True)
        with self._lock:
            self._finalize_finishing(force=True)
            for rid in list(self._open):
                self._close_request(rid, status="shutdown")
        self.chain.shutdown(logger.debug)

    def _processor_failed(self, p, n: int, exc: BaseException) -> None:
        self.processor_errors += n

    def after_fork_in_child(self) -> None:
        """The child of a fork inherits no thread: start a fresh one with empty state."""
        self._thread = None
        self._lock = threading.Lock()
        self._open.clear()
        self._pending_stages.clear()
        self._finishing.clear()
        self._queue.clear()
        self._devices.clear()
        self.start()

    def wake(self) -> None:
        """Process what is on the ring now instead of at the next poll."""
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Process everything recorded so far (device timings still running are waited for, up to the hold)."""
        deadline = time.monotonic() + timeout
        rec = self.recorder
        while True:
            if rec is not None:
                rec.resolve_device()
            self.process_pending()
            if not self._queue and not self.reader.backlog_units:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)

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

    def process_pending(self, final: bool = False) -> int:
        """Read what the ring holds and handle it, in order. Returns how many records were read."""
        total = 0
        if self.recorder is not None:  # a ring of this process: what its hooks queued goes in first
            self.recorder.flush()
        with self._lock:
            reader = self.reader
            q = self._queue
            devices = self._devices
            while True:
                batch = reader.read()
                if not batch:
                    break
                total += len(batch)
                for kind, rec in batch:
                    if kind == DEVICE:
                        devices[rec.slot] = rec
                    else:
                        q.append((kind, rec))
            if q:
                self._handle_queue(final)
            if not total:
                self._finalize_finishing(now=clock_ns())
            self._poll_sources()
            self._count_reader()
        return total

    def _count_reader(self) -> None:
        r = self.reader
        rep = self._reported
        for reason, n in (("ring_full", r.dropped), ("lost_string", r.lost_strings), ("bad_record", r.bad)):
            if n > rep[reason]:
                self._drop(reason, n - rep[reason])
                rep[reason] = n

    def _handle_queue(self, final: bool) -> None:
        q = self._queue
        devices = self._devices
        handle = self._handle
        while q:
            kind, rec = q[0]
            dev = None
            if kind == STEP and rec.device_slot:
                dev = devices.pop(rec.device_slot, None)
                if dev is None:
                    now = clock_ns()
                    if self._held_since is None:
                        self._held_since = now
                    if not final and now - self._held_since < HOLD_DEVICE_NS:
                        return  # in order: what follows waits with it
                    self._drop("device_timing_unavailable")
            self._held_since = None
            q.popleft()
            try:
                if kind == STEP:
                    self._handle_step(rec, dev)
                else:
                    handle(kind, rec)
            except Exception:  # noqa: BLE001 - never let one bad record stop the pipeline
                self._drop("bad_record")
                logger.debug("failed to process record %r", rec, exc_info=True)
        if len(devices) > 1024:  # device records whose step was lost
            for k in list(devices)[:-256]:
                del devices[k]

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

    def _handle(self, kind: int, rec) -> None:
        if kind == REQUEST:
            self._handle_request_event(rec)
        elif kind == STAGE:
            pending = self._pending_stages.setdefault(rec.key, [])
            if len(pending) < 64:
                pending.append((rec.name, rec.t0, rec.t1))
            if len(self._pending_stages) > 1024:  # stages whose step never came
                self._pending_stages.pop(next(iter(self._pending_stages)))
                self._drop("orphan_stage")
        elif kind == SPAN:
            self.sink.detached_stage(rec.name, to_epoch_ns(rec.t0), to_epoch_ns(rec.t1), rec.attributes)
        elif kind == GC:
            self.gc_pauses.add(to_epoch_ns(rec.t0), to_epoch_ns(rec.t1), rec.generation)
        elif kind == META:
            if rec.name == "model_name" and rec.value:
                self.sink.model_name = rec.value

    # -- requests -----------------------------------------------------------------------------
    def _handle_request_event(self, rec) -> None:
        rid = rec.request_id
        if rec.event == "arrive":
            self._ensure_request(rid, rec.t, rec.prompt_tokens, rec.max_tokens, rec.parent)
        elif rec.event == "finish":
            r = self._open.get(rid)
            if r is not None and r.finish_ns is None:
                r.finish_ns = to_epoch_ns(rec.t)
                if rec.status:
                    r.status = rec.status
                self._finishing[rid] = rec.t

    def _ensure_request(self, rid: str, t_perf: int, prompt_tokens: Optional[int] = None,
                        max_tokens: Optional[int] = None, parent=None) -> _OpenRequest:
        r = self._open.get(rid)
        if r is not None:
            return r
        if len(self._open) >= self.max_open_requests:
            old = next(iter(self._open))
            self._close_request(old, status="evicted")
            self._drop("open_requests_full")
        arrival = to_epoch_ns(t_perf)
        span = self.sink.open_request(rid, arrival, parent, prompt_tokens or 0, max_tokens)
        r = _OpenRequest(span, arrival, prompt_tokens or 0)
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
        rec = self.chain.request(rec)
        links = list(r.links)
        if r.last_link is not None:
            links.append(r.last_link)
        self.sink.close_request(r.span, rec, links, r.n_steps)

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
    def _handle_step(self, rec, dev) -> None:
        t0, t1 = rec.t0, rec.t1
        reqs = rec.requests
        self.pacer.saw_step(t1)
        if t1 > self._last_step_t1:
            self._last_step_t1 = t1
        off = _EPOCH_OFFSET_NS
        stage_map = {name: (s0 + off, s1 + off) for name, s0, s1 in rec.stages}
        if self._pending_stages:
            for name, s0, s1 in self._pending_stages.pop(rec.key, ()):
                stage_map.setdefault(name, (to_epoch_ns(s0), to_epoch_ns(s1)))
        groups = {}
        if rec.device_slot:
            if dev is None:
                device_ns, attrs = None, {sc.DEVICE_TIMING: "unavailable"}
            else:
                device_ns, attrs = dev.ns, {sc.DEVICE_TIMING: dev.timing}
                groups = dev.kernel_groups
                if dev.attributes:
                    attrs.update(dev.attributes)
        else:
            fwd = stage_map.get(sc.STAGE_FORWARD)
            if fwd is None:
                device_ns, attrs = None, {}
            else:
                device_ns, attrs = fwd[1] - fwd[0], {sc.DEVICE_TIMING: "host"}
        if rec.attributes:
            attrs.update(rec.attributes)
        start, end = t0 + off, t1 + off
        self._step_index += 1
        feat = rec.features
        rids = tuple([r[0] for r in reqs])
        step = StepRecord.build(self.instance, self._step_index, start, end, feat.phase, feat.batch_size,
                          feat.prefill_tokens, feat.decode_tokens, feat.context_tokens, feat.max_context_tokens,
                          feat.kv_usage, stage_map, groups, device_ns, rids, None, attrs,
                          (), self._changes.change(reqs, rids), self._signals(start, end))
        step = self.chain.step(step)
        if step is None:  # a processor took the step out of the chain (a rank forwarding to its leader)
            return
        self.steps_seen += 1
        self.stats.add(step)
        # Requests served by this step: open spans as needed, note scheduling and token times.
        ctxs = []
        served = []
        opened = self._open
        for rid, _q, new_token in reqs:
            r = opened.get(rid)
            if r is None:
                if rid in self._closed:  # finished already (e.g. aborted while its batch was in flight)
                    continue
                r = self._ensure_request(rid, t0)  # arrival not seen (attached mid-flight)
            if r.first_sched is None:
                r.first_sched = start
            if new_token:
                r.n_out += 1
                if r.first_token is None:
                    r.first_token = end
                r.last_token = end
            r.n_steps += 1
            ctxs.append(r.ctx)
            served.append(r)
        step_ctx = self.sink.step(step, ctxs)
        cap = self.max_request_links - 1
        for r in served:
            links = r.links
            if len(links) < cap:
                links.append(step_ctx)
            else:
                r.last_link = step_ctx
        if self._finishing:
            self._finalize_finishing()
        if len(self.handoff_ns) < 100000:
            self.handoff_ns.append(clock_ns() - t1)
        if self.on_step is not None:
            try:
                self.on_step(step)
            except Exception:  # noqa: BLE001
                self.processor_errors += 1


def replace_verdict(step: StepRecord, **kw) -> StepRecord:
    """Helper for processors: a copy of ``step`` with a new verdict."""
    from prism_otel.record import Verdict

    v = step.verdict or Verdict()
    return dataclasses.replace(step, verdict=dataclasses.replace(v, **kw))
