"""`StepRecord`, the contract between every part, and the raw records the hot path writes.

Two layers live here, so that nothing else knows a byte offset:

* **Built records** (`StepRecord`, `RequestRecord`, `Verdict`, `BatchChange`, `StepFeatures`): typed,
  immutable, built by the pipeline (in the companion process) and read by processors, spans and the
  collector's assembly.
* **Raw records**: what the engine's hooks write into the shared-memory ring (:mod:`prism_otel.ring`),
  through the named constructors of :class:`prism_otel.recorder.Recorder` (``step``, ``stage``,
  ``request``, ``span``, ``gc_pause``, ``meta``). Each kind has one fixed layout below and one named
  reader (``RawStep``, ``RawRequest``, ...) that :func:`decode` returns. Variable-size data (request
  ids, stage names, attribute keys, string values) is interned: the layout carries a number and the
  ring's string table the text.

Kinds: ``STAGE`` (a host stage of the step with ``key``), ``STEP`` (the end of a step: times,
features, requests with their token counts, stages, engine attributes, a device slot), ``REQUEST``
(arrive / finish, with the parent span context), ``SPAN`` (a host stage that ran outside any step of
this process, e.g. vLLM's front end), ``GC`` (a garbage-collection pause), ``DEVICE`` (the device time
and DeepDive kernel groups of the step that took a device slot, resolved by a later hook), ``META``
(names learnt late: the served model), ``PAD`` (filler to the end of the ring's area).

Times are ``time.perf_counter_ns()`` values (CLOCK_MONOTONIC, shared by every process of a host);
:func:`to_epoch_ns` maps them to wall-clock epoch nanoseconds with one offset taken at import, so a
wall-clock jump never bends a duration.
"""

from __future__ import annotations

import marshal
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Union

clock_ns = time.perf_counter_ns
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def to_epoch_ns(perf_ns: int) -> int:
    """Map a ``perf_counter_ns`` reading to wall-clock epoch ns."""
    return perf_ns + _EPOCH_OFFSET_NS


class StepFeatures(NamedTuple):
    """What one engine iteration computed; captured on the hot path as one tuple."""

    phase: str
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    context_tokens: int = 0
    max_context_tokens: int = 0
    kv_usage: Optional[float] = None


class BatchChange(NamedTuple):
    """What changed in the batch since the engine's previous step (exact: from the request ids of
    consecutive steps). Steps where the batch changes carry most of a real server's normal latency
    tail, so the detector needs to know them (DESIGN.md, "Detection")."""

    joined: int  # requests in this step that were not in the previous one
    left: int  # requests of the previous step that are not in this one
    tokens_joined: int  # tokens this step computes for the requests that joined
    batch_before: int  # the previous step's batch size (0 for the first step)
    steps_since_change: int  # steps since the set of requests last changed (0: it changed now)


def classify_phase(prefill_tokens: int, decode_tokens: int) -> str:
    if prefill_tokens and decode_tokens:
        return "mixed"
    if prefill_tokens:
        return "prefill"
    if decode_tokens:
        return "decode"
    return "idle"


@dataclass(frozen=True)
class Verdict:
    """What the processors concluded about a step."""

    expected_ms: Optional[float] = None
    score: Optional[float] = None
    anomaly: bool = False
    root_cause: Optional[str] = None
    alert: bool = False  # True on the step that raised the alert (rising edge)
    slo_violations: tuple[str, ...] = ()
    test: Optional[str] = None  # on an anomalous step: the test that flagged it (semconv.ANOMALY_TESTS)


