"""Engine-core wrappers: one ``prism.step`` per scheduled batch, keyed by the ``SchedulerOutput``.

A batch is born in ``Scheduler.schedule`` (which returns its ``SchedulerOutput``), travels through
``Executor.execute_model(scheduler_output)`` and ``Executor.sample_tokens`` and dies in
``Scheduler.update_from_output(scheduler_output, ...)``. Per-batch state lives in ``_INFLIGHT``
under ``id(scheduler_output)`` (the object is alive from schedule to update, so its id cannot be
reused meanwhile), so ``step_with_batch_queue``, where batch N+1 is scheduled before batch N is
updated, gives each batch its own step whose stages may overlap the neighbours'. Nothing is stored
on vLLM's objects that travel to workers (``SchedulerOutput`` is pickled to them).

Hot path: clock reads, the step features (C-level sums over vLLM's own lists for the decode bulk,
see :func:`features`), one raw record written at the end of ``update_from_output``. Spans are built
in the companion process.
"""

from __future__ import annotations

import time
from operator import add
from typing import Any, Callable, Optional

from prism_otel import semconv as sc
from prism_otel.instrumentation.base import SKIP, guarded
from prism_otel.record import Reqs, StepFeatures, classify_phase, clock_ns

_INFLIGHT: dict = {}  # id(SchedulerOutput) -> _Batch
_MAX_INFLIGHT = 64  # batches whose update never came (engine error) are dropped beyond this
_SLACK_NS = 2_000_000  # runner clocks may start this much before the executor call returns (same host)


class _Batch:
    __slots__ = ("t0", "t1", "feat", "reqs", "overlap", "waiting", "x0", "x1", "s0", "s1", "runner")

    def __init__(self, t0, t1, feat, reqs, overlap, waiting) -> None:
        self.t0 = t0
        self.t1 = t1
        self.feat = feat
        self.reqs = reqs
        self.overlap = overlap
        self.waiting = waiting
        self.x0 = 0  # executor execute_model: call .. future done
        self.x1 = 0
        self.s0 = 0  # executor sample_tokens: call .. result
        self.s1 = 0
        self.runner = None  # (exec0, fwd0, fwd1, exec1, sample0, sample1) from the model runner


class _Engine:
    """What this process knows about the engine core living in it (set on first contact: the first
    request added or batch scheduled)."""

    here = False
    last: Optional[_Batch] = None  # the batch most recently handed to execute_model (sample_tokens follows it)
    # callback(scheduler, recorder) run once, off the per-step path
    on_first_contact: Optional[Callable[[Any, Any], None]] = None
    on_teardown: Optional[Callable[[], None]] = None  # before vLLM tears the engine core down (the runtime's flush)


ENGINE = _Engine()


def _first_contact(scheduler, rec) -> None:
    ENGINE.here = True
    cb = ENGINE.on_first_contact
    if cb is not None:
        cb(scheduler, rec)


_EMPTY = frozenset()


def _prompt_side(r, rid, c0, q, quiet) -> int:
    """Prefill tokens of one request that is (or may be) still in its prompt; notes a silent chunk."""
    p = r.num_prompt_tokens
    c1 = c0 + q
    chunk = getattr(r, "is_prefill_chunk", None)  # set by this very schedule(); absent before ~0.2x
    if chunk if chunk is not None else c1 < p:
        quiet.add(rid)
    return ((c1 if c1 < p else p) - c0) if c0 < p else 0


