"""The hot path: the only object an engine's hooks talk to.

A hook's call (:meth:`Recorder.step`, ``request``, ``span``, ...) appends one tuple to a queue and
returns; the recorder writes what is queued into its ring (:mod:`prism_otel.ring`: the engine's
shared-memory ring when prism-otel runs, an anonymous one in tests) as fixed-layout raw records
(:mod:`prism_otel.record`) in one go (:meth:`Recorder.flush`), on the same thread, when 64 are queued,
when the oldest has waited 100 ms, or when the instrumentation says the engine has no more work
(``flush()`` from the hook that sees it go idle: the last steps never wait for the next one). Why:
between two steps the engine's thread runs the model, and the caches our code needs are cold when a
hook runs; on the 2-vCPU VM we measured one ring write at 30-80 us cold against 3 us for a queue
append, and a batch of writes costs little more than its first. A flush takes one uncontended lock,
interns new text (a request id the first time it is seen), packs each record with
``struct.pack_into`` and publishes it. It never waits on the reader: a full ring overwrites its
oldest records (the reader counts them).

Besides that, once per step (in :meth:`step`) it:

* asks the oldest pending device events of earlier steps whether they completed (``query()``, never
  a synchronisation; at a flush) and writes a ``DEVICE`` record for each that did;
* reads the control word the reader may have set (a DeepDive request) and hands it to ``on_control``;
* about once per second of steps, calls ``supervisor(now)`` (the runtime checks the companion's
  heartbeat there, restarts a dead one, notes the rank).

Nothing here starts a thread, blocks on I/O or raises into the engine on its own account: the hooks
call it inside their guard, which counts and contains what goes wrong.
"""

from __future__ import annotations

import _thread
import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, cast

from prism_otel import config
from prism_otel import record as R
from prism_otel.ring import H_CTL_ARG0, H_CTL_ARG1, H_CTL_SEQ, H_HEAD, Ring, RingReader, RingWriter, StringWriter

_LOCK_TIMEOUT_S = 0.1  # a flush never waits longer for another thread's (its records go with the next one)
_MAX_PENDING_DEVICE = 256  # device timings awaiting completion; beyond, the oldest is given up
_CHECK_EVERY_NS = 1_000_000_000
_BATCH = 64  # records queued before a flush
_BATCH_NS = 100_000_000  # or the oldest queued record's age
_QUEUE_MAX = 65536  # records queued at most (while no ring can be had): beyond, counted and dropped

_STEP_FIXED = R.STEP_FIXED
_STEP_SIZE = R.STEP_FIXED.size
_KSTEP, _KSTAGE, _KREQUEST, _KSPAN, _KGC, _KMETA = R.STEP, R.STAGE, R.REQUEST, R.SPAN, R.GC, R.META
_H_HEAD = H_HEAD
_STAGE_PACK = R.STAGE_REC.pack_into
_pack_attrs = R.pack_attrs
_body_struct = R.body_struct
_PHASE = R.PHASE_CODE
_MAGIC = R.MAGIC
_QUIET = R.QUIET


def _round(n: int) -> int:
    return (n + 15) & ~15


