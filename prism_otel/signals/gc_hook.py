"""The engine process's garbage-collection pauses, recorded through the ring (``gc.callbacks``).

This is the only piece of the evidence that runs on the engine's own threads: the interpreter calls
the hook at the start and at the end of every collection, on whichever thread collects. At the
start it reads the clock; at the end it appends one ``GC`` record (start, end, generation,
objects collected) to the recorder, the same bounded append every hook makes. It never raises (an
error is counted and, after a hundred, the hook removes itself). Its cost is measured by
``bench/gc_hook.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.record import clock_ns

logger = logging.getLogger(__name__)


class GcHook:
    """One installed ``gc.callbacks`` entry writing to ``recorder``."""

    __slots__ = ("recorder", "errors", "pauses", "_t0", "__weakref__")

    def __init__(self, recorder) -> None:
        self.recorder = recorder
        self.errors = 0
        self.pauses = 0
        self._t0 = 0  # collections do not nest: the interpreter holds the lock for a whole one

    def __call__(self, phase: str, info: dict) -> None:
        try:
            if phase == "start":
                self._t0 = clock_ns()
                return
            t0 = self._t0
            if t0:
                self._t0 = 0
                self.recorder.gc_pause(t0, clock_ns(), info["generation"], info["collected"])
                self.pauses += 1
        except Exception:  # noqa: BLE001 - never raise into a collection
            self.errors += 1
            if self.errors >= 100:
                uninstall()


_lock = threading.Lock()
_hook: Optional[GcHook] = None
_pid = 0


def install(recorder) -> Optional[GcHook]:
    """Install the hook for ``recorder`` (idempotent per process; ``PRISM_OTEL_GC_HOOK=0`` turns it off)."""
    global _hook, _pid
    if os.environ.get(sc.ENV_GC_HOOK, "1") == "0":
        return None
    with _lock:
        if _hook is not None and _pid == os.getpid():
            _hook.recorder = recorder
            return _hook
        if _hook is not None:  # inherited through a fork: the same list, a new process
            _remove(_hook)
        _hook = GcHook(recorder)
        _pid = os.getpid()
        gc.callbacks.append(_hook)
        return _hook


def _remove(h) -> None:
    try:
        gc.callbacks.remove(h)
    except ValueError:
        pass


def uninstall() -> None:
    global _hook
    h = _hook
    _hook = None
    if h is not None:
        _remove(h)
        if h.errors >= 100:
            logger.warning("prism-otel: the gc.callbacks hook failed %d times and removed itself", h.errors)


def installed() -> Optional[GcHook]:
    return _hook