def features(scheduler, so):
    """(StepFeatures, request triples) of a batch just scheduled, from the ``SchedulerOutput``.

    A request's tokens count as prefill while they lie inside its prompt (computed-before < prompt
    length), the rest as decode; its context (KV length read) is its computed length after this
    step; it produces a token unless it is still a prefill chunk. Decode requests, the bulk of a
    large batch, are handled with C-level sums over vLLM's own lists (``scheduled_cached_reqs``);
    only new requests, chunked-prefill continuations (no output yet) and resumed ones are visited
    one by one.
    """
    nst = so.num_scheduled_tokens
    total = so.total_num_scheduled_tokens
    cached = so.scheduled_cached_reqs
    c_ids = cached.req_ids
    c_c0 = cached.num_computed_tokens
    ctx = sum(c_c0) + total
    mx = max(map(add, c_c0, map(nst.__getitem__, c_ids)), default=0)
    pre = 0
    quiet = None
    requests = scheduler.requests
    for nr in so.scheduled_new_reqs:
        rid = nr.req_id
        c0 = nr.num_computed_tokens
        q = nst[rid]
        ctx += c0
        if c0 + q > mx:
            mx = c0 + q
        if quiet is None:
            quiet = set()
        r = requests.get(rid)
        if r is not None:
            pre += _prompt_side(r, rid, c0, q, quiet)
    c_out = cached.num_output_tokens
    resumed = cached.resumed_req_ids
    if resumed or 0 in c_out:
        if quiet is None:
            quiet = set()
        for rid, c0, n_out in zip(c_ids, c_c0, c_out):
            if n_out == 0 or rid in resumed:
                r = requests.get(rid)
                if r is not None:
                    pre += _prompt_side(r, rid, c0, nst[rid], quiet)
    kv = None
    kvm = getattr(scheduler, "kv_cache_manager", None)
    if kvm is not None:
        kv = kvm.usage
    feat = StepFeatures(classify_phase(pre, total - pre), len(nst), pre, total - pre, ctx, mx, kv)
    # Reqs reads quiet with `in` only; its parameter is unannotated in record.py, typed from the default
    return feat, Reqs(tuple(nst), tuple(nst.values()), quiet or _EMPTY)  # pyright: ignore[reportArgumentType]


def _idle(scheduler) -> bool:
    """The engine has no request left: what the recorder queued goes out now, not with the next step."""
    has = getattr(scheduler, "has_unfinished_requests", None)
    return has is not None and not has()


def wrap_schedule(g, rec):
    request = rec.request
    flush = rec.flush

    def before(instance, args, kwargs):
        return clock_ns()

    def after(instance, args, kwargs, so, t0):
        t1 = clock_ns()
        if not ENGINE.here:
            _first_contact(instance, rec)
        # Requests finished since the last schedule that no update reported (aborts while idle).
        fin = so.finished_req_ids
        if fin:
            for rid in fin:
                request(rid, "finish", t0)
        if so.total_num_scheduled_tokens <= 0:
            ENGINE.last = None
            flush()  # nothing scheduled: the engine may wait for requests now
            return
        feat, reqs = features(instance, so)
        if len(_INFLIGHT) >= _MAX_INFLIGHT:
            _INFLIGHT.clear()
        _INFLIGHT[id(so)] = b = _Batch(t0, t1, feat, reqs, len(_INFLIGHT), len(instance.waiting))
        ENGINE.last = b

    return guarded(g, before, after)


def _done_setter(b, slot):
    def done(_fut):
        setattr(b, slot, clock_ns())

    return done


def _end_when_done(r, b, attr: str) -> None:
    """Set ``b.<attr>`` to the end of the call that returned ``r``: now, or when ``r`` (a future: vLLM's
    async scheduling) is done."""
    add = getattr(r, "add_done_callback", None)
    if add is None:
        setattr(b, attr, clock_ns())
    else:
        add(_done_setter(b, attr))


def wrap_execute_model(g, rec):
    def before(instance, args, kwargs):
        so = args[0] if args else kwargs.get("scheduler_output")
        b = _INFLIGHT.get(id(so))
        if b is None or b.x0:  # not a batch we track, or a nested override calling its base
            return SKIP
        ENGINE.last = b
        b.x0 = clock_ns()
        return b

    def after(instance, args, kwargs, r, b):
        _end_when_done(r, b, "x1")

    return guarded(g, before, after)


