"""Wrappers for transformers continuous batching (hot path: clocks, one tuple, no spans)."""

from __future__ import annotations

import itertools

from opentelemetry import trace

from prism_otel import semconv as sc
from prism_otel._runtime import RECORDER
from prism_otel.device import timing
from prism_otel.record import REQUEST, STEP, StepFeatures, classify_phase, clock_ns

_keys = itertools.count(1)
_emit = RECORDER.emit


def step_features(bp) -> tuple:
    """(StepFeatures, ((request_id, query_len, has_new_token), ...)) of the batch just prepared.

    A request is prefilling while the tokens it feeds start before the end of its prompt; its
    context (KV length read) is its position after this step. Runs on the engine thread: O(batch).
    """
    pre = dec = ctx = mx = 0
    reqs = []
    for fs in bp.inputs_and_outputs.requests_in_batch:
        st = fs.state
        q = fs.query_length
        off = st.position_offset  # already advanced by prepare_batch_tensors
        if off - q < len(st.initial_tokens):
            pre += q
        else:
            dec += q
        ctx += off
        if off > mx:
            mx = off
        reqs.append((st.request_id, q, fs.has_new_token))
    kv = None
    cache = getattr(bp, "cache", None)
    if cache is not None:
        free = getattr(cache, "compute_free_capacity", None)
        if free is not None:
            kv = 1.0 - free(relative=True)
        elif getattr(cache, "num_blocks", 0):  # transformers < 5.2x: block counts only
            kv = 1.0 - cache.get_num_free_blocks() / cache.num_blocks
    return StepFeatures(classify_phase(pre, dec), len(reqs), pre, dec, ctx, mx, kv), tuple(reqs)


def wrap_prepare(g):
    def _prepare(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        t0 = clock_ns()
        ok = wrapped(*args, **kwargs)
        instance._prism_prep = (t0, clock_ns()) if ok else None
        return ok

    return _prepare


def wrap_generation_step(g):
    def _generation_step(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        try:
            feat = step_features(instance)
            dev = getattr(instance, "_prism_dev", False)
            model = args[0] if args else kwargs.get("model")
            if dev is False:
                dev = instance._prism_dev = timing.accelerator_of(model)
                # events go on the stream CB computes on (it runs the forward on a stream of its own)
                instance._prism_stream = getattr(instance.inputs_and_outputs, "compute_stream", None) if dev else None
            pair = timing.begin(dev, model, instance._prism_stream)
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
            return wrapped(*args, **kwargs)
        t0 = clock_ns()
        r = wrapped(*args, **kwargs)
        t1 = clock_ns()
        try:
            timing.end(pair)
            instance._prism_fwd = (t0, t1, feat, pair)
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return _generation_step


def wrap_update(g):
    def _update(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        t0 = clock_ns()
        r = wrapped(*args, **kwargs)
        t1 = clock_ns()
        try:
            fwd = getattr(instance, "_prism_fwd", None)
            if fwd is not None:
                instance._prism_fwd = None
                prep = instance._prism_prep or (fwd[0], fwd[0])
                feat, reqs = fwd[2]
                stages = ((sc.STAGE_SCHEDULE, prep[0], prep[1]), (sc.STAGE_FORWARD, fwd[0], fwd[1]),
                          (sc.STAGE_UPDATE, t0, t1))
                _emit((STEP, next(_keys), prep[0], t1, feat, reqs, fwd[3], stages))
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return _update


def wrap_add_request(g):
    def _add_request(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        t = clock_ns()
        rid = wrapped(*args, **kwargs)
        if rid is not None:
            try:
                ids = args[0] if args else kwargs.get("input_ids", ())
                mnt = kwargs.get("max_new_tokens", args[2] if len(args) > 2 else None)
                if mnt is None:
                    mnt = instance.generation_config.max_new_tokens
                info = {"prompt_tokens": len(ids), "max_tokens": mnt}
                span = trace.get_current_span()
                if span.get_span_context().is_valid:
                    info["parent"] = trace.set_span_in_context(span)
                _emit((REQUEST, rid, "arrive", t, info))
            except Exception as exc:  # noqa: BLE001
                g.failed(exc)
        return rid

    return _add_request


def wrap_finish_request(g):
    def _finish_request(wrapped, instance, args, kwargs):
        r = wrapped(*args, **kwargs)
        if not g.disabled:
            try:
                rid = args[0] if args else kwargs["request_id"]
                _emit((REQUEST, rid, "finish", clock_ns(), None))
            except Exception as exc:  # noqa: BLE001
                g.failed(exc)
        return r

    return _finish_request
