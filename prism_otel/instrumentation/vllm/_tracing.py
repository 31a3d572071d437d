"""One tracer provider per process when vLLM's own tracing (``--otlp-traces-endpoint``) is on.

vLLM's ``init_otel_tracer(name, endpoint, extra)`` (API server / ``LLM`` process, and through
``init_otel_worker_tracer`` every engine-core and worker process, which inherit the endpoint in
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) builds a fresh ``TracerProvider`` and makes it the global
one; all of vLLM's spans (``llm_request``, the start-up spans) come from the *global* provider.
With prism-otel running, the wrapper below replaces that with:

* the global provider becomes prism-otel's provider (if no SDK provider is global yet), so vLLM's
  spans and ours share one resource, one set of span processors and one exporter pipeline;
* the endpoint vLLM was given gets an OTLP exporter on that provider, unless the provider already
  exports there (prism-otel built it from the same ``OTEL_EXPORTER_OTLP_*`` endpoint, as in every
  child process, which inherits the variable vLLM wrote);
* vLLM's variable is still written, as vLLM does, so its children find the endpoint.

No span is created twice and none is exported twice. Without prism-otel running, or with the
companion pipeline chosen explicitly (no provider in this process then; in a vLLM environment the
default is in-process), vLLM's own function runs unchanged.
"""

from __future__ import annotations

import logging
import os

from prism_otel import semconv as sc

logger = logging.getLogger(__name__)

_EXPORTED = set()  # normalised endpoints the shared provider already exports to
ACTIVE = False  # vLLM's tracer set-up ran in this process (its tracing is on): _join gives requests a trace


def _norm(endpoint: str) -> str:
    e = (endpoint or "").strip().lower()
    for p in ("http://", "https://", "grpc://"):
        if e.startswith(p):
            e = e[len(p):]
    return e.rstrip("/")


_ENV = {}  # the OTLP settings in the environment when prism-otel instrumented (its provider's source)


def note_env_endpoint() -> None:
    """Called when prism-otel instruments, right as its provider is built from the environment."""
    _ENV["exporters"] = os.environ.get(sc.OTEL_TRACES_EXPORTER, "").lower()
    _ENV["endpoint"] = (os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
                        or os.environ.get(sc.OTEL_EXPORTER_OTLP_ENDPOINT))


def _seed_exported(st) -> None:
    """If the shared provider's exporters came from an OTLP endpoint in the environment (ours, or the
    SDK's under opentelemetry-instrument), that endpoint is already exported to."""
    ep = _ENV.get("endpoint")
    names = _ENV.get("exporters") or "otlp"
    if ep and not st.embedded_default and "otlp" in names:
        _EXPORTED.add(_norm(ep))


def wrap_init_otel_tracer(original):
    def init_otel_tracer(instrumenting_module_name, otlp_traces_endpoint, extra_attributes=None):
        global ACTIVE
        from prism_otel import _runtime

        ACTIVE = True

        st = _runtime.current()
        if st is None or st.provider is None:  # companion mode: no provider here; vLLM keeps its own
            return original(instrumenting_module_name, otlp_traces_endpoint, extra_attributes)
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        _seed_exported(st)
        os.environ[sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT] = otlp_traces_endpoint
        provider = st.provider
        glob = trace.get_tracer_provider()
        if not isinstance(glob, TracerProvider):
            trace.set_tracer_provider(provider)
        elif glob is not provider:
            logger.warning("prism-otel: another SDK tracer provider is global; vLLM's spans use it, ours do not")
            provider = glob
        key = _norm(otlp_traces_endpoint)
        if key not in _EXPORTED:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            try:
                from vllm.tracing.otel import get_span_exporter

                exporter = get_span_exporter(otlp_traces_endpoint)
            except ImportError:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=otlp_traces_endpoint, insecure=True)
            provider.add_span_processor(BatchSpanProcessor(exporter))
            _EXPORTED.add(key)
        return provider.get_tracer(instrumenting_module_name)

    init_otel_tracer._prism_original = original
    return init_otel_tracer


def install(module) -> bool:
    """Patch ``vllm.tracing`` (the package): its backend table and ``vllm.tracing.otel``."""
    import sys

    otel = sys.modules.get("vllm.tracing.otel")
    if otel is None or getattr(otel.init_otel_tracer, "_prism_original", None) is not None:
        return False
    wrapped = wrap_init_otel_tracer(otel.init_otel_tracer)
    otel.init_otel_tracer = wrapped  # init_otel_worker_tracer looks it up here
    table = getattr(module, "_REGISTERED_TRACING_BACKENDS", None)
    if isinstance(table, dict) and "otel" in table:
        entry = list(table["otel"])
        if len(entry) > 1:
            entry[1] = wrapped
            table["otel"] = tuple(entry)
    return True


def uninstall() -> None:
    import sys

    otel = sys.modules.get("vllm.tracing.otel")
    if otel is None:
        return
    orig = getattr(otel.init_otel_tracer, "_prism_original", None)
    if orig is None:
        return
    current = otel.init_otel_tracer
    otel.init_otel_tracer = orig
    pkg = sys.modules.get("vllm.tracing")
    table = getattr(pkg, "_REGISTERED_TRACING_BACKENDS", None)
    if isinstance(table, dict) and "otel" in table:
        entry = list(table["otel"])
        if len(entry) > 1 and entry[1] is current:
            entry[1] = orig
            table["otel"] = tuple(entry)