def wrap_sample_tokens(g, rec):
    def before(instance, args, kwargs):
        b = ENGINE.last
        if b is None or b.s0:
            return SKIP
        b.s0 = clock_ns()
        return b

    def after(instance, args, kwargs, r, b):
        _end_when_done(r, b, "s1")

    return guarded(g, before, after)


def _stages(b, mro, u0, u1):
    """Stage tuples of a finished batch and where the forward/sample clocks came from."""
    rt = b.runner or getattr(mro, "_prism_t", None)
    out = [(sc.STAGE_SCHEDULE, b.t0, b.t1)]
    if rt is not None and b.t1 - _SLACK_NS <= rt[0] and rt[5] <= u0 + _SLACK_NS:
        e0, f0, f1, e1, s0, s1 = rt
        if f0:
            out.append((sc.STAGE_PREPARE, e0, f0))
            out.append((sc.STAGE_FORWARD, f0, e1))
        else:
            out.append((sc.STAGE_FORWARD, e0, e1))
        if s0:
            out.append((sc.STAGE_SAMPLE, s0, s1))
        source = "runner"
    else:
        x0 = b.x0 or b.t1
        x1 = b.x1 or b.s0 or u0
        out.append((sc.STAGE_FORWARD, x0, x1))
        if b.s0:
            s0 = b.s0 if b.s0 > x1 else x1
            out.append((sc.STAGE_SAMPLE, s0, b.s1 or u0))
        source = "executor"
    out.append((sc.STAGE_UPDATE, u0, u1))
    return tuple(out), source


def wrap_update_from_output(g, rec):
    record_step = rec.step
    request = rec.request
    flush = rec.flush

    def before(instance, args, kwargs):
        so = args[0] if args else kwargs.get("scheduler_output")
        b = _INFLIGHT.pop(id(so), None)
        if b is None:
            return SKIP
        return so, b, clock_ns()

    def after(instance, args, kwargs, r, state):
        u1 = clock_ns()
        so, b, u0 = state
        mro = args[1] if len(args) > 1 else kwargs.get("model_runner_output")
        stages, source = _stages(b, mro, u0, u1)
        attrs = {sc.STEP_TIMING_SOURCE: source, sc.STEP_OVERLAP: b.overlap, sc.BATCH_WAITING: b.waiting}
        for eco in r.values():  # the outputs' engine timestamp joins the front-end's processing
            if eco.outputs:
                attrs[sc.STEP_OUTPUTS_TS] = eco.timestamp
                break
        record_step(id(so), b.t0, u1, b.feat, b.reqs, None, stages, attrs)
        fin = instance.finished_req_ids  # finished since the last schedule: after the step record
        if fin:
            for rid in fin:
                request(rid, "finish", u1)
            if _idle(instance):
                flush()

    return guarded(g, before, after)


def wrap_add_request(g, rec):
    request = rec.request

    def after(instance, args, kwargs, r, _):
        if not ENGINE.here:
            _first_contact(instance, rec)
        req = args[0] if args else kwargs["request"]
        now = clock_ns()
        # vLLM stamps arrival in the front-end with time.time(); map it onto our clock.
        t = now - (time.time_ns() - int(req.arrival_time * 1e9))
        parent = None
        headers = getattr(req, "trace_headers", None)
        if headers:
            from opentelemetry.propagate import extract

            parent = extract(headers)
        request(req.request_id, "arrive", t if t < now else now, prompt_tokens=req.num_prompt_tokens,
                max_tokens=getattr(req, "max_tokens", None), parent=parent)

    return guarded(g, None, after)


def wrap_engine_shutdown(g, rec):
    """Hand what the engine core recorded to the companion before vLLM tears it down: the parent
    force-kills an engine core that takes longer than its grace period (waiting for workers), and a
    killed process never reaches ``atexit`` (the companion then still exports what the ring holds)."""

    def before(instance, args, kwargs):
        cb = ENGINE.on_teardown
        if cb is not None:
            cb()

    return guarded(g, before, None)
