"""Span materialisation: `StepRecord` / `RequestRecord` → OTel spans with explicit times.

Runs on the pipeline thread only. Spans are started and ended through a standard tracer of the
configured ``TracerProvider``, so sampling, resource, span limits and span processors (the batch
processor and its exporter) all apply unchanged.

Link policy (documented in docs/spans.md):

* a step span links to every request it served, up to ``max_step_links`` (default 128, the SDK's
  own per-span cap); the number left out goes in ``prism.step.links_dropped``;
* a request span links to the steps that served it: the first ``max_request_links - 1`` of them
  (prefill and first decode steps) and always the last one; the rest are counted in
  ``prism.request.links_dropped`` and ``prism.request.steps`` says how many there were.
"""

from __future__ import annotations

from typing import Optional, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind

from prism_otel import semconv as sc
from prism_otel.record import RequestRecord, StepRecord

_ROOT = Context()


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
    for k, v in step.attributes.items():
        attrs[k] = v
    v = step.verdict
    if v is not None:
        attrs[sc.ANOMALY] = bool(v.anomaly)
        if v.score is not None:
            attrs[sc.ANOMALY_SCORE] = float(v.score)
        if v.expected_ms is not None:
            attrs[sc.LATENCY_EXPECTED_MS] = float(v.expected_ms)
        if v.root_cause:
            attrs[sc.ANOMALY_ROOT_CAUSE] = v.root_cause
        if v.slo_violations:
            attrs[sc.SLO_VIOLATED] = list(v.slo_violations)
    return attrs


class SpanMaterializer:
    """Turns records into spans. Not thread-safe: the pipeline thread owns it."""

    def __init__(self, tracer_provider, max_step_links: int = 128, max_request_links: int = 16,
                 model_name: Optional[str] = None, provider_name: str = "prism") -> None:
        from prism_otel import __version__

        self._tracer = tracer_provider.get_tracer(sc.SCOPE, __version__)
        self.max_step_links = max(0, max_step_links)
        self.max_request_links = max(1, max_request_links)
        self.model_name = model_name
        self.provider_name = provider_name

    # -- steps --------------------------------------------------------------------------------
    def step(self, step: StepRecord, request_contexts: Sequence = ()) -> trace.SpanContext:
        links = [Link(c) for c in request_contexts[: self.max_step_links]]
        attrs = step_attributes(step)
        dropped = len(request_contexts) - len(links)
        if dropped > 0:
            attrs[sc.STEP_LINKS_DROPPED] = dropped
        tracer = self._tracer
        span = tracer.start_span(sc.STEP_SPAN, context=_ROOT, kind=SpanKind.INTERNAL, attributes=attrs,
                                 links=links, start_time=step.start_ns)
        ctx = trace.set_span_in_context(span, _ROOT)
        for name, (t0, t1) in step.stages.items():
            tracer.start_span(sc.stage_span_name(name), context=ctx, start_time=t0,
                              attributes={sc.STAGE_NAME: name}).end(end_time=t1)
        if step.kernel_groups:
            # Device time has no host-clock position: lay the groups end to end from the forward's start.
            t = step.stages.get(sc.STAGE_FORWARD, (step.start_ns, step.end_ns))[0]
            for group, dev_ns in step.kernel_groups.items():
                tracer.start_span(sc.kernel_span_name(group), context=ctx, start_time=t,
                                  attributes={sc.KERNEL_GROUP: group, sc.DEVICE_TIME_MS: dev_ns / 1e6}
                                  ).end(end_time=t + dev_ns)
                t += dev_ns
        v = step.verdict
        if v is not None and v.alert:
            span.add_event(sc.ALERT_EVENT, {sc.ANOMALY_SCORE: float(v.score or 0.0),
                                            sc.LATENCY_EXPECTED_MS: float(v.expected_ms or 0.0),
                                            sc.STEP_DURATION_MS: step.duration_ms}, timestamp=step.end_ns)
        span.end(end_time=step.end_ns)
        return span.get_span_context()

    def detached_stage(self, name: str, start_ns: int, end_ns: int, attributes: Optional[dict] = None) -> None:
        """A host stage that ran outside any step of this process (vLLM's front-end output processing
        runs in another process than the engine loop): a root span, joined to its step by attributes."""
        attrs = {sc.STAGE_NAME: name}
        if attributes:
            attrs.update(attributes)
        self._tracer.start_span(sc.stage_span_name(name), context=_ROOT, kind=SpanKind.INTERNAL, attributes=attrs,
                                start_time=start_ns).end(end_time=end_ns)

    # -- requests -----------------------------------------------------------------------------
    def open_request(self, request_id: str, arrival_ns: int, parent: Optional[Context] = None,
                     prompt_tokens: int = 0, max_tokens: Optional[int] = None):
        op = sc.GEN_AI_OPERATION_TEXT_COMPLETION
        name = f"{op} {self.model_name}" if self.model_name else op
        attrs = {sc.GEN_AI_OPERATION_NAME: op, sc.GEN_AI_PROVIDER_NAME: self.provider_name,
                 sc.REQUEST_ID: request_id}
        if self.model_name:
            attrs[sc.GEN_AI_REQUEST_MODEL] = self.model_name
        if prompt_tokens:
            attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = prompt_tokens
        if max_tokens is not None:
            attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
        return self._tracer.start_span(name, context=parent or _ROOT, kind=SpanKind.INTERNAL,
                                       attributes=attrs, start_time=arrival_ns)

    def close_request(self, span, rec: RequestRecord, step_contexts: Sequence, total_steps: int) -> None:
        attrs = {sc.GEN_AI_USAGE_INPUT_TOKENS: rec.prompt_tokens, sc.GEN_AI_USAGE_OUTPUT_TOKENS: rec.output_tokens,
                 sc.REQUEST_STEPS: total_steps, sc.REQUEST_DURATION_MS: rec.duration_ms,
                 sc.REQUEST_STATUS: rec.status}
        for key, val in ((sc.REQUEST_QUEUE_MS, rec.queue_ms), (sc.REQUEST_PREFILL_MS, rec.prefill_ms),
                         (sc.REQUEST_TTFT_MS, rec.ttft_ms), (sc.REQUEST_TPOT_MS, rec.tpot_ms)):
            if val is not None:
                attrs[key] = val
        if rec.slo_violations:
            attrs[sc.SLO_VIOLATED] = list(rec.slo_violations)
        dropped = total_steps - len(step_contexts)
        if dropped > 0:
            attrs[sc.REQUEST_LINKS_DROPPED] = dropped
        span.set_attributes(attrs)
        for c in step_contexts:
            span.add_link(c)
        if rec.status == "error":
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end(end_time=rec.end_ns)
