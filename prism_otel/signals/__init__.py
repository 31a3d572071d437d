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

Sources (:func:`default_sources`): :class:`GcPauses` (``gc.*``, from the ``gc.callbacks`` hook of
:mod:`prism_otel.signals.gc_hook`, the only part that runs on the engine's threads),
:class:`~prism_otel.signals.proc.EngineThreads` (``cpu.*``: run-queue wait, on-CPU time,
involuntary switches, stops), :class:`~prism_otel.signals.proc.HostSignals` (``cgroup.*``, ``psi.*``,
``host.*``, ``io.*``) and :class:`~prism_otel.signals.nvml.NvmlSignals` (``gpu.*``). The place that
builds a pipeline calls :func:`start` once.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Optional, Protocol, runtime_checkable

from prism_otel import semconv as sc

logger = logging.getLogger(__name__)


@runtime_checkable
class SignalSource(Protocol):
    def poll(self, now_ns: int) -> None:
        """Read what is new (called by the pipeline once per wake-up; cheap, never blocking long)."""

    def overlap(self, start_ns: int, end_ns: int) -> dict[str, float]:
        """What this source saw inside ``[start_ns, end_ns]`` (epoch ns): signal name -> number."""
        ...


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

    def overlap(self, start_ns: int, end_ns: int) -> dict[str, float]:
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


def _interval_ms() -> float:
    try:
        return max(1.0, float(os.environ.get(sc.ENV_SIGNALS_INTERVAL_MS, "20")))
    except ValueError:
        return 20.0


def default_sources(engine_pid: int, engine_tid: Optional[int] = None, min_interval_ms: Optional[float] = None,
                    gpu: bool = True) -> list[SignalSource]:
    """The evidence sources for the engine process ``engine_pid`` (its descendants included), besides
    the GC pauses every pipeline already has: the engine's threads and the host from /proc (Linux), and
    the engine's GPU from NVML (``gpu``; "unavailable" without the library or a driver).
    ``PRISM_OTEL_SIGNALS=0`` (or ``gc``): none."""
    if os.environ.get(sc.ENV_SIGNALS, "1").strip().lower() in ("0", "gc", "false", "off"):
        return []
    iv = _interval_ms() if min_interval_ms is None else min_interval_ms
    out: list[SignalSource] = []
    try:
        from prism_otel.signals import proc

        out += proc.sources(engine_pid, engine_tid, min_interval_ms=iv)
    except Exception:  # noqa: BLE001 - evidence is optional
        logger.warning("prism-otel signals: /proc sources unavailable", exc_info=True)
    if gpu:
        try:
            from prism_otel.signals.nvml import NvmlSignals

            src = NvmlSignals(engine_pid, min_interval_ms=max(iv, 100.0))
            if not src.disabled:
                out.append(src)
        except Exception:  # noqa: BLE001
            logger.debug("prism-otel signals: NVML source failed", exc_info=True)
    return out


def start(pipeline, engine_pid: Optional[int] = None, recorder=None, engine_tid: Optional[int] = None) -> list:
    """Wire the evidence for one pipeline (the one call the runtime and the companion make).

    ``recorder``: the engine process's hot-path recorder, when this runs in the engine process: the
    ``gc.callbacks`` hook is installed to write GC pauses to it. ``pipeline``: a
    :class:`~prism_otel.pipeline.Pipeline` (anything without ``signal_sources``, e.g. the engine side's
    companion handle, gets none); the sources of :func:`default_sources` are added to it once. Returns the
    sources added. Never raises."""
    added: list = []
    try:
        if recorder is not None:
            from prism_otel.signals import gc_hook

            gc_hook.install(recorder)
        have = getattr(pipeline, "signal_sources", None)
        if have is not None and not any(getattr(s, "_prism_default", False) for s in have):
            added = default_sources(os.getpid() if engine_pid is None else engine_pid, engine_tid)
            for s in added:
                s._prism_default = True
            have.extend(added)
    except Exception:  # noqa: BLE001 - evidence is optional; tracing goes on without it
        logger.warning("prism-otel signals: not started", exc_info=True)
    return added


def unavailable(sources) -> dict[str, str]:
    """What the sources could not read, and why (each said once in the log too)."""
    out: dict[str, str] = {}
    for s in sources:
        out.update(getattr(s, "unavailable", {}) or {})
    return out
