"""One tracer provider per process when vLLM's own tracing (``--otlp-traces-endpoint``) is on.

vLLM's ``init_otel_tracer(name, endpoint, extra)`` (API server / ``LLM`` process, and through
``init_otel_worker_tracer`` every engine-core and worker process, which inherit the endpoint in
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) builds a fresh ``TracerProvider`` and makes it the global
one; all of vLLM's spans (``llm_request``, the start-up spans) come from the *global* provider.
With prism-otel running, the wrapper below replaces that with:

* one provider for the process, with the resource prism-otel's own spans carry (the companion builds
  the same resource for this process from the same environment), so vLLM's spans and ours describe
  one process: the application's provider where it passed one to ``start()``, else one made here
  for vLLM's spans (prism-otel's own spans are exported by the companion and never pass through it);
* it becomes the global provider if no SDK provider is global yet;
* the endpoint vLLM was given gets an OTLP exporter on that provider, unless the provider already
  exports there;
* vLLM's variable is still written, as vLLM does, so its children find the endpoint.

No span is created twice and none is exported twice. The exporter's thread is the one vLLM's own
tracing would start: with prism-otel or without, the process has the same threads. Without
prism-otel running, vLLM's own function runs unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

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


_ENV = {}  # the OTLP settings in the environment when prism-otel instrumented


def note_env_endpoint() -> None:
    """Called when prism-otel instruments, right as its provider is built from the environment."""
    _ENV["exporters"] = os.environ.get(sc.OTEL_TRACES_EXPORTER, "").lower()
    _ENV["endpoint"] = (os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
                        or os.environ.get(sc.OTEL_EXPORTER_OTLP_ENDPOINT))


# the running state of the runtime that instrumented vLLM (set by the instrumentor; None: not running)
def _not_running() -> Optional[object]:
    return None


RUNTIME_STATE: Callable[[], Optional[object]] = _not_running
_OWN = {}  # the provider made here for vLLM's spans (companion mode)


def _provider_for(st):
    """The application's provider, or the one made here once for vLLM's own spans."""
    if st.provider is not None:
        return st.provider
    p = _OWN.get("provider")
    if p is None:
        from opentelemetry.sdk.trace import TracerProvider

        from prism_otel import config

        p = _OWN["provider"] = TracerProvider(resource=config.resource(), shutdown_on_exit=True)
    return p


def wrap_init_otel_tracer(original):
    def init_otel_tracer(instrumenting_module_name, otlp_traces_endpoint, extra_attributes=None):
        global ACTIVE
        ACTIVE = True

        st = RUNTIME_STATE()
        if st is None:
            return original(instrumenting_module_name, otlp_traces_endpoint, extra_attributes)
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        os.environ[sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT] = otlp_traces_endpoint
        provider = _provider_for(st)
        glob = trace.get_tracer_provider()
        if not isinstance(glob, TracerProvider):
            trace.set_tracer_provider(provider)
        elif glob is not provider:
            # e.g. opentelemetry-instrument's, built from the OTEL_* variables: it exports there already
            provider = glob
            ep = _ENV.get("endpoint")
            if ep and "otlp" in (_ENV.get("exporters") or "otlp"):
                _EXPORTED.add(_norm(ep))
        key = _norm(otlp_traces_endpoint)
        if key not in _EXPORTED:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            try:
                # vLLM lives in its own virtualenv, not the one `make lint` runs in
                from vllm.tracing.otel import get_span_exporter  # pyright: ignore[reportMissingImports]

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
    # init_otel_worker_tracer looks it up here (a vLLM module's attribute: unknown to the checker)
    otel.init_otel_tracer = wrapped  # pyright: ignore[reportAttributeAccessIssue]
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
    # a vLLM module's attribute, unknown to the checker (as in install())
    otel.init_otel_tracer = orig  # pyright: ignore[reportAttributeAccessIssue]
    pkg = sys.modules.get("vllm.tracing")
    table = getattr(pkg, "_REGISTERED_TRACING_BACKENDS", None)
    if isinstance(table, dict) and "otel" in table:
        entry = list(table["otel"])
        if len(entry) > 1 and entry[1] is current:
            entry[1] = orig
            table["otel"] = tuple(entry)