class Recorder:
    """Raw records into a ring (see the module docstring).

    ``capacity``: about how many records the ring holds. ``opener``: a callable returning the
    :class:`~prism_otel.ring.Ring` to write to, called at the first flush (the runtime's: a shared
    ring and its companion); without one the recorder writes to an anonymous ring of its own.
    """

    # what the writers use, set by _attach. They are None while no ring is attached, but the writers
    # run only with one (flush opens it first) and step() tests _words: declared without Optional
    _view: memoryview
    _words: memoryview
    _strs: StringWriter

    def __init__(self, capacity: int = 65536, opener: Optional[Callable[[], Optional[Ring]]] = None) -> None:
        if capacity < 16:
            raise ValueError(f"ring capacity must be >= 16, got {capacity}")
        self.capacity = capacity
        self.opener = opener
        self._lock = _thread.allocate_lock()
        self._q: deque = deque()
        self._q_t0 = 0
        self._keys = itertools.count(1)
        self._dev_slots = itertools.count(1)
        self._pending_dev: deque = deque()
        self.dropped = 0  # records the engine side could not write (no ring, too large, a queue overflow)
        self.write_errors = 0  # records that could not be packed (a bad value from a hook)
        self.on_control: Optional[Callable[[int, bool, Optional[int]], None]] = None
        self.on_signal: Optional[Callable[[], None]] = None
        self.supervisor: Optional[Callable[[int], None]] = None
        self.signal_pending = False  # set by a signal handler; handled at the next step
        self._ctl_seen = 0
        self._next_check = 0
        self.names: dict = {}  # what meta() recorded (name -> value)
        self.ring: Optional[Ring] = None
        self._w: Optional[RingWriter] = None
        self._strs = None  # pyright: ignore[reportAttributeAccessIssue] - no ring yet (see above)
        self._ids_get = {}.get
        self._view = None  # pyright: ignore[reportAttributeAccessIssue] - no ring yet
        self._words = None  # pyright: ignore[reportAttributeAccessIssue] - no ring yet
        self._head = self._rseq = self._mask = self._base = self._max = 0
        self._writers = {_KSTEP: self._w_step, _KSTAGE: self._w_stage, _KREQUEST: self._w_request,
                         _KSPAN: self._w_span, _KGC: self._w_gc, _KMETA: self._write_meta}
        if opener is None:
            self._attach(Ring.create(capacity, shared=False))

    # -- the ring ------------------------------------------------------------------------------
    def _attach(self, ring: Ring) -> None:
        """Write to ``ring`` from now on (the lock held, or no writer yet). Names recorded with
        :meth:`meta` before there was a ring are written first."""
        self.ring = ring
        self._w = w = RingWriter(ring)
        self._head, self._rseq = w._head, w._rseq
        self._mask = ring.rec_units - 1
        self._base = ring.rec_off
        self._max = w._max
        self._strs = StringWriter(ring)
        self._ids_get = self._strs.ids.get
        self._view = ring.view
        self._words = ring.words
        self._ctl_seen = ring.words[H_CTL_SEQ]
        self._next_check = 0
        for name, value in self.names.items():
            self._write_meta(name, value)

    def attach(self, ring: Ring) -> None:
        """Write to ``ring`` from now on."""
        with self._lock:
            self._attach(ring)

    def ensure_ring(self, opener: Optional[Callable[[], Optional[Ring]]] = None) -> bool:
        """Open the ring now rather than at the first flush (with ``opener``, else the usual one)."""
        with self._lock:
            if self._w is not None:
                return True
            if opener is None:
                return self._open()
            ring = opener()
            if ring is None:
                return False
            self._attach(ring)
            return True

    def _open(self) -> bool:
        """Called with the lock held when there is no ring yet: ask the opener for one."""
        opener = self.opener
        if opener is None:
            return False
        ring = opener()
        if ring is None:
            return False
        self._attach(ring)
        return True

    def detach(self) -> Optional[Ring]:
        """Stop writing to the current ring (returned; what was queued is written first); the next
        flush asks the opener again."""
        self.flush()
        with self._lock:
            ring = self.ring
            self.ring = self._w = self._strs = self._view = self._words = None  # pyright: ignore[reportAttributeAccessIssue] - detached
            self._ids_get = {}.get
            self._pending_dev.clear()
            self._q.clear()
            return ring

    def after_fork_in_child(self) -> None:
        """The child of a fork must not write into its parent's ring: forget it (the mapping stays,
        unused) and take a fresh lock (the parent's may have been held by a thread the child lacks)."""
        self._lock = _thread.allocate_lock()
        self.ring = self._w = self._strs = self._view = self._words = None  # pyright: ignore[reportAttributeAccessIssue] - detached
        self._ids_get = {}.get
        self._pending_dev = deque()
        self._q = deque()
        self._next_check = 0

    def reader(self) -> RingReader:
        """A reader of this recorder's ring (the in-process pipeline's), from what it holds now."""
        if self.ring is None:
            with self._lock:
                if self.ring is None and not self._open():
                    raise RuntimeError("the recorder has no ring")
        return RingReader(cast(Ring, self.ring))  # set by _open

    def new_key(self) -> int:
        """A step key unique in this process (keys join STAGE records to their STEP)."""
        return next(self._keys)

    def written(self) -> int:
        """Records written to the current ring (its next record's sequence number)."""
        return self._rseq

    # -- named constructors (the hot path: one append, a flush now and then) --------------------
    def step(self, key: int, t0: int, t1: int, features: R.StepFeatures, requests: Sequence = (), device=None,
             stages: Sequence = (), attrs: Optional[Mapping[str, Any]] = None) -> None:
        """The end of a step: its times, features, the requests it served (a :class:`~prism_otel.record.Reqs`
        or ``(request_id, tokens, has_new_token)`` triples), a pending device timing (an event pair or
        DeepDive timeline, resolved by a later call), its stages ``(name, t0, t1)`` and engine attributes."""
        slot = 0
        if device is not None:
            slot = next(self._dev_slots) & 0xFFFFFFFF or 1
            self._pending_dev.append((slot, device))
        q = self._q
        if not q:
            self._q_t0 = t1
        elif len(q) >= _QUEUE_MAX:
            self.dropped += 1
            return
        q.append((_KSTEP, key, t0, t1, features, requests, slot, stages, attrs))
        if len(q) >= _BATCH or t1 - self._q_t0 >= _BATCH_NS:
            self.flush()
        words = self._words
        if words is not None and (words[H_CTL_SEQ] != self._ctl_seen or self.signal_pending):
            self._control()
        if t1 >= self._next_check:
            self._supervise(t1)

    def stage(self, key: int, name: str, t0: int, t1: int) -> None:
        """A host stage of the step ``key`` (joined to it when its STEP record comes)."""
        q = self._q
        if not q:
            self._q_t0 = t1
        elif len(q) >= _QUEUE_MAX:
            self.dropped += 1
            return
        q.append((_KSTAGE, key, name, t0, t1))
        if len(q) >= _BATCH or t1 - self._q_t0 >= _BATCH_NS:
            self.flush()

    def request(self, request_id: str, event: str, t: int, info: Optional[Mapping[str, Any]] = None, *,
                prompt_tokens: Optional[int] = None, max_tokens: Optional[int] = None, parent=None,
                status: Optional[str] = None) -> None:
        """A request lifecycle event (``arrive``, ``finish``). ``parent``: the caller's span context at
        arrival (an OTel ``Context``, a ``SpanContext`` or ``(trace_id, span_id, flags, remote)``)."""
        if info:
            prompt_tokens = info.get("prompt_tokens", prompt_tokens)
            max_tokens = info.get("max_tokens", max_tokens)
            parent = info.get("parent", parent)
            status = info.get("status", status)
        if parent is not None:
            parent = _parent_ids(parent)
        self._queue((_KREQUEST, request_id, event, t, prompt_tokens, max_tokens, parent, status), t)
        if t >= self._next_check:
            self._supervise(t)

    def span(self, name: str, t0: int, t1: int, attrs: Optional[Mapping[str, Any]] = None) -> None:
        """A host stage that ran outside any step of this process (a root ``prism.stage.<name>`` span)."""
        self._queue((_KSPAN, name, t0, t1, attrs), t1)
        if t1 >= self._next_check:
            self._supervise(t1)

    def gc_pause(self, t0: int, t1: int, generation: int, collected: int = 0) -> None:
        """A garbage-collection pause (from ``gc.callbacks``): queued like any record, so a collection
        that runs while this thread is inside a flush never waits on it."""
        q = self._q
        if not q:
            if self._w is None:
                return  # nothing recorded yet (no ring): a pause joins no step, and must not start a companion
            self._q_t0 = t1
        if len(q) < _QUEUE_MAX:
            q.append((_KGC, t0, t1, generation, collected))
        else:
            self.dropped += 1

    def meta(self, name: str, value: str) -> None:
        """A name the engine learnt late (``model_name``: the served model)."""
        self.names[name] = value
        self._q.append((_KMETA, name, value))
        self.flush()

    def _queue(self, item: tuple, t: int) -> None:
        q = self._q
        if not q:
            self._q_t0 = t
        elif len(q) >= _QUEUE_MAX:
            self.dropped += 1
            return
        q.append(item)
        if len(q) >= _BATCH or t - self._q_t0 >= _BATCH_NS:
            self.flush()

    # -- flushing ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is queued into the ring now (and what pending device timings completed). The
        instrumentation calls this where it sees the engine run out of work."""
        q = self._q
        if not q and not self._pending_dev:
            return
        lock = self._lock
        if not lock.acquire(False) and not lock.acquire(True, _LOCK_TIMEOUT_S):
            return  # another thread is flushing: these go with the next flush
        try:
            if self._w is None and not self._open():
                if q:
                    self.dropped += len(q)
                    q.clear()
                return
            pop = q.popleft
            writers = self._writers
            while True:
                try:
                    item = pop()
                except IndexError:
                    break
                try:
                    writers[item[0]](*item[1:])
                except Exception:  # noqa: BLE001 - a record that cannot be packed is counted, never raised
                    self.write_errors += 1
            if self._pending_dev:
                self._poll_device()
        finally:
            lock.release()

    # -- writers (lock held, ring open) ----------------------------------------------------------
    def _pad(self, pos: int) -> int:
        """Fill the rest of the area with a PAD record; the next record starts at its beginning."""
        i = pos & self._mask
        left = self._mask + 1 - i
        R.HEADER.pack_into(self._view, self._base + (i << 4), 0, _MAGIC, R.PAD, 0, left << 4, pos & 0xFFFFFFFF)
        return pos + left

    def _reserve(self, nbytes: int):
        """(offset, record sequence number, unit position) for a record of ``nbytes``."""
        pos = self._head
        if (pos & self._mask) + (nbytes >> 4) > self._mask + 1:
            pos = self._pad(pos)
        return self._base + ((pos & self._mask) << 4), self._rseq, pos

    def _publish(self, pos: int, nbytes: int) -> None:
        self._head = h = pos + (nbytes >> 4)
        self._rseq = (self._rseq + 1) & 0xFFFFFFFF
        self._words[_H_HEAD] = h

    def _w_step(self, key, t0, t1, features, requests, slot, stages, attrs) -> None:
        get = self._ids_get
        if type(requests) is R.Reqs:
            ids = requests.ids
            qs = requests.qs
            quiet = requests.quiet
        elif requests:
            ids = [r[0] for r in requests]
            qs = [r[1] for r in requests]
            quiet = {r[0] for r in requests if not r[2]}
        else:
            ids = qs = quiet = ()
        nreq = len(ids)
        if nreq:
            nums = list(map(get, ids))
            if None in nums:
                intern = self._strs.intern
                nums = [intern(x) for x in ids]
            if quiet:
                qs = [q | _QUIET if rid in quiet else q for rid, q in zip(ids, qs)]
        ns = len(stages) if stages else 0
        if ns:
            flat = []
            for name, a, b in stages:
                flat += (get(name) or self._strs.intern(name), a, b)
        if attrs:
            blob, na = _pack_attrs(attrs), 1
        else:
            blob, na = b"", 0
        nbytes = (_STEP_SIZE + 20 * ns + 8 * nreq + len(blob) + 15) & ~15
        if nbytes > self._max:
            self.dropped += 1
            return
        pos = self._head
        if (pos & self._mask) + (nbytes >> 4) > self._mask + 1:
            pos = self._pad(pos)
        off = self._base + ((pos & self._mask) << 4)
        rseq = self._rseq
        view = self._view
        phase, batch, pre, dec, ctx, mx, kv = features
        _STEP_FIXED.pack_into(view, off, rseq, _MAGIC, _KSTEP, 0, nbytes, pos & 0xFFFFFFFF, key, t0, t1,
                              _PHASE[phase], kv is not None, ns, na, nreq, batch, pre, dec, mx, slot, ctx,
                              0.0 if kv is None else kv)
        p = off + _STEP_SIZE
        if ns or nreq:
            if ns and nreq:
                _body_struct(ns, nreq).pack_into(view, p, *flat, *nums, *qs)
            elif ns:
                _body_struct(ns, 0).pack_into(view, p, *flat)
            else:
                _body_struct(0, nreq).pack_into(view, p, *nums, *qs)
            p += 20 * ns + 8 * nreq
        if blob:
            view[p:p + len(blob)] = blob
        self._head = h = pos + (nbytes >> 4)
        self._rseq = (rseq + 1) & 0xFFFFFFFF
        self._words[_H_HEAD] = h

    def _w_stage(self, key, name, t0, t1) -> None:
        nid = self._ids_get(name) or self._strs.intern(name)
        off, rseq, pos = self._reserve(48)
        _STAGE_PACK(self._view, off, rseq, _MAGIC, _KSTAGE, 0, 48, pos & 0xFFFFFFFF, key, nid, t0, t1)
        self._publish(pos, 48)

    def _w_request(self, request_id, event, t, prompt_tokens, max_tokens, parent, status) -> None:
        tid = sid = b""
        pflags = 0
        if parent is not None:
            tid, sid = parent[0].to_bytes(16, "big"), parent[1].to_bytes(8, "big")
            pflags = (parent[2] & 1) | (2 if parent[3] else 0) | (4 if len(parent) > 4 and parent[4] else 0)
        rid = self._ids_get(request_id) or self._strs.intern(request_id)
        off, rseq, pos = self._reserve(80)
        R.REQUEST_REC.pack_into(self._view, off, rseq, _MAGIC, _KREQUEST, 0, 80, pos & 0xFFFFFFFF, rid,
                                R.EVENT_CODE.get(event, 0), _status_code(status), 1 if tid else 0, pflags, t,
                                R.NONE_I64 if prompt_tokens is None else int(prompt_tokens),
                                R.NONE_I64 if max_tokens is None else int(max_tokens), tid, sid)
        self._publish(pos, 80)

    def _w_span(self, name, t0, t1, attrs) -> None:
        blob = _pack_attrs(attrs) if attrs else b""
        nbytes = _round(R.SPAN_FIXED.size + len(blob))
        if nbytes > self._max:
            self.dropped += 1
            return
        nid = self._ids_get(name) or self._strs.intern(name)
        off, rseq, pos = self._reserve(nbytes)
        R.SPAN_FIXED.pack_into(self._view, off, rseq, _MAGIC, _KSPAN, 0, nbytes, pos & 0xFFFFFFFF, nid,
                               1 if blob else 0, t0, t1)
        if blob:
            p = off + R.SPAN_FIXED.size
            self._view[p:p + len(blob)] = blob
        self._publish(pos, nbytes)

    def _w_gc(self, t0, t1, generation, collected) -> None:
        off, rseq, pos = self._reserve(48)
        R.GC_REC.pack_into(self._view, off, rseq, _MAGIC, _KGC, 0, 48, pos & 0xFFFFFFFF, t0, t1, generation,
                           collected)
        self._publish(pos, 48)

    def _write_meta(self, name: str, value: str) -> None:
        intern = self._strs.intern
        off, rseq, pos = self._reserve(32)
        R.META_REC.pack_into(self._view, off, rseq, _MAGIC, _KMETA, 0, 32, pos & 0xFFFFFFFF, intern(name),
                             intern(str(value)))
        self._publish(pos, 32)

    def _poll_device(self, give_up: bool = False) -> None:
        pend = self._pending_dev
        while pend:
            slot, dev = pend[0]
            try:
                ns, timing = dev.resolve()
            except Exception:  # noqa: BLE001 - a broken event: the step's device time is unknown
                ns, timing = None, "unavailable"
            if timing == "pending":
                if not give_up and len(pend) <= _MAX_PENDING_DEVICE:
                    return
                ns, timing = None, "unavailable"
            pend.popleft()
            groups, extra = {}, {}
            if timing != "unavailable":
                details = getattr(dev, "details", None)
                if details is not None:
                    groups, extra = details()
            self._write_device(slot, ns, timing, groups, extra)

    def _write_device(self, slot: int, ns: Optional[int], timing: str, groups: Mapping[str, int],
                      extra: Mapping[str, Any]) -> None:
        intern = self._strs.intern
        ng = len(groups)
        flat = []
        for g, v in groups.items():
            flat += (intern(g), int(v))
        blob = _pack_attrs(extra) if extra else b""
        nbytes = _round(R.DEVICE_FIXED.size + 12 * ng + len(blob))
        off, rseq, pos = self._reserve(nbytes)
        view = self._view
        R.DEVICE_FIXED.pack_into(view, off, rseq, _MAGIC, R.DEVICE, 0, nbytes, pos & 0xFFFFFFFF, slot,
                                 R.TIMING_CODE.get(timing, 3), ng, 1 if blob else 0,
                                 R.NONE_I64 if ns is None else int(ns))
        p = off + R.DEVICE_FIXED.size
        if ng:
            R.group_struct(ng).pack_into(view, p, *flat)
            p += 12 * ng
        if blob:
            view[p:p + len(blob)] = blob
        self._publish(pos, nbytes)

    def resolve_device(self, give_up: bool = False) -> None:
        """Flush, and write what pending device timings completed (at stop: ``give_up`` on the rest)."""
        self.flush()
        if not self._pending_dev:
            return
        if not self._lock.acquire(True, _LOCK_TIMEOUT_S):
            return
        try:
            if self._w is not None:
                self._poll_device(give_up)
        finally:
            self._lock.release()

    # -- per step, outside the lock ------------------------------------------------------------
    def _control(self) -> None:
        words = self._words
        seq = words[H_CTL_SEQ]
        sig = self.signal_pending
        self.signal_pending = False
        on = self.on_control
        if seq != self._ctl_seen:
            self._ctl_seen = seq
            a0, a1 = words[H_CTL_ARG0], words[H_CTL_ARG1]
            if on is not None:
                try:
                    on(a0 & 0xFF, bool(a0 >> 8 & 1), a1 - 1 if a1 else None)
                except Exception:  # noqa: BLE001 - a control request never breaks a step
                    pass
        if sig and self.on_signal is not None:
            try:
                self.on_signal()  # the DeepDive signal: an on-demand burst
            except Exception:  # noqa: BLE001
                pass

    def _supervise(self, now: int) -> None:
        self._next_check = now + _CHECK_EVERY_NS
        sup = self.supervisor
        if sup is not None:
            try:
                sup(now)
            except Exception:  # noqa: BLE001 - supervision is best effort, never the engine's problem
                pass


def _status_code(status: Optional[str]) -> int:
    if not status:
        return 0
    try:
        return R.STATUSES.index(status)
    except ValueError:
        return 0


def _parent_ids(parent) -> Optional[tuple]:
    """(trace id, span id, flags, remote, own) of a parent given as a Context, SpanContext or tuple.
    ``own``: the ids were made for this request (``tracestate: prism=root``, instrumentation/vllm/_join):
    the request span takes them as its own context instead of as its parent's."""
    if isinstance(parent, tuple):
        return parent
    from opentelemetry import trace

    ctx = parent if hasattr(parent, "trace_id") else trace.get_current_span(parent).get_span_context()
    if not ctx.is_valid:
        return None
    ts = ctx.trace_state
    return ctx.trace_id, ctx.span_id, int(ctx.trace_flags), bool(ctx.is_remote), bool(ts) and ts.get("prism") == "root"


def _no_ring_yet() -> Optional[Ring]:
    """The process recorder's opener until a runtime sets its own: no ring (records wait, bounded)."""
    return None


_process: Optional[Recorder] = None
_process_lock = _thread.allocate_lock()


def process_recorder() -> Recorder:
    """This process's one recorder, made at the first call (the hooks of every engine write to it; the
    runtime gives it its ring opener when it starts)."""
    global _process
    if _process is None:
        with _process_lock:
            if _process is None:
                _process = Recorder(config.ring_capacity(), opener=_no_ring_yet)
    return _process


def process_recorder_if_made() -> Optional[Recorder]:
    """The process recorder if one was made, else None (nothing is created)."""
    return _process