@dataclass(frozen=True)
class StepRecord:
    """One engine iteration and all it did. Immutable once built; processors return copies."""

    instance: str
    index: int
    start_ns: int  # epoch ns
    end_ns: int
    phase: str
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    context_tokens: int = 0
    max_context_tokens: int = 0
    kv_usage: Optional[float] = None
    stages: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # name -> (start_ns, end_ns), epoch
    kernel_groups: Mapping[str, int] = field(default_factory=dict)  # group -> device ns
    device_ns: Optional[int] = None
    request_ids: tuple[str, ...] = ()
    verdict: Optional[Verdict] = None
    attributes: Mapping[str, Any] = field(default_factory=dict)  # engine-specific extras
    ranks: tuple[StepRecord, ...] = ()  # tensor parallel: each rank's record of this step (prism_otel.device.ranks)
    change: Optional[BatchChange] = None  # what changed since the previous step (None: unknown)
    signals: Mapping[str, float] = field(default_factory=dict)  # host/device evidence over the step (semconv.SIGNAL_*)

    @staticmethod
    def build(*values) -> StepRecord:
        """``StepRecord(*values)`` with every field given, in declaration order, without the frozen
        dataclass's per-field ``object.__setattr__`` (the companion builds one per engine step)."""
        if len(values) != len(_STEP_FIELDS):
            return StepRecord(*values)  # fields left to their defaults: the dataclass's own constructor
        new = object.__new__(StepRecord)
        new.__dict__.update(zip(_STEP_FIELDS, values))
        return new

    def with_verdict(self, verdict: Verdict) -> StepRecord:
        """This step with ``verdict``: ``dataclasses.replace(self, verdict=verdict)`` without re-running the
        constructor (a shallow copy; a sixth of its cost, and the collector judges every step)."""
        new = object.__new__(StepRecord)
        d = new.__dict__
        d.update(self.__dict__)
        d["verdict"] = verdict
        return new

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


_STEP_FIELDS = tuple(StepRecord.__dataclass_fields__)


class Pacer:
    """How long a ring drainer (the pipeline thread, the companion's forwarder) sleeps between polls.

    Every wake-up takes the interpreter lock from the engine for a moment, so while steps come the
    drainer wakes about once per step, whatever the step time: it sleeps the running mean gap between
    step ends, kept within ``[busy_min_s, busy_max_s]`` (step end -> span stays within about one step).
    After ``idle_after_s`` with nothing drained it backs off to ``idle_s``. ``steps_per_wake`` > 1
    sleeps that many mean gaps instead (the companion's forwarder: fewer, larger batches).
    """

    __slots__ = ("busy_min_s", "busy_max_s", "idle_s", "idle_after_s", "steps_per_wake", "gap_s", "_last_end",
                 "_last_busy")

    def __init__(self, busy_min_s: float = 0.005, busy_max_s: float = 0.02, idle_s: float = 0.05,
                 idle_after_s: float = 1.0, steps_per_wake: float = 1.0) -> None:
        self.busy_min_s, self.busy_max_s, self.idle_s, self.idle_after_s = busy_min_s, busy_max_s, idle_s, idle_after_s
        self.steps_per_wake = steps_per_wake
        self.gap_s = busy_min_s
        self._last_end = None
        self._last_busy = float("-inf")

    def saw_step(self, end_ns: int) -> None:
        last = self._last_end
        if last is not None and end_ns > last:
            self.gap_s += 0.2 * ((end_ns - last) / 1e9 - self.gap_s)
        self._last_end = end_ns

    def wait_s(self, drained: int, now: float) -> float:
        if drained:
            self._last_busy = now
        if now - self._last_busy >= self.idle_after_s:
            return self.idle_s
        return min(max(self.gap_s * self.steps_per_wake, self.busy_min_s), self.busy_max_s)


@dataclass(frozen=True)
class RequestRecord:
    """One request's lifecycle as the engine saw it (built on the pipeline thread)."""

    instance: str
    request_id: str
    arrival_ns: int  # epoch ns
    end_ns: int
    first_scheduled_ns: Optional[int] = None
    first_token_ns: Optional[int] = None
    last_token_ns: Optional[int] = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    status: str = "finished"  # finished | error | evicted | shutdown
    slo_violations: tuple[str, ...] = ()

    @property
    def queue_ms(self) -> Optional[float]:
        return None if self.first_scheduled_ns is None else (self.first_scheduled_ns - self.arrival_ns) / 1e6

    @property
    def ttft_ms(self) -> Optional[float]:
        return None if self.first_token_ns is None else (self.first_token_ns - self.arrival_ns) / 1e6

    @property
    def prefill_ms(self) -> Optional[float]:
        if self.first_token_ns is None or self.first_scheduled_ns is None:
            return None
        return (self.first_token_ns - self.first_scheduled_ns) / 1e6

    @property
    def tpot_ms(self) -> Optional[float]:
        if self.output_tokens < 2 or self.first_token_ns is None or self.last_token_ns is None:
            return None
        return (self.last_token_ns - self.first_token_ns) / 1e6 / (self.output_tokens - 1)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.arrival_ns) / 1e6


