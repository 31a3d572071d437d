"""The SDK span sink: :class:`~prism_otel.spans.SpanMaterializer` on a tracer provider, with the
``tick`` / ``flush`` / ``shutdown`` the pipeline's owner calls.

Two uses: an application that passes its own tracer provider to ``start()`` (its provider, its span
processors; we never shut it down), and a companion whose ``OTEL_TRACES_EXPORTER`` names an
``opentelemetry_traces_exporter`` entry point (an SDK ``SpanExporter`` needs SDK spans). Both cost what
SDK span objects cost (docs/benchmarks.md); the default path is :mod:`prism_otel.otlp_encode`.
"""

from __future__ import annotations

from typing import Optional

from prism_otel import config
from prism_otel.spans import SpanMaterializer


class SDKSink(SpanMaterializer):
    def __init__(self, tracer_provider, max_step_links: int = 128, max_request_links: int = 16,
                 model_name: Optional[str] = None, provider_name: str = "prism", owned: bool = False) -> None:
        super().__init__(tracer_provider, max_step_links, max_request_links, model_name, provider_name)
        self.owned = owned

    def tick(self, now=None) -> None:
        pass

    def flush(self) -> None:
        try:
            self._provider.force_flush(5000)
        except Exception:  # noqa: BLE001
            pass

    def shutdown(self, timeout: float = 10.0) -> None:
        self.flush()
        if self.owned:
            try:
                self._provider.shutdown()
            except Exception:  # noqa: BLE001
                pass


class _BytesAdapter:
    """An SDK SpanExporter in front of one of our bytes exporters (SDK spans encoded by the SDK's encoder)."""

    def __new__(cls, inner):
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        class Adapter(SpanExporter):
            def export(self, spans):
                try:
                    inner.export(encode_spans(spans).SerializeToString(), len(spans))
                    return SpanExportResult.SUCCESS
                except Exception:  # noqa: BLE001
                    return SpanExportResult.FAILURE

            def shutdown(self):
                inner.shutdown(10.0)

        return Adapter()


def sdk_sink(resource, sampler, sdk_exporters, byte_exporters, limits: dict):
    """(an :class:`SDKSink` over a provider of our own exporting to all of them, embedded=False)."""
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    kw = {"sampler": sampler} if sampler is not None else {}
    tp = TracerProvider(resource=resource, span_limits=SpanLimits(max_links=config.link_limit()),
                        shutdown_on_exit=False, **kw)
    for e in list(sdk_exporters) + [_BytesAdapter(b) for b in byte_exporters]:
        tp.add_span_processor(BatchSpanProcessor(e))
    sink = SDKSink(tp, limits["max_step_links"], limits["max_request_links"], None, config.framework_name(),
                   owned=True)
    return sink, False
