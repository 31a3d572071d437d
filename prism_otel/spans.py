"""Span materialisation: `StepRecord` / `RequestRecord` → OTel spans with explicit times.

Runs on the pipeline thread only. Spans are built as finished SDK ``ReadableSpan`` s with their
final times, attributes and links in one go, and handed to the configured ``TracerProvider``'s span
processors (``on_end``: the batch processor and its exporter), with the provider's resource, id
generator and sampler (consulted once per step and per request). This skips the SDK's
start/end machinery, which cost ~4x more per span here (bench/pipeline_cost.py); processors that
act in ``on_start`` do not see our spans. If the provider has no span-processor chain we can
reach, spans go through a regular tracer instead.

Link policy (documented in docs/spans.md):

* a step span links to every request it served, up to ``max_step_links`` (default 128, the SDK's
  own per-span cap); the number left out goes in ``prism.step.links_dropped``;
* a request span links to the steps that served it: the first ``max_request_links - 1`` of them
  (prefill and first decode steps) and always the last one; the rest are counted in
  ``prism.request.links_dropped`` and ``prism.request.steps`` says how many there were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from prism_otel import semconv as sc
from prism_otel._sdk_private import active_span_processor
from prism_otel.ecosystem import error_description, fpm_attributes, latency_attributes
from prism_otel.record import ParentIds, RequestRecord, StepRecord

_SIGNAL_KEYS: dict = {}  # signal name -> its attribute key (prism.signal.<name>), made once


def step_attributes(step: StepRecord) -> dict:
    attrs = {
        sc.STEP_INDEX: step.index,
        sc.STEP_PHASE: step.phase,
        sc.STEP_INSTANCE: step.instance,
        sc.STEP_DURATION_MS: round(step.duration_ms, 4),
        sc.BATCH_SIZE: step.batch_size,
        sc.BATCH_PREFILL_TOKENS: step.prefill_tokens,
        sc.BATCH_DECODE_TOKENS: step.decode_tokens,
        sc.BATCH_CONTEXT_TOKENS: step.context_tokens,
        sc.BATCH_MAX_CONTEXT_TOKENS: step.max_context_tokens,
    }
    if step.kv_usage is not None:
        attrs[sc.KV_CACHE_USAGE] = float(step.kv_usage)
    if step.device_ns is not None:
        attrs[sc.DEVICE_TIME_MS] = step.device_ns / 1e6
    if step.request_ids:
        attrs[sc.BATCH_REQUEST_IDS] = list(step.request_ids[:64])
    ch = step.change
    if ch is not None:
        attrs[sc.BATCH_REQUESTS_JOINED] = ch.joined
        attrs[sc.BATCH_REQUESTS_LEFT] = ch.left
        attrs[sc.BATCH_TOKENS_JOINED] = ch.tokens_joined
        attrs[sc.BATCH_SIZE_BEFORE] = ch.batch_before
        attrs[sc.BATCH_STEPS_SINCE_CHANGE] = ch.steps_since_change
    if step.signals:
        keys = _SIGNAL_KEYS
        for k, v in step.signals.items():
            key = keys.get(k)
            if key is None:
                key = sc.SIGNAL_PREFIX + k
                if len(keys) < 4096:  # bounded: signal names are a fixed set, this is a guard
                    keys[k] = key
            attrs[key] = v
    n_children = len(step.stages) + len(step.kernel_groups)
    if n_children:
        attrs[sc.STEP_CHILDREN] = n_children  # lets a collector know when a step's children are all in
    attrs.update(fpm_attributes(step))  # Dynamo's forward-pass fields (prism_otel.ecosystem)
    for k, v in step.attributes.items():
        attrs[k] = v
    v = step.verdict
    if v is not None:
        attrs.update(verdict_attributes(v))
    return attrs


def request_start(model_name: Optional[str], provider_name: str, request_id: str, prompt_tokens: int,
                  max_tokens: Optional[int]) -> tuple[str, dict]:
    """A request span's name and the attributes it has from its arrival (both span encoders use these)."""
    op = sc.GEN_AI_OPERATION_TEXT_COMPLETION
    attrs: dict[str, Any] = {sc.GEN_AI_OPERATION_NAME: op, sc.GEN_AI_PROVIDER_NAME: provider_name,
                             sc.REQUEST_ID: request_id}
    if model_name:
        attrs[sc.GEN_AI_REQUEST_MODEL] = model_name
    if prompt_tokens:
        attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = prompt_tokens
    if max_tokens is not None:
        attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    return (f"{op} {model_name}" if model_name else op), attrs