# =================================================================================================
# Raw records: the ring's layout (the only place that knows it)
# =================================================================================================
UNIT = 16  # records start on, and fill, whole 16-byte units
MAGIC = 0x5052  # "PR"
PAD, STAGE, STEP, REQUEST, SPAN, GC, DEVICE, META = range(8)
KIND_NAMES = ("pad", "stage", "step", "request", "span", "gc", "device", "meta")

# Every record starts with: record sequence number (u32, wraps), magic, kind, flags, size in bytes
# (a multiple of UNIT, header included), and the low 32 bits of its unit position in the ring.
HEADER = struct.Struct("<IHBBII")

PHASES = ("prefill", "decode", "mixed", "idle")
PHASE_CODE = {p: i for i, p in enumerate(PHASES)}
EVENTS = ("", "arrive", "finish", "schedule", "first_token")
EVENT_CODE = {e: i for i, e in enumerate(EVENTS)}
STATUSES = ("", "finished", "error", "evicted", "shutdown", "aborted")
TIMINGS = ("", "event", "host", "unavailable")
TIMING_CODE = {t: i for i, t in enumerate(TIMINGS)}
QUIET = 0x80000000  # on a request's token count: it produced no token this step (a prefill chunk)
NONE_I64 = -(1 << 63)  # "absent" in an optional integer field

# STEP: header, key, t0, t1, phase, has_kv, n_stages, has_attrs, n_requests, batch_size, prefill_tokens,
# decode_tokens, max_context_tokens, device slot (0: none), context_tokens, kv_usage; then n_stages x
# STAGE_ITEM, n_requests request numbers (u32), n_requests token counts (u32, QUIET bit), attributes.
STEP_FIXED = struct.Struct("<IHBBIIQqqBBBBIIIIIIqd")
STAGE_ITEM = "Iqq"  # stage name number, t0, t1
# STAGE: header, key, name number, t0, t1
STAGE_REC = struct.Struct("<IHBBIIQIqq")
# REQUEST: header, request number, event, status, has_parent, parent flags (bit 0 sampled, bit 1
# remote, bit 2 own: ids made for this request, marked tracestate prism=root: instrumentation/vllm/_join), t, prompt tokens, max tokens (NONE_I64: absent), parent trace id, parent span id
REQUEST_REC = struct.Struct("<IHBBIIIBBBBqqq16s8s")
# SPAN: header, name number, has_attrs, t0, t1; then attributes
SPAN_FIXED = struct.Struct("<IHBBIIIHxxqq")
# GC: header, t0, t1, generation, collected
GC_REC = struct.Struct("<IHBBIIqqII")
# DEVICE: header, slot, timing, n_groups, has_attrs, device ns (NONE_I64: unknown); then n_groups x
# GROUP_ITEM, then attributes
DEVICE_FIXED = struct.Struct("<IHBBIIIBxHHxxq")
GROUP_ITEM = "Iq"  # kernel group name number, device ns
# META: header, name number, value number (both strings)
META_REC = struct.Struct("<IHBBIIII")

# Attributes (engine-specific step extras, detached-span attributes, DeepDive extras): one blob, a u32
# length then the attribute dict in ``marshal`` format (values: str, int, float, bool, lists of them).
# marshal is C: a hook pays a few microseconds for it where a loop over the attributes in Python costs
# several times that. The ring is a file only the engine's user can write; marshal data is read by the
# same Python version that wrote it (the companion runs the engine's interpreter).
_LEN = struct.Struct("<I")


