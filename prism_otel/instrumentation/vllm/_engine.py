"""Engine-core wrappers: one ``prism.step`` per scheduled batch, keyed by the ``SchedulerOutput``.

A batch is born in ``Scheduler.schedule`` (which returns its ``SchedulerOutput``), travels through
``Executor.execute_model(scheduler_output)`` and ``Executor.sample_tokens`` and dies in
``Scheduler.update_from_output(scheduler_output, ...)``. Per-batch state lives in ``_INFLIGHT``
under ``id(scheduler_output)`` (the object is alive from schedule to update, so its id cannot be
reused meanwhile), so ``step_with_batch_queue``, where batch N+1 is scheduled before batch N is
updated, gives each batch its own step whose stages may overlap the neighbours'. Nothing is stored
on vLLM's objects that travel to workers (``SchedulerOutput`` is pickled to them).

Hot path: clock reads, the step features (C-level sums over vLLM's own lists for the decode bulk,
see :func:`features`), one tuple appended to the ring at the end of ``update_from_output``. Spans
are built on the pipeline thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from operator import add

from prism_otel import semconv as sc
from prism_otel._runtime import RECORDER
from prism_otel.record import REQUEST, STEP, StepFeatures, classify_phase, clock_ns

_emit = RECORDER.emit
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
    last = None  # the batch most recently handed to execute_model (sample_tokens follows it)
    on_first_contact = None  # callback(scheduler) run once, off the per-step path


ENGINE = _Engine()


def _first_contact(scheduler) -> None:
    ENGINE.here = True
    cb = ENGINE.on_first_contact
    if cb is not None:
        cb(scheduler)


class _Reqs(Sequence):
    """The ``(request_id, tokens, has_new_token)`` triples of a step, built lazily: the hot path only
    copies the scheduled ids and token counts (C-speed) and names the few requests that produce no
    token (prefill chunks); the triples are made on the pipeline thread."""

    __slots__ = ("ids", "qs", "quiet")

    def __init__(self, ids, qs, quiet) -> None:
        self.ids = ids
        self.qs = qs
        self.quiet = quiet

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        rid = self.ids[i]
        return rid, self.qs[i], rid not in self.quiet

    def __iter__(self):
        quiet = self.quiet
        for rid, q in zip(self.ids, self.qs):
            yield rid, q, rid not in quiet


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
    return feat, _Reqs(tuple(nst), tuple(nst.values()), quiet or _EMPTY)


def wrap_schedule(g):
    def schedule(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        t0 = clock_ns()
        so = wrapped(*args, **kwargs)
        t1 = clock_ns()
        try:
            if not ENGINE.here:
                _first_contact(instance)
            # Requests finished since the last schedule that no update reported (aborts while idle).
            fin = so.finished_req_ids
            if fin:
                for rid in fin:
                    _emit((REQUEST, rid, "finish", t0, None))
            if so.total_num_scheduled_tokens <= 0:
                ENGINE.last = None
                return so
            feat, reqs = features(instance, so)
            if len(_INFLIGHT) >= _MAX_INFLIGHT:
                _INFLIGHT.clear()
            _INFLIGHT[id(so)] = b = _Batch(t0, t1, feat, reqs, len(_INFLIGHT), len(instance.waiting))
            ENGINE.last = b
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return so

    return schedule


def _done_setter(b, slot):
    def done(_fut):
        setattr(b, slot, clock_ns())

    return done


def wrap_execute_model(g):
    def execute_model(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        so = args[0] if args else kwargs.get("scheduler_output")
        b = _INFLIGHT.get(id(so))
        if b is None or b.x0:  # not a batch we track, or a nested override calling its base
            return wrapped(*args, **kwargs)
        ENGINE.last = b
        b.x0 = clock_ns()
        r = wrapped(*args, **kwargs)
        try:
            add = getattr(r, "add_done_callback", None)
            if add is None:
                b.x1 = clock_ns()
            else:
                add(_done_setter(b, "x1"))
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return execute_model


def wrap_sample_tokens(g):
    def sample_tokens(wrapped, instance, args, kwargs):
        b = ENGINE.last
        if g.disabled or b is None or b.s0:
            return wrapped(*args, **kwargs)
        b.s0 = clock_ns()
        r = wrapped(*args, **kwargs)
        try:
            add = getattr(r, "add_done_callback", None)
            if add is None:
                b.s1 = clock_ns()
            else:
                add(_done_setter(b, "s1"))
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return sample_tokens


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


def wrap_update_from_output(g):
    def update_from_output(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        so = args[0] if args else kwargs.get("scheduler_output")
        b = _INFLIGHT.pop(id(so), None)
        if b is None:
            return wrapped(*args, **kwargs)
        u0 = clock_ns()
        r = wrapped(*args, **kwargs)
        u1 = clock_ns()
        try:
            mro = args[1] if len(args) > 1 else kwargs.get("model_runner_output")
            stages, source = _stages(b, mro, u0, u1)
            attrs = {sc.STEP_TIMING_SOURCE: source, sc.STEP_OVERLAP: b.overlap, sc.BATCH_WAITING: b.waiting}
            for eco in r.values():  # the outputs' engine timestamp joins the front-end's processing
                if eco.outputs:
                    attrs[sc.STEP_OUTPUTS_TS] = eco.timestamp
                    break
            _emit((STEP, id(so), b.t0, u1, b.feat, b.reqs, None, stages, attrs))
            fin = instance.finished_req_ids  # finished since the last schedule: after the step record
            if fin:
                for rid in fin:
                    _emit((REQUEST, rid, "finish", u1, None))
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return update_from_output


def wrap_add_request(g):
    def add_request(wrapped, instance, args, kwargs):
        r = wrapped(*args, **kwargs)
        if g.disabled:
            return r
        try:
            if not ENGINE.here:
                _first_contact(instance)
            req = args[0] if args else kwargs["request"]
            now = clock_ns()
            # vLLM stamps arrival in the front-end with time.time(); map it onto our clock.
            t = now - (time.time_ns() - int(req.arrival_time * 1e9))
            info = {"prompt_tokens": req.num_prompt_tokens, "max_tokens": getattr(req, "max_tokens", None)}
            headers = getattr(req, "trace_headers", None)
            if headers:
                from opentelemetry.propagate import extract

                info["parent"] = extract(headers)
            _emit((REQUEST, req.request_id, "arrive", t if t < now else now, info))
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return add_request


def wrap_engine_shutdown(g):
    """Export what the engine core recorded before vLLM tears it down: the parent force-kills an
    engine core that takes longer than its grace period (waiting for workers), and a killed
    process never reaches ``atexit``."""

    def shutdown(wrapped, instance, args, kwargs):
        if not g.disabled:
            try:
                from prism_otel import _runtime

                st = _runtime.current()
                if st is not None:
                    st.pipeline.flush(2.0)  # in companion mode: hands the ring to the companion
                    pending = getattr(st.pipeline, "process_pending", None)
                    if pending is not None:
                        pending()  # an empty pass closes the requests that finished
                    if st.provider is not None:
                        st.provider.force_flush(2000)
            except Exception as exc:  # noqa: BLE001
                g.failed(exc)
        return wrapped(*args, **kwargs)

    return shutdown