def request_end_attributes(rec: RequestRecord, total_steps: int, linked_steps: int) -> dict:
    """What a request span learns when the request ends (both span encoders add these)."""
    attrs = {sc.GEN_AI_USAGE_INPUT_TOKENS: rec.prompt_tokens, sc.GEN_AI_USAGE_OUTPUT_TOKENS: rec.output_tokens,
             sc.REQUEST_STEPS: total_steps, sc.REQUEST_DURATION_MS: rec.duration_ms, sc.REQUEST_STATUS: rec.status}
    for key, val in ((sc.REQUEST_QUEUE_MS, rec.queue_ms), (sc.REQUEST_PREFILL_MS, rec.prefill_ms),
                     (sc.REQUEST_TTFT_MS, rec.ttft_ms), (sc.REQUEST_TPOT_MS, rec.tpot_ms)):
        if val is not None:
            attrs[key] = val
    if rec.slo_violations:
        attrs[sc.SLO_VIOLATED] = list(rec.slo_violations)
    attrs.update(latency_attributes(rec))  # vLLM's / SGLang's gen_ai.latency.* keys (prism_otel.ecosystem)
    dropped = total_steps - linked_steps
    if dropped > 0:
        attrs[sc.REQUEST_LINKS_DROPPED] = dropped
    return attrs


def verdict_attributes(v) -> dict:
    """A :class:`~prism_otel.record.Verdict` as step-span attributes."""
    attrs: dict[str, Any] = {sc.ANOMALY: bool(v.anomaly)}
    if v.score is not None:
        attrs[sc.ANOMALY_SCORE] = float(v.score)
    if v.expected_ms is not None:
        attrs[sc.LATENCY_EXPECTED_MS] = float(v.expected_ms)
    if v.root_cause:
        attrs[sc.ANOMALY_ROOT_CAUSE] = v.root_cause
    if v.anomaly and v.test:
        attrs[sc.ANOMALY_TEST] = v.test
    if v.slo_violations:
        attrs[sc.SLO_VIOLATED] = list(v.slo_violations)
    return attrs


class _RequestHandle:
    """A request span in flight: its context is fixed at arrival, the span is built at the end."""

    __slots__ = ("context", "parent", "name", "attributes", "start", "sampled")

    def __init__(self, context, parent, name, attributes, start, sampled) -> None:
        self.context = context
        self.parent = parent
        self.name = name
        self.attributes = attributes
        self.start = start
        self.sampled = sampled

    def get_span_context(self) -> SpanContext:
        return self.context


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(0)
_OK = trace.Status(trace.StatusCode.UNSET)


