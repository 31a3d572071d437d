"""`StepRecord`, the contract between every part, and the hot-path `Recorder`.

The hot path (the engine's own threads) only reads a clock and appends a tuple to a bounded ring:
no span objects, no locks beyond the append, no I/O, never raising. The pipeline thread drains
the ring and builds `StepRecord`s (see :mod:`prism_otel.pipeline`).

Raw records on the ring are plain tuples whose first item says what they are:

* ``(STAGE, key, name, t0, t1)``: a host stage of the step identified by ``key``;
* ``(STEP, key, t0, t1, features, request_ids, device, stages[, attrs])``: the end of a step;
  ``features`` is a :class:`StepFeatures`, ``request_ids`` a tuple of ``(request_id, tokens,
  has_new_token)``, ``device`` a pending device timing (or None), ``stages`` a tuple of
  ``(name, t0, t1)`` (or None), ``attrs`` an optional dict of engine-specific step attributes;
* ``(REQUEST, request_id, event, t, info)``: a request lifecycle event (``arrive``, ``schedule``,
  ``first_token``, ``finish``); ``info`` is a small dict or None;
* ``(SPAN, name, t0, t1, attrs)``: a host stage that ran outside any step of this process (e.g.
  vLLM's front-end output processing, in another process than the engine loop); it becomes a root
  ``prism.stage.<name>`` span joined to its step by attributes (request ids, engine timestamps).
* ``(GC, t0, t1, generation, collected)``: a garbage-collection pause of the engine process
  (``gc.callbacks``); the pipeline joins pauses to the steps they overlap (``StepRecord.signals``).

Times are ``time.perf_counter_ns()`` values; :func:`to_epoch_ns` maps them to wall-clock epoch
nanoseconds with one offset taken at import, so a wall-clock jump never bends a duration.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Tuple

STAGE = 0
STEP = 1
REQUEST = 2
SPAN = 3
GC = 4

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
    slo_violations: Tuple[str, ...] = ()
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
    stages: Mapping[str, Tuple[int, int]] = field(default_factory=dict)  # name -> (start_ns, end_ns), epoch
    kernel_groups: Mapping[str, int] = field(default_factory=dict)  # group -> device ns
    device_ns: Optional[int] = None
    request_ids: Tuple[str, ...] = ()
    verdict: Optional[Verdict] = None
    attributes: Mapping[str, Any] = field(default_factory=dict)  # engine-specific extras
    ranks: Tuple["StepRecord", ...] = ()  # tensor parallel: each rank's record of this step (prism_otel.device.ranks)
    change: Optional[BatchChange] = None  # what changed since the previous step (None: unknown)
    signals: Mapping[str, float] = field(default_factory=dict)  # host/device evidence over the step (semconv.SIGNAL_*)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


class Recorder:
    """Bounded ring of raw records, written by engine threads, drained by the pipeline thread.

    ``deque.append`` and ``popleft`` are atomic under the GIL, so writers take no lock. When the
    ring is full the oldest record is overwritten and counted in :attr:`dropped`.
    """

    __slots__ = ("_ring", "_cap", "dropped", "wakeup")

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 16:
            raise ValueError(f"ring capacity must be >= 16, got {capacity}")
        self._ring: deque = deque(maxlen=capacity)
        self._cap = capacity
        self.dropped = 0
        self.wakeup = None  # optional threading.Event set by the pipeline

    def emit(self, record: tuple) -> None:
        ring = self._ring
        if len(ring) == self._cap:
            self.dropped += 1
        ring.append(record)

    def stage(self, key: Any, name: str, t0: int, t1: int) -> None:
        self.emit((STAGE, key, name, t0, t1))

    def step(self, key: Any, t0: int, t1: int, features: StepFeatures, request_ids=(), device=None,
             stages=None) -> None:
        self.emit((STEP, key, t0, t1, features, request_ids, device, stages))

    def request(self, request_id: str, event: str, t: int, info: Optional[dict] = None) -> None:
        self.emit((REQUEST, request_id, event, t, info))

    def gc_pause(self, t0: int, t1: int, generation: int, collected: int = 0) -> None:
        self.emit((GC, t0, t1, generation, collected))

    def drain(self, limit: int = 4096) -> list:
        out = []
        ring = self._ring
        pop = ring.popleft
        try:
            for _ in range(limit):
                out.append(pop())
        except IndexError:
            pass
        return out

    def __len__(self) -> int:
        return len(self._ring)


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
    slo_violations: Tuple[str, ...] = ()

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
