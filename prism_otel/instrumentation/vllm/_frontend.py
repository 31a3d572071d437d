"""Front-end wrapper: ``OutputProcessor.process_outputs`` (stats, detokenization, ``RequestOutput``
creation) in the process that talks to clients (the API server, or the ``LLM`` process offline).

That process is not the engine core's, so this stage cannot be a child of the step span. Each call
becomes a root ``prism.stage.detokenize`` span (a ``SPAN`` ring record) carrying the engine
timestamp of the outputs it processed (``prism.step.outputs_ts``, the same value the producing step
carries: an exact join), the internal request ids (``prism.batch.request_ids``, the ids the step
spans and request spans use), the batch size and the tokens it carried, and the delay from the
engine creating the outputs to their processing (``prism.stage.output_delay_ms``: transport plus
front-end queueing; both clocks are the host's CLOCK_MONOTONIC).
"""

from __future__ import annotations

import time

from prism_otel import semconv as sc
from prism_otel._runtime import RECORDER
from prism_otel.record import SPAN, clock_ns

_emit = RECORDER.emit
_MAX_IDS = 64


def wrap_process_outputs(g):
    def process_outputs(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        t0 = clock_ns()
        mono = time.monotonic()
        r = wrapped(*args, **kwargs)
        t1 = clock_ns()
        try:
            outs = args[0] if args else kwargs.get("engine_core_outputs", ())
            if outs:
                ts = args[1] if len(args) > 1 else kwargs.get("engine_core_timestamp")
                ntok = 0
                for o in outs:
                    ntok += len(o.new_token_ids)
                attrs = {sc.BATCH_SIZE: len(outs), sc.BATCH_OUTPUT_TOKENS: ntok,
                         sc.BATCH_REQUEST_IDS: [o.request_id for o in outs[:_MAX_IDS]]}
                if ts:
                    attrs[sc.STEP_OUTPUTS_TS] = ts
                    attrs[sc.STAGE_OUTPUT_DELAY_MS] = (mono - ts) * 1e3
                _emit((SPAN, sc.STAGE_DETOKENIZE, t0, t1, attrs))
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return process_outputs