def pack_attrs(attrs: Mapping[str, Any]) -> bytes:
    """The attribute blob of ``attrs`` (empty for none)."""
    if not attrs:
        return b""
    try:
        body = marshal.dumps(attrs if type(attrs) is dict else dict(attrs))
    except ValueError:  # a value marshal does not know: as text
        body = marshal.dumps({k: v if isinstance(v, (str, int, float, bool, list, tuple)) or v is None else str(v)
                              for k, v in attrs.items()})
    return _LEN.pack(len(body)) + body


def unpack_attrs(buf, off: int) -> tuple[dict, int]:
    """(attributes, offset after them) of the blob at ``off``."""
    (n,) = _LEN.unpack_from(buf, off)
    d = marshal.loads(buf[off + 4:off + 4 + n])
    if type(d) is not dict:
        raise ValueError("attribute blob is not a mapping")
    if None in d.values():
        d = {k: v for k, v in d.items() if v is not None}
    return d, off + 4 + n


class Reqs(Sequence):
    """The requests a step served, as the hooks capture them: ids, tokens computed for each, and the
    ids that produced no token (prefill chunks). Reads as ``(request_id, tokens, has_new_token)``."""

    __slots__ = ("ids", "qs", "quiet")

    def __init__(self, ids, qs, quiet=frozenset()) -> None:
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


# -- named readers -----------------------------------------------------------------------------
class RawStage(NamedTuple):
    key: int
    name: str
    t0: int
    t1: int


class RawStep(NamedTuple):
    key: int
    t0: int
    t1: int
    features: StepFeatures
    requests: tuple[tuple[str, int, bool], ...]  # (request id, tokens this step, produced a token)
    stages: tuple[tuple[str, int, int], ...]  # (name, t0, t1)
    attributes: dict[str, Any]
    device_slot: int  # 0: no device timing; else a DEVICE record with this slot follows


# a request's parent as the ring carries it: (trace id, span id, trace flags, remote[, own])
ParentIds = Union[tuple[int, int, int, bool], tuple[int, int, int, bool, bool]]


class RawRequest(NamedTuple):
    request_id: str
    event: str  # arrive | finish
    t: int
    prompt_tokens: Optional[int]
    max_tokens: Optional[int]
    parent: Optional[tuple[int, int, int, bool, bool]]  # (trace id, span id, trace flags, remote, own)
    status: Optional[str]


class RawSpan(NamedTuple):
    name: str
    t0: int
    t1: int
    attributes: dict[str, Any]


class RawGc(NamedTuple):
    t0: int
    t1: int
    generation: int
    collected: int


class RawDevice(NamedTuple):
    slot: int
    ns: Optional[int]
    timing: str  # event | host | unavailable
    kernel_groups: dict[str, int]
    attributes: dict[str, Any]


class RawMeta(NamedTuple):
    name: str
    value: str


_TRUES = (True,) * 4096
_STAGE_STRUCTS: dict[int, struct.Struct] = {}
_REQ_STRUCTS: dict[int, struct.Struct] = {}
_GROUP_STRUCTS: dict[int, struct.Struct] = {}


def stage_struct(n: int) -> struct.Struct:
    st = _STAGE_STRUCTS.get(n)
    if st is None:
        st = _STAGE_STRUCTS[n] = struct.Struct("<" + STAGE_ITEM * n)
    return st


def requests_struct(n: int) -> struct.Struct:
    st = _REQ_STRUCTS.get(n)
    if st is None:
        st = struct.Struct(f"<{n}I{n}I")
        if len(_REQ_STRUCTS) < 1024:
            _REQ_STRUCTS[n] = st
    return st


_BODY_STRUCTS: dict[tuple, struct.Struct] = {}


def body_struct(ns: int, nreq: int) -> struct.Struct:
    """A STEP record's variable part: ``ns`` STAGE_ITEMs, then ``nreq`` request numbers and token counts."""
    st = _BODY_STRUCTS.get((ns, nreq))
    if st is None:
        st = struct.Struct("<" + STAGE_ITEM * ns + f"{nreq}I{nreq}I")
        if len(_BODY_STRUCTS) < 4096:
            _BODY_STRUCTS[(ns, nreq)] = st
    return st


def group_struct(n: int) -> struct.Struct:
    st = _GROUP_STRUCTS.get(n)
    if st is None:
        st = _GROUP_STRUCTS[n] = struct.Struct("<" + GROUP_ITEM * n)
    return st


