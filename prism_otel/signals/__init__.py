"""Evidence over a step's time span, joined to the step when the pipeline builds it.

A *signal source* keeps a short, timestamped history of something it observes (garbage-collection
pauses of the engine process, its threads' scheduler counters, the cgroup's throttling, ...) and
answers, for a step's ``[start_ns, end_ns]`` (epoch ns), what happened inside it. The pipeline
(in-process thread or companion) polls every source once per wake-up, off the engine's hot path,
and merges each source's answer into ``StepRecord.signals``; the span carries it as
``prism.signal.<name>`` attributes, so the collector sees the same evidence and reaches the same
root cause.

A source that cannot read what it needs (no permission, not Linux, no GPU) says so once and answers
nothing from then on.
"""

from __future__ import annotations

from collections import deque
from typing import Dict, Protocol, runtime_checkable

from prism_otel import semconv as sc


@runtime_checkable
class SignalSource(Protocol):
    def poll(self, now_ns: int) -> None:
        """Read what is new (called by the pipeline once per wake-up; cheap, never blocking long)."""

    def overlap(self, start_ns: int, end_ns: int) -> Dict[str, float]:
        """What this source saw inside ``[start_ns, end_ns]`` (epoch ns): signal name -> number."""


class GcPauses:
    """Garbage-collection pauses of the engine process, as the hooks recorded them (``GC`` records on
    the ring), in epoch ns. Bounded: the oldest pauses go first."""

    __slots__ = ("_pauses",)

    def __init__(self, capacity: int = 4096) -> None:
        self._pauses: deque = deque(maxlen=capacity)

    def add(self, t0_ns: int, t1_ns: int, generation: int) -> None:
        self._pauses.append((t0_ns, t1_ns, generation))

    def poll(self, now_ns: int) -> None:
        return None

    def overlap(self, start_ns: int, end_ns: int) -> Dict[str, float]:
        ms = 0.0
        n = 0
        for t0, t1, _gen in reversed(self._pauses):
            if t1 < start_ns:
                break
            if t0 > end_ns:
                continue
            ms += (min(t1, end_ns) - max(t0, start_ns)) / 1e6
            n += 1
        if not n:
            return {}
        return {sc.SIGNAL_GC_MS: round(ms, 4), sc.SIGNAL_GC_COUNT: n}
