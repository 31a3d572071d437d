"""Front-end wrapper: ``OutputProcessor.process_outputs`` (stats, detokenization, ``RequestOutput``
creation) in the process that talks to clients (the API server, or the ``LLM`` process offline).

That process is not the engine core's, so this stage cannot be a child of the step span. Each call
becomes a root ``prism.stage.detokenize`` span (a ``SPAN`` raw record) carrying the engine
timestamp of the outputs it processed (``prism.step.outputs_ts``, the same value the producing step
carries: an exact join), the internal request ids (``prism.batch.request_ids``, the ids the step
spans and request spans use), the batch size and the tokens it carried, and the delay from the
engine creating the outputs to their processing (``prism.stage.output_delay_ms``: transport plus
front-end queueing; both clocks are the host's CLOCK_MONOTONIC).
"""

from __future__ import annotations

import time

from prism_otel import semconv as sc
from prism_otel.instrumentation.base import guarded
from prism_otel.record import clock_ns

_MAX_IDS = 64


def wrap_process_outputs(g, rec):
    span = rec.span
    flush = rec.flush

    def before(instance, args, kwargs):
        return clock_ns(), time.monotonic()

    def after(instance, args, kwargs, r, state):
        t1 = clock_ns()
        t0, mono = state
        outs = args[0] if args else kwargs.get("engine_core_outputs", ())
        if not outs:
            return
        ts = args[1] if len(args) > 1 else kwargs.get("engine_core_timestamp")
        ntok = 0
        for o in outs:
            ntok += len(o.new_token_ids)
        attrs = {sc.BATCH_SIZE: len(outs), sc.BATCH_OUTPUT_TOKENS: ntok,
                 sc.BATCH_REQUEST_IDS: [o.request_id for o in outs[:_MAX_IDS]]}
        if ts:
            attrs[sc.STEP_OUTPUTS_TS] = ts
            attrs[sc.STAGE_OUTPUT_DELAY_MS] = (mono - ts) * 1e3
        span(sc.STAGE_DETOKENIZE, t0, t1, attrs)
        has = getattr(instance, "has_unfinished_requests", None)
        if has is not None and not has():
            flush()  # the last outputs: the front end may wait for requests now

    return guarded(g, before, after)
