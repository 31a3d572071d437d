"""A signal source built on cumulative counters read at each poll.

Between two readings at ``t0`` and ``t1`` each counter moved by some delta; that delta is taken as
spread evenly over ``[t0, t1]`` and a step gets the share its span overlaps. The part of a step after
the latest reading gets the rate of the latest interval (an estimate: a fault lasts far longer than
one interval). A step that ends after the latest reading makes the source read again first, at most
once per ``min_interval``, so a slow step is covered by readings of its own.

Gauges (values that are not counters, e.g. a clock frequency) are reported as the latest reading
at or before the step's end.

A reader that fails is reported once (logged, and kept in :attr:`IntervalSource.unavailable`) and
skipped from then on; the others go on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Optional

from prism_otel.record import clock_ns, to_epoch_ns

logger = logging.getLogger(__name__)


def now_epoch_ns() -> int:
    return to_epoch_ns(clock_ns())


class IntervalSource:
    """Base class: subclasses implement :meth:`read` (and may override :meth:`derive`)."""

    gauges: frozenset = frozenset()  # keys reported as the latest value, not spread over time
    ndigits = 3

    def __init__(self, min_interval_ms: float = 20.0, keep: int = 1024) -> None:
        self.min_interval_ns = int(min_interval_ms * 1e6)
        self._iv: deque = deque(maxlen=keep)  # (t0, t1, deltas dict, gauges dict)
        self._prev: Optional[dict] = None
        self._prev_t = 0
        self.unavailable: dict[str, str] = {}  # reader -> why (reported once)
        self.polls = 0
        self.errors = 0
        self.active = False  # reads start with the first step asked about (a process with no steps reads nothing)

    # -- to implement ------------------------------------------------------------------------------
    def read(self) -> Optional[dict]:
        """Cumulative counters (and gauges) now; None when nothing can be read any more."""
        raise NotImplementedError

    def derive(self, prev: dict, cur: dict, dt_ns: int) -> dict:
        """Deltas over one interval (default: counter differences, never negative)."""
        out = {}
        for k, v in cur.items():
            if k in self.gauges or k.startswith("_"):
                continue
            p = prev.get(k)
            if p is not None:
                out[k] = max(0.0, v - p)
        return out

    # -- helpers for subclasses ------------------------------------------------------------------
    def give_up(self, reader: str, why: str) -> None:
        """Say once that ``reader`` cannot be read, and skip it from now on."""
        if reader not in self.unavailable:
            self.unavailable[reader] = why
            logger.info("prism-otel signals: %s unavailable (%s); going on without it", reader, why)

    @property
    def disabled(self) -> bool:
        return False

    # -- the SignalSource protocol -------------------------------------------------------------------
    def poll(self, now_ns: int) -> None:
        if not self.active or self.disabled or (
                self._prev is not None and now_ns - self._prev_t < self.min_interval_ns):
            return
        try:
            cur = self.read()
        except Exception:  # noqa: BLE001 - a source must never break the pipeline
            self.errors += 1
            logger.debug("signal source %s failed", type(self).__name__, exc_info=True)
            cur = None
        self.polls += 1
        if cur is not None:
            prev = self._prev
            if prev is not None and now_ns > self._prev_t:
                d = self.derive(prev, cur, now_ns - self._prev_t)
                g = {k: cur[k] for k in self.gauges if k in cur}
                self._iv.append((self._prev_t, now_ns, d, g))
            self._prev, self._prev_t = cur, now_ns

    def overlap(self, start_ns: int, end_ns: int) -> dict[str, float]:
        if self.disabled:
            return {}
        self.active = True
        if end_ns > self._prev_t:
            self.poll(now_epoch_ns())  # the step ended after the latest reading: read now (rate-limited)
        iv = self._iv
        if not iv or end_ns <= start_ns:
            return {}
        # The common case, a step inside one interval (the companion reads once per wake-up, after the
        # steps it then handles): that interval's deltas times the share, as the general loop below
        # computes them (the same floats), without its accumulation.
        for t0, t1, d, g in reversed(iv):
            if t0 < end_ns:
                if t0 <= start_ns and end_ns <= t1:
                    frac = (end_ns - start_ns) / (t1 - t0)
                    nd = self.ndigits
                    out = {k: round(v * frac, nd) if v else 0.0 for k, v in d.items()}
                    if g:
                        out.update(g)
                    return out
                break
        acc: dict[str, float] = {}
        gauges: Optional[dict] = None
        covered_to = start_ns
        for t0, t1, d, g in reversed(iv):
            if t1 <= start_ns:
                break
            if gauges is None and t0 < end_ns:
                gauges = g
            if t0 >= end_ns:
                continue
            frac = (min(t1, end_ns) - max(t0, start_ns)) / (t1 - t0)
            for k, v in d.items():
                acc[k] = acc.get(k, 0.0) + v * frac
            covered_to = max(covered_to, min(t1, end_ns))
        t0, t1, d, g = iv[-1]
        if end_ns > t1:  # after the latest reading: the latest interval's rate
            frac = (end_ns - max(t1, start_ns)) / (t1 - t0)
            for k, v in d.items():
                acc[k] = acc.get(k, 0.0) + v * frac
            if gauges is None:
                gauges = g
        if gauges is None:
            return {}
        out = {k: round(v, self.ndigits) for k, v in acc.items()}
        out.update(gauges)
        return out

    def stats(self) -> dict:
        return {"polls": self.polls, "errors": self.errors, "unavailable": dict(self.unavailable)}


_FDS: dict[str, int] = {}  # /proc and /sys files kept open between readings (path -> fd)
_FDS_MAX = 64  # the readings of one engine need about 20; a whole-thread scan may pass this (all closed then)
_FDS_LOCK = threading.Lock()
_KERNEL_FILES = ("/proc/", "/sys/")


def read_small(path: str, size: int = 4096) -> bytes:
    """One read of a small /proc or /sys file (no Python file object: about 4x cheaper).

    Kernel files are kept open and read again with ``pread`` at offset 0, which makes the kernel
    render them anew: one system call per reading instead of three. A file that fails or reads empty
    (its thread or process is gone) is opened again by path, as a first reading is; at most
    ``_FDS_MAX`` stay open."""
    if not path.startswith(_KERNEL_FILES):
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, size)
        finally:
            os.close(fd)
    with _FDS_LOCK:
        fd = _FDS.pop(path, None)
    if fd is not None:
        try:
            b = os.pread(fd, size, 0)
        except OSError:
            b = b""
        if b:
            with _FDS_LOCK:
                if path not in _FDS:
                    _FDS[path] = fd
                    return b
            os.close(fd)
            return b
        os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        b = os.pread(fd, size, 0)
    except BaseException:
        os.close(fd)
        raise
    with _FDS_LOCK:
        if len(_FDS) >= _FDS_MAX:
            for old in _FDS.values():
                os.close(old)
            _FDS.clear()
        if path not in _FDS:
            _FDS[path] = fd
            return b
    os.close(fd)
    return b
