"""Our request span joins vLLM's own trace (``--otlp-traces-endpoint``) instead of starting a second one.

With vLLM's tracing on, its front end emits an ``llm_request`` span per request, whose parent is the
client's W3C ``traceparent`` when the request carried one; so does our request span in the engine
core (docs/vllm.md). A request without a ``traceparent`` would give two traces for one request: vLLM's
``llm_request`` as a root in one, our request span as a root in another. So, in the front end, where
vLLM reads a request's trace headers (``BaseServing._get_trace_headers``), a request that carries none
gets one made here: a new trace id and span id, marked ``tracestate: prism=root``. vLLM passes the
headers to the engine core with the request; there our request span takes that trace id and span id
as its *own* context (the marker says so: :mod:`prism_otel.spans`) and stays a root, and vLLM's
``llm_request`` becomes its child. One trace per request, rooted at the engine's view of it.

Only while vLLM's tracing is on in this process (its tracer set-up ran: :mod:`._tracing`), and never
for a request whose client sent trace context.
"""

from __future__ import annotations

import random

from prism_otel.instrumentation.base import guarded_callback
from prism_otel.instrumentation.vllm import _tracing

TRACESTATE_KEY = "prism"
TRACESTATE_ROOT = "root"
_rng = random.SystemRandom()


def new_root_headers() -> dict:
    trace_id = _rng.getrandbits(128) or 1
    span_id = _rng.getrandbits(64) or 1
    return {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01",
            "tracestate": f"{TRACESTATE_KEY}={TRACESTATE_ROOT}"}


def _with_root(headers):
    """``headers`` with a root trace context of our own where the request came without one."""
    if not headers or "traceparent" not in headers:
        return {**(headers or {}), **new_root_headers()}
    return headers


def wrap_get_trace_headers(g, rec=None):  # rec: the recorder (unused: this hook records nothing)
    with_root = guarded_callback(g, _with_root)

    async def _get_trace_headers(wrapped, instance, args, kwargs):
        headers = await wrapped(*args, **kwargs)
        if not _tracing.ACTIVE:
            return headers
        out = with_root(headers)  # None: the hook is off, or it failed (counted)
        return headers if out is None else out

    return _get_trace_headers