def _opt(v: int) -> Optional[int]:
    return None if v == NONE_I64 else v


def decode(buf, off: int, kind: int, s: Callable[[int], str], cached: Optional[Callable[[int], Optional[str]]] = None):
    """The named reader of the record at ``off`` (its header already read: ``kind``); ``s`` resolves
    string numbers (raises KeyError for one that is gone), ``cached`` is a faster lookup of the ones
    already resolved (returns None otherwise)."""
    if kind == STEP:
        (_, _, _, _, _, _, key, t0, t1, phase, has_kv, ns, na, nreq, batch, pre, dec, mx, slot, ctx,
         kv) = STEP_FIXED.unpack_from(buf, off)
        p = off + STEP_FIXED.size
        cached = cached or s
        stages = ()
        reqs = ()
        if ns or nreq:
            flat = body_struct(ns, nreq).unpack_from(buf, p)
            p += 20 * ns + 8 * nreq
            if ns:
                sn = flat[0:3 * ns:3]
                names: list[Any] = list(map(cached, sn))  # all str once no None is left
                if None in names:
                    names = list(map(s, sn))
                stages = tuple(zip(names, flat[1:3 * ns:3], flat[2:3 * ns:3]))
            if nreq:
                nums = flat[3 * ns:3 * ns + nreq]
                rids: list[Any] = list(map(cached, nums))  # all str once no None is left
                if None in rids:
                    rids = list(map(s, nums))
                toks = flat[3 * ns + nreq:]
                if max(toks) >= QUIET:
                    reqs = tuple((r, t & ~QUIET, not t & QUIET) for r, t in zip(rids, toks))
                else:
                    reqs = tuple(zip(rids, toks, _TRUES[:nreq] if nreq <= 4096 else (True,) * nreq))
        attrs = unpack_attrs(buf, p)[0] if na else {}
        feat = StepFeatures(PHASES[phase], batch, pre, dec, ctx, mx, kv if has_kv else None)
        return RawStep(key, t0, t1, feat, reqs, stages, attrs, slot)
    if kind == REQUEST:
        (_, _, _, _, _, _, rid, event, status, has_parent, pflags, t, prompt, mxt, tid,
         sid) = REQUEST_REC.unpack_from(buf, off)
        parent = None
        if has_parent:
            parent = (int.from_bytes(tid, "big"), int.from_bytes(sid, "big"), pflags & 1, bool(pflags & 2),
                      bool(pflags & 4))
        return RawRequest(s(rid), EVENTS[event], t, _opt(prompt), _opt(mxt), parent,
                          STATUSES[status] if status else None)
    if kind == STAGE:
        _, _, _, _, _, _, key, name, t0, t1 = STAGE_REC.unpack_from(buf, off)
        return RawStage(key, s(name), t0, t1)
    if kind == SPAN:
        _, _, _, _, _, _, name, na, t0, t1 = SPAN_FIXED.unpack_from(buf, off)
        attrs = unpack_attrs(buf, off + SPAN_FIXED.size)[0] if na else {}
        return RawSpan(s(name), t0, t1, attrs)
    if kind == GC:
        _, _, _, _, _, _, t0, t1, gen, collected = GC_REC.unpack_from(buf, off)
        return RawGc(t0, t1, gen, collected)
    if kind == DEVICE:
        _, _, _, _, _, _, slot, timing, ng, na, ns = DEVICE_FIXED.unpack_from(buf, off)
        p = off + DEVICE_FIXED.size
        groups = {}
        if ng:
            flat = group_struct(ng).unpack_from(buf, p)
            p += 12 * ng
            groups = {s(flat[i]): flat[i + 1] for i in range(0, 2 * ng, 2)}
        attrs = unpack_attrs(buf, p)[0] if na else {}
        return RawDevice(slot, _opt(ns), TIMINGS[timing], groups, attrs)
    if kind == META:
        _, _, _, _, _, _, name, value = META_REC.unpack_from(buf, off)
        return RawMeta(s(name), s(value))
    raise ValueError(f"unknown record kind {kind}")
