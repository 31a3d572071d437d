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


def _name_model(model) -> None:
    """``gen_ai.request.model`` of the request spans: the model's name (a local directory: its last part)."""
    try:
        from prism_otel import _runtime

        st = _runtime.current()
        mat = getattr(getattr(st, "pipeline", None), "materializer", None)
        if mat is None or mat.model_name is not None:
            return
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        if name.startswith("/") or name.startswith("."):
            import os

            name = os.path.basename(name.rstrip("/"))
        if name:
            mat.model_name = name
    except Exception:  # noqa: BLE001 - the name is cosmetic
        pass


def wrap_prepare(g):
    """Stage ``schedule``, and the features of the batch it prepared (read here, so that a step is
    still recorded where the forward hook point changed and was skipped)."""

    def _prepare(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        t0 = clock_ns()
        ok = wrapped(*args, **kwargs)
        t1 = clock_ns()
        instance._prism_prep = None
        if ok:
            try:
                instance._prism_prep = (t0, t1, step_features(instance))
            except Exception as exc:  # noqa: BLE001
                g.failed(exc)
        return ok

    return _prepare


def wrap_generation_step(g):
    def _generation_step(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        try:
            dev = getattr(instance, "_prism_dev", False)
            model = args[0] if args else kwargs.get("model")
            if dev is False:
                _name_model(model)  # once per batch processor: request spans are named after the model
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
            instance._prism_fwd = (t0, t1, pair)
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
            prep = getattr(instance, "_prism_prep", None)
            fwd = getattr(instance, "_prism_fwd", None)
            instance._prism_prep = instance._prism_fwd = None
            if prep is not None:
                feat, reqs = prep[2]
                if fwd is None:  # the forward hook point is skipped (changed in this version)
                    stages = ((sc.STAGE_SCHEDULE, prep[0], prep[1]), (sc.STAGE_UPDATE, t0, t1))
                    pair = None
                else:
                    stages = ((sc.STAGE_SCHEDULE, prep[0], prep[1]), (sc.STAGE_FORWARD, fwd[0], fwd[1]),
                              (sc.STAGE_UPDATE, t0, t1))
                    pair = fwd[2]
                _emit((STEP, next(_keys), prep[0], t1, feat, reqs, pair, stages))
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
