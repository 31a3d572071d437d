"""Hooks for transformers continuous batching (hot path: clocks and one raw record per step)."""

from __future__ import annotations

from opentelemetry import trace

from prism_otel import semconv as sc
from prism_otel.device import timing
from prism_otel.instrumentation.base import guarded
from prism_otel.record import Reqs, StepFeatures, classify_phase, clock_ns


def step_features(bp) -> tuple:
    """(StepFeatures, Reqs) of the batch just prepared.

    A request is prefilling while the tokens it feeds start before the end of its prompt; its
    context (KV length read) is its position after this step. Runs on the engine thread: O(batch).
    """
    pre = dec = ctx = mx = 0
    ids = []
    qs = []
    quiet = None
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
        ids.append(st.request_id)
        qs.append(q)
        if not fs.has_new_token:
            if quiet is None:
                quiet = set()
            quiet.add(st.request_id)
    kv = None
    cache = getattr(bp, "cache", None)
    if cache is not None:
        free = getattr(cache, "compute_free_capacity", None)
        if free is not None:
            kv = 1.0 - free(relative=True)
        elif getattr(cache, "num_blocks", 0):  # transformers < 5.2x: block counts only
            kv = 1.0 - cache.get_num_free_blocks() / cache.num_blocks
    return (StepFeatures(classify_phase(pre, dec), len(ids), pre, dec, ctx, mx, kv),
            # Reqs reads quiet with `in` only; its parameter is unannotated in record.py, typed from the default
            Reqs(ids, qs, quiet or frozenset()))  # pyright: ignore[reportArgumentType]


def _name_model(model, rec) -> None:
    """``gen_ai.request.model`` of the request spans: the model's name (a local directory: its last part),
    sent once to the pipeline as a ``META`` record (unless ``start(model_name=...)`` gave one)."""
    try:
        if rec.names.get("model_name"):
            return
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        if name.startswith("/") or name.startswith("."):
            import os

            name = os.path.basename(name.rstrip("/"))
        if name:
            rec.meta("model_name", name)
    except Exception:  # noqa: BLE001 - the name is cosmetic
        pass


def wrap_prepare(g, rec):
    """Stage ``schedule``, and the features of the batch it prepared (read here, so that a step is
    still recorded where the forward hook point changed and was skipped)."""

    def before(instance, args, kwargs):
        return clock_ns()

    def after(instance, args, kwargs, ok, t0):
        t1 = clock_ns()
        instance._prism_prep = None
        if ok:
            instance._prism_prep = (t0, t1, step_features(instance))
        else:
            rec.flush()  # no batch: the engine is out of work for now

    return guarded(g, before, after)


def wrap_generation_step(g, rec):
    def before(instance, args, kwargs):
        dev = getattr(instance, "_prism_dev", False)  # False: not looked up yet; then the type or None
        model = args[0] if args else kwargs.get("model")
        if isinstance(dev, bool):
            _name_model(model, rec)  # once per batch processor: request spans are named after the model
            dev = instance._prism_dev = timing.accelerator_of(model)
            # events go on the stream CB computes on (it runs the forward on a stream of its own)
            instance._prism_stream = getattr(instance.inputs_and_outputs, "compute_stream", None) if dev else None
        pair = timing.begin(dev, model, instance._prism_stream)
        return pair, clock_ns()

    def after(instance, args, kwargs, r, state):
        t1 = clock_ns()
        pair, t0 = state
        timing.end(pair)
        instance._prism_fwd = (t0, t1, pair)

    return guarded(g, before, after)


def wrap_update(g, rec):
    record_step = rec.step
    new_key = rec.new_key

    def before(instance, args, kwargs):
        return clock_ns()

    def after(instance, args, kwargs, r, t0):
        t1 = clock_ns()
        prep = getattr(instance, "_prism_prep", None)
        fwd = getattr(instance, "_prism_fwd", None)
        instance._prism_prep = instance._prism_fwd = None
        if prep is None:
            return
        feat, reqs = prep[2]
        if fwd is None:  # the forward hook point is skipped (changed in this version)
            stages = ((sc.STAGE_SCHEDULE, prep[0], prep[1]), (sc.STAGE_UPDATE, t0, t1))
            pair = None
        else:
            stages = ((sc.STAGE_SCHEDULE, prep[0], prep[1]), (sc.STAGE_FORWARD, fwd[0], fwd[1]),
                      (sc.STAGE_UPDATE, t0, t1))
            pair = fwd[2]
        record_step(new_key(), prep[0], t1, feat, reqs, pair, stages)
        sched = getattr(instance, "scheduler", None)
        if sched is not None and not sched.has_pending_requests():
            rec.flush()  # the last step of a burst goes out now, not with the next one

    return guarded(g, before, after)


def wrap_add_request(g, rec):
    request = rec.request

    def before(instance, args, kwargs):
        return clock_ns()

    def after(instance, args, kwargs, rid, t):
        if rid is None:
            return
        ids = args[0] if args else kwargs.get("input_ids", ())
        mnt = kwargs.get("max_new_tokens", args[2] if len(args) > 2 else None)
        if mnt is None:
            mnt = instance.generation_config.max_new_tokens
        ctx = trace.get_current_span().get_span_context()
        request(rid, "arrive", t, prompt_tokens=len(ids), max_tokens=mnt, parent=ctx if ctx.is_valid else None)

    return guarded(g, before, after)


def wrap_finish_request(g, rec):
    request = rec.request

    def after(instance, args, kwargs, r, _):
        rid = args[0] if args else kwargs["request_id"]
        request(rid, "finish", clock_ns())

    return guarded(g, None, after)
