"""Step assembly in the collector: OTLP spans in, the same spans (tagged) out, in bounded time.

:class:`StepAssembler` takes each received ``ExportTraceServiceRequest``, rebuilds every
``prism.step`` span's :class:`~prism_otel.record.StepRecord` from its children
(:mod:`processors.assembly`), runs the step processors on it in order (the very processors the
in-process pipeline runs), and writes their verdict back onto the step span before forwarding.

Children and their step may arrive in different requests, in either order:

* children end before their step, so an SDK exports them first: they are remembered (name and
  times only; the child spans themselves are forwarded at once) until their step arrives;
* a step whose children are not all in yet (``prism.step.children`` says how many to expect; with
  no count, one child is taken as enough) is held back, *and only it*, for at most ``wait``; it is
  released with what has arrived when the wait ends;
* a child that arrives after its step was released is still forwarded unchanged, and counted.

A span the chain cannot take (its prism attributes have the wrong types, or converting or tagging it
failed) is forwarded as received and counted in ``prism.collector.processor_errors{processor=assembly}``:
one span's problem never costs its neighbours.

Per-instance state is bounded too: :class:`Instances` keeps the instances the processors have
state for, least recently seen first, with an estimate of that state's bytes; an instance idle for
``idle_s`` is forgotten (every processor's ``forget`` hook), and so is the least recently seen one
whenever the estimate would pass ``budget_bytes``. Both are counted. The collector's wiring
(prism_otel/collector/prism_processors.py) supplies the estimate and the hooks.

Everything held is bounded (``max_pending_steps`` steps and ``max_pending_bytes`` of them,
``max_pending_children`` parents); the oldest is released (steps) or forgotten (children) first, and
counted. Not thread-safe: one
pipeline thread owns an assembler.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Callable, Optional

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from prism_otel import semconv as sc
from processors import assembly as asm
from processors.base import ObservesResource
from processors.chain import ProcessorChain, processor_name

logger = logging.getLogger(__name__)

Sources = dict[Any, int]  # where the spans of an output request came from -> how many
Output = tuple[ExportTraceServiceRequest, Sources]
_PRISM = "prism."


class _Held:
    __slots__ = ("span", "resource", "res_attrs", "scope", "rs_schema", "ss_schema", "source", "deadline",
                 "expected", "size", "kids")

    def __init__(self, span, resource, res_attrs, scope, rs_schema, ss_schema, source, deadline, expected, size=0):
        self.kids = None
        self.span = span
        self.resource = resource
        self.res_attrs = res_attrs
        self.scope = scope
        self.rs_schema = rs_schema
        self.ss_schema = ss_schema
        self.source = source
        self.deadline = deadline
        self.expected = expected
        self.size = size


class Instances:
    """LRU of engine instances with per-instance state, bounded in (estimated) bytes and idle time."""

    def __init__(self, budget_bytes: float = float("inf"), idle_s: float = float("inf"),
                 cost: Callable[[int], int] = lambda steps: 0, forget: Callable[[str], None] = lambda inst: None,
                 count: Callable[..., None] = lambda *a, **k: None, clock: Callable[[], float] = time.monotonic):
        self.budget_bytes = budget_bytes
        self.idle_s = idle_s
        self._cost = cost
        self._forget = forget
        self._count = count
        self._clock = clock
        self._lru: OrderedDict[str, list] = OrderedDict()  # instance -> [last seen, steps, estimated bytes]
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._lru)

    def seen(self, instance: str) -> bool:
        """A step of ``instance`` is about to be processed; True if it is new (or back after eviction)."""
        e = self._lru.get(instance)
        new = e is None
        if new:
            e = self._lru[instance] = [0.0, 0, 0]
        else:
            self._lru.move_to_end(instance)
        e[0] = self._clock()
        e[1] += 1
        size = self._cost(e[1])
        self.bytes += size - e[2]
        e[2] = size
        while self.bytes > self.budget_bytes and len(self._lru) > 1:
            self._evict(next(iter(self._lru)), "budget")
        return new

    def expire(self) -> None:
        limit = self._clock() - self.idle_s
        while self._lru:
            inst, e = next(iter(self._lru.items()))
            if e[0] > limit:
                return
            self._evict(inst, "idle")

    def _evict(self, instance: str, reason: str) -> None:
        e = self._lru.pop(instance)
        self.bytes -= e[2]
        self.evicted += 1
        self._count(sc.COLLECTOR_INSTANCES_EVICTED, reason=reason)
        try:
            self._forget(instance)
        except Exception:  # noqa: BLE001 - forgetting must not stop the stream
            logger.warning("forgetting instance %r failed", instance, exc_info=True)


class StepAssembler:
    def __init__(self, processors: Sequence[Any] = (), wait_s: float = 1.0, max_pending_steps: int = 10000,
                 max_pending_children: int = 100000, count: Optional[Callable[..., None]] = None,
                 clock: Callable[[], float] = time.monotonic, max_pending_bytes: int = 64 << 20,
                 instances: Optional[Instances] = None) -> None:
        self.processors = list(processors)
        self.wait_s = wait_s
        self.child_ttl_s = max(2 * wait_s, 1.0)
        self.max_pending_steps = max_pending_steps
        self.max_pending_children = max_pending_children
        self.max_pending_bytes = max_pending_bytes
        self._held_bytes = 0
        self._count = count or (lambda *a, **k: None)
        self._clock = clock
        self._children: OrderedDict[bytes, list] = OrderedDict()  # trace+parent id -> [t_first, [ChildInfo]]
        self._held: OrderedDict[bytes, _Held] = OrderedDict()
        self._released: OrderedDict[bytes, None] = OrderedDict()  # recent step keys, to count late children
        self.chain = ProcessorChain(self.processors, on_error=self._processor_failed)
        self._want_requests = self.chain.wants_requests
        self._resource_hooks = [p for p in self.processors if isinstance(p, ObservesResource)]
        self.instances = instances if instances is not None else Instances(count=self._count, clock=clock)
        self.steps = 0

    # -- the processor chain ----------------------------------------------------------------------
    def _processor_failed(self, p: Any, n: int, exc: BaseException) -> None:
        self._count(sc.COLLECTOR_PROCESSOR_ERRORS, n, processor=processor_name(p))
        logger.debug("processor %r failed on %d step(s)", p, n, exc_info=exc)

    def _unjudged(self, span, exc: Exception) -> None:
        """A span the chain cannot take: it is forwarded as received, and counted."""
        reason = "bad_attribute" if isinstance(exc, asm.BadSpan) else "error"
        self._count(sc.COLLECTOR_PROCESSOR_ERRORS, processor="assembly", reason=reason)
        if reason == "error":
            logger.warning("assembly: span %r forwarded unprocessed: %r", span.name, exc, exc_info=True)
        else:
            logger.debug("assembly: span %r forwarded unprocessed: %s", span.name, exc)

    def _run_steps(self, items: Sequence[tuple[Any, dict[str, Any], Any, Optional[asm.StepAttributes]]]) -> None:
        """Run the chain on complete steps (``(span, resource attributes, children, the span's attributes
        read by ``asm.read_step`` or None)``, stream order) and tag
        their spans. A processor with ``process_many`` judges the batch at once (one vectorised model
        evaluation per model group: the same verdicts as one by one); the others take it step by step."""
        spans, steps, fresh = [], [], []
        for span, res_attrs, kids, entries in items:
            try:
                if entries is None:
                    entries = asm.read_step(span)
                before = asm.step_from_entries(span, entries, res_attrs, kids or ())
                if self.instances.seen(before.instance):
                    for p in self._resource_hooks:
                        p.observe_resource(before.instance, res_attrs)
            except Exception as exc:  # noqa: BLE001 - one span's problem stays that span's
                self._unjudged(span, exc)
                continue
            spans.append(span)
            steps.append(before)
            fresh.append(not entries.has_verdict)
        if not steps:
            return
        # a step a processor took out of the chain is still forwarded, tagged as it left the chain
        out, _ = self.chain.steps(steps)
        for span, before, after, new in zip(spans, steps, out, fresh):
            self.steps += 1
            try:
                if new:
                    asm.tag_new_verdict(span, before, after)
                else:
                    asm.tag_step(span, before, after)
            except Exception as exc:  # noqa: BLE001
                self._unjudged(span, exc)

    def _run_request(self, span, res_attrs) -> None:
        try:
            self._run_request_chain(span, res_attrs)
        except Exception as exc:  # noqa: BLE001
            self._unjudged(span, exc)

    def _run_request_chain(self, span, res_attrs) -> None:
        before = asm.request_from_span(span, res_attrs)
        asm.tag_request(span, before, self.chain.request(before))

    # -- intake ---------------------------------------------------------------------------------------
    def _remember_children(self, req, now: float, want_requests: bool = False) -> tuple[list[bytes], list[list]]:
        """Note the stage and kernel-group spans of ``req`` under their step. Returns the steps' keys touched
        and, per scope in request order, the ``(index, span, is_step)`` of its step spans (and, with
        ``want_requests``, of every other span that is not a child), so that the second pass looks at
        nothing else."""
        touched: list[bytes] = []
        # only a step held from an earlier request can become ready by what comes now: with none held, the
        # keys touched are not needed
        track = bool(self._held)
        scopes = []
        children = self._children
        released = self._released
        step_name, stage_prefix, kernel_prefix = sc.STEP_SPAN, sc.STAGE_SPAN_PREFIX, sc.KERNEL_SPAN_PREFIX
        stage_len, kernel_len = len(stage_prefix), len(kernel_prefix)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                at = []
                scopes.append(at)
                for i, span in enumerate(ss.spans):
                    name = span.name
                    if name == step_name:
                        at.append((i, span, True))
                        continue
                    if name.startswith(stage_prefix):
                        info = (asm.STAGE, name[stage_len:])
                    elif name.startswith(kernel_prefix):
                        info = (asm.KERNEL, name[kernel_len:])
                    else:
                        if want_requests:
                            at.append((i, span, False))
                        continue
                    if want_requests:
                        at.append((i, span, False))
                    parent = span.parent_span_id
                    if not parent:  # not a child (asm.child_info)
                        continue
                    key = span.trace_id + parent
                    entry = children.get(key)
                    if entry is None:
                        if key in released:
                            self._count(sc.COLLECTOR_LATE_CHILDREN)
                            continue
                        if len(children) >= self.max_pending_children:
                            children.popitem(last=False)
                            self._count(sc.METRIC_DROPPED, reason="assembler_children_full")
                        entry = children[key] = [now, []]
                    entry[1].append(info + (span.start_time_unix_nano, span.end_time_unix_nano))
                    if track:
                        touched.append(key)
        return touched, scopes

    @staticmethod
    def _complete(kids, expected: Optional[int]) -> bool:
        if expected is not None:
            return expected == 0 or (kids is not None and len(kids) >= expected)
        return bool(kids)

    def process(self, req: ExportTraceServiceRequest, source: Any = None) -> list[Output]:
        """Assemble, detect and tag ``req`` in place. Returns what may be forwarded now."""
        now = self._clock()
        want_requests = self._want_requests
        touched, scopes = self._remember_children(req, now, want_requests)
        total = held_here = 0
        ready_now: list[tuple[Any, dict[str, Any], Any, Optional[asm.StepAttributes]]] = []
        at_scope = iter(scopes)
        for rs in req.resource_spans:
            res_attrs = None
            for ss in rs.scope_spans:
                hold_idx = []
                spans = ss.spans
                total += len(spans)
                for i, span, is_step in next(at_scope):
                    if is_step:
                        if res_attrs is None:
                            res_attrs = asm.attrs_of(rs.resource.attributes)
                        key = span.trace_id + span.span_id
                        entry = self._children.get(key)
                        kids = entry[1] if entry else None
                        entries = asm.read_step(span)
                        expected = entries.expected
                        if self._complete(kids, expected):
                            self._children.pop(key, None)
                            self._mark_released(key)
                            ready_now.append((span, res_attrs, kids, entries))
                        else:
                            self._hold(key, span, rs, res_attrs, ss, source, now, expected)
                            hold_idx.append(i)
                    elif asm.request_id_of(span) is not None:
                        if res_attrs is None:
                            res_attrs = asm.attrs_of(rs.resource.attributes)
                        self._run_request(span, res_attrs)
                for i in reversed(hold_idx):
                    del spans[i]
                held_here += len(hold_idx)
        if ready_now:
            self._run_steps(ready_now)
        out: list[Output] = []
        if total - held_here > 0:
            out.append((req, {source: total - held_here}))
        ready = [k for k in dict.fromkeys(touched) if k in self._held
                 and self._complete(self._children.get(k, (0, None))[1], self._held[k].expected)]
        excess = len(self._held) - self.max_pending_steps
        over = self._held_bytes - self.max_pending_bytes
        if over > 0:  # bytes too: the oldest held steps until what stays fits
            for n, h in enumerate(self._held.values(), 1):
                over -= h.size
                if over <= 0:
                    excess = max(excess, n)
                    break
        if excess > 0:  # released early (without all children), not lost
            self._count(sc.METRIC_DROPPED, excess, reason="assembler_wait_cut_short")
            ready.extend(list(self._held)[:excess])
        if ready:
            out.extend(self._release(ready))
        return out

    def _hold(self, key, span, rs, res_attrs, ss, source, now, expected) -> None:
        copy = Span()
        copy.CopyFrom(span)
        size = copy.ByteSize() * 4  # decoded, as held (prism_otel/collector/memory.py)
        self._held[key] = _Held(copy, rs.resource, res_attrs, ss.scope, rs.schema_url, ss.schema_url, source,
                                now + self.wait_s, expected, size)
        self._held_bytes += size

    def _mark_released(self, key: bytes) -> None:
        released = self._released
        released[key] = None
        if len(released) > 4 * self.max_pending_steps:
            released.popitem(last=False)

    def _release(self, keys: Sequence[bytes]) -> list[Output]:
        """Run the chain on held steps (with whatever children arrived) and pack them for forwarding."""
        req = ExportTraceServiceRequest()
        groups: dict[tuple[bytes, str], Any] = {}
        scopes: dict[tuple[int, bytes, str], Any] = {}
        sources: Sources = {}
        held = []
        for key in keys:
            h = self._held.pop(key, None)
            if h is None:
                continue
            self._held_bytes -= h.size
            entry = self._children.pop(key, None)
            self._mark_released(key)
            held.append(h)
            h.kids = entry[1] if entry else None
        self._run_steps([(h.span, h.res_attrs, h.kids, None) for h in held])
        for h in held:
            rkey = (h.resource.SerializeToString(deterministic=True), h.rs_schema)
            rs = groups.get(rkey)
            if rs is None:
                rs = groups[rkey] = req.resource_spans.add()
                rs.resource.CopyFrom(h.resource)
                rs.schema_url = h.rs_schema
            skey = (id(rs), h.scope.SerializeToString(deterministic=True), h.ss_schema)
            ss = scopes.get(skey)
            if ss is None:
                ss = scopes[skey] = rs.scope_spans.add()
                ss.scope.CopyFrom(h.scope)
                ss.schema_url = h.ss_schema
            ss.spans.append(h.span)
            sources[h.source] = sources.get(h.source, 0) + 1
        return [(req, sources)] if sources else []

    def expire(self) -> list[Output]:
        """Release held steps whose wait is over; forget children nobody claimed and idle instances.
        Call often."""
        now = self._clock()
        self.instances.expire()
        due = []
        for key, h in self._held.items():
            if h.deadline > now:
                break
            due.append(key)
        children = self._children
        while children:
            entry = next(iter(children.values()))
            if entry[0] + self.child_ttl_s > now:
                break
            children.popitem(last=False)  # children whose step never came (they were forwarded already)
        return self._release(due) if due else []

    def flush(self) -> list[Output]:
        """Release everything held (shutdown)."""
        return self._release(list(self._held))

    @property
    def held(self) -> int:
        return len(self._held)

    def shutdown(self) -> None:
        self.chain.shutdown(logger.debug)