class SpanMaterializer:
    """Turns records into finished spans. Not thread-safe: the pipeline thread owns it."""

    def __init__(self, tracer_provider, max_step_links: int = 128, max_request_links: int = 16,
                 model_name: Optional[str] = None, provider_name: str = "prism") -> None:
        from prism_otel.version import __version__

        self._provider = tracer_provider
        self._scope = InstrumentationScope(sc.SCOPE, __version__)
        sink = active_span_processor(tracer_provider)
        ids = getattr(tracer_provider, "id_generator", None)
        sampler = getattr(tracer_provider, "sampler", None)
        if sink is None or ids is None or sampler is None:
            raise TypeError("prism-otel needs an OpenTelemetry SDK TracerProvider")
        self._sink = sink
        self._ids: IdGenerator = ids
        self._sampler: Sampler = sampler
        self._resource = tracer_provider.resource
        self.max_step_links = max(0, max_step_links)
        self.max_request_links = max(1, max_request_links)
        self.model_name = model_name
        self.provider_name = provider_name

    def _sample(self, trace_id: int, name: str, parent: Optional[Context] = None, attributes=None) -> bool:
        try:
            res = self._sampler.should_sample(parent, trace_id, name, SpanKind.INTERNAL, attributes)
            return res.decision.is_sampled()
        except Exception:  # noqa: BLE001 - a broken sampler samples everything
            return True

    def _emit(self, name, context, parent, attributes, start, end, links=(), events=(), status=_OK) -> None:
        self._sink.on_end(ReadableSpan(name=name, context=context, parent=parent, resource=self._resource,
                                       attributes=attributes, events=events, links=links, kind=SpanKind.INTERNAL,
                                       status=status, start_time=start, end_time=end,
                                       instrumentation_scope=self._scope))

    # -- steps --------------------------------------------------------------------------------
    def step(self, step: StepRecord, request_contexts: Sequence = ()) -> SpanContext:
        ids = self._ids
        trace_id = ids.generate_trace_id()
        attrs = step_attributes(step)
        sampled = self._sample(trace_id, sc.STEP_SPAN, None, attrs)
        ctx = SpanContext(trace_id, ids.generate_span_id(), False, _SAMPLED if sampled else _UNSAMPLED)
        if not sampled:
            return ctx
        links = [Link(c) for c in request_contexts[: self.max_step_links]]
        dropped = len(request_contexts) - len(links)
        if dropped > 0:
            attrs[sc.STEP_LINKS_DROPPED] = dropped
        for name, (t0, t1) in step.stages.items():
            self._emit(sc.stage_span_name(name), SpanContext(trace_id, ids.generate_span_id(), False, _SAMPLED),
                       ctx, {sc.STAGE_NAME: name}, t0, t1)
        if step.kernel_groups:
            # Device time has no host-clock position: lay the groups end to end from the forward's start.
            t = step.stages.get(sc.STAGE_FORWARD, (step.start_ns, step.end_ns))[0]
            for group, dev_ns in step.kernel_groups.items():
                self._emit(sc.kernel_span_name(group), SpanContext(trace_id, ids.generate_span_id(), False, _SAMPLED),
                           ctx, {sc.KERNEL_GROUP: group, sc.DEVICE_TIME_MS: dev_ns / 1e6}, t, t + dev_ns)
                t += dev_ns
        for r in step.ranks:  # tensor parallel: one child per rank, its kernel groups under it
            self._rank(trace_id, ctx, r)
        events = ()
        v = step.verdict
        if v is not None and v.alert:
            events = (Event(sc.ALERT_EVENT, {sc.ANOMALY_SCORE: float(v.score or 0.0),
                                             sc.LATENCY_EXPECTED_MS: float(v.expected_ms or 0.0),
                                             sc.STEP_DURATION_MS: step.duration_ms}, timestamp=step.end_ns),)
        err = error_description(step)  # PRISM_OTEL_SPAN_ERROR=1: anomalous steps light up APM error views
        status = trace.Status(trace.StatusCode.ERROR, err) if err else _OK
        self._emit(sc.STEP_SPAN, ctx, None, attrs, step.start_ns, step.end_ns, links, events, status)
        return ctx

    def _rank(self, trace_id: int, parent: SpanContext, r: StepRecord) -> None:
        ids = self._ids
        rank = r.attributes.get(sc.RANK, 0)
        attrs = dict(r.attributes)
        attrs[sc.STEP_DURATION_MS] = round(r.duration_ms, 4)
        if r.device_ns is not None:
            attrs[sc.DEVICE_TIME_MS] = r.device_ns / 1e6
        rctx = SpanContext(trace_id, ids.generate_span_id(), False, _SAMPLED)
        self._emit(f"{sc.RANK_SPAN_PREFIX}{rank}", rctx, parent, attrs, r.start_ns, r.end_ns)
        t = r.stages.get(sc.STAGE_FORWARD, (r.start_ns, r.end_ns))[0]
        for group, dev_ns in r.kernel_groups.items():
            self._emit(sc.kernel_span_name(group), SpanContext(trace_id, ids.generate_span_id(), False, _SAMPLED),
                       rctx, {sc.KERNEL_GROUP: group, sc.DEVICE_TIME_MS: dev_ns / 1e6}, t, t + dev_ns)
            t += dev_ns

    def detached_stage(self, name: str, start_ns: int, end_ns: int, attributes: Optional[dict] = None) -> None:
        """A host stage that ran outside any step of this process (vLLM's front-end output processing
        runs in another process than the engine loop): a root span, joined to its step by attributes."""
        attrs = {sc.STAGE_NAME: name}
        if attributes:
            attrs.update(attributes)
        trace_id = self._ids.generate_trace_id()
        name = sc.stage_span_name(name)
        if self._sample(trace_id, name, None, attrs):
            self._emit(name, SpanContext(trace_id, self._ids.generate_span_id(), False, _SAMPLED), None, attrs,
                       start_ns, end_ns)

    # -- requests -----------------------------------------------------------------------------
    def open_request(self, request_id: str, arrival_ns: int, parent: Optional[Union[Context, ParentIds]] = None,
                     prompt_tokens: int = 0, max_tokens: Optional[int] = None) -> _RequestHandle:
        name, attrs = request_start(self.model_name, self.provider_name, request_id, prompt_tokens, max_tokens)
        if isinstance(parent, tuple):  # (trace id, span id, flags, remote[, own]) from the ring
            ts = trace.TraceState([("prism", "root")]) if len(parent) > 4 and parent[4] else None
            parent = trace.set_span_in_context(trace.NonRecordingSpan(
                SpanContext(parent[0], parent[1], bool(parent[3]), TraceFlags(parent[2] & 1), trace_state=ts)))
        parent_ctx = trace.get_current_span(parent).get_span_context() if parent is not None else None
        own_id = None
        if parent_ctx is not None and parent_ctx.is_valid:
            trace_id = parent_ctx.trace_id
            if parent_ctx.trace_state.get("prism") == "root":
                # ids made for this request in vLLM's front end (instrumentation/vllm/_join.py): they are
                # this span's own, and vLLM's llm_request span is its child
                own_id, parent_ctx, parent = parent_ctx.span_id, None, None
        else:
            parent_ctx, trace_id = None, self._ids.generate_trace_id()
        sampled = self._sample(trace_id, name, parent, attrs)
        ctx = SpanContext(trace_id, own_id or self._ids.generate_span_id(), False, _SAMPLED if sampled else _UNSAMPLED)
        return _RequestHandle(ctx, parent_ctx, name, attrs, arrival_ns, sampled)

    def close_request(self, handle: _RequestHandle, rec: RequestRecord, step_contexts: Sequence,
                      total_steps: int) -> None:
        if not handle.sampled:
            return
        attrs = handle.attributes
        attrs.update(request_end_attributes(rec, total_steps, len(step_contexts)))
        status = trace.Status(trace.StatusCode.ERROR) if rec.status == "error" else _OK
        self._emit(handle.name, handle.context, handle.parent, attrs, handle.start, rec.end_ns,
                   [Link(c) for c in step_contexts], (), status)
