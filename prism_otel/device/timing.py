"""Device time of a step: one event pair around the forward, resolved on the pipeline thread.

Uses torch's generic ``torch.Event`` (CUDA, ROCm, XPU, NPU, MPS alike) recorded on the stream the
engine computes on (the current stream unless the instrumentation names one). The engine thread
only records the two events; the pipeline thread polls ``query()`` and reads ``elapsed_time`` once
the end event completed, so the engine never synchronises. Events come from bounded pools and go
back to them after reading. Without an accelerator there are no device events: Sentinel steps use
the host clock of the forward, and DeepDive uses :class:`HostEvent` (the same interface on the
host clock), so every code path also runs, and is tested, on a CPU.

``begin`` is also where a DeepDive burst starts: when one is armed (one attribute read per step),
the step gets a kernel-group timeline instead of a plain pair (see :mod:`prism_otel.device.deepdive`).
This module imports nothing of ours: the burst controller registers itself here
(:func:`register_burst`) when :mod:`~prism_otel.device.deepdive` is imported; until then no burst can be
armed, and a stand-in that never is takes its place.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import Optional

_POOL_MAX = 256
_perf_ns = time.perf_counter_ns

# device type -> index of the device the engine's model last ran on (read by the health sampler)
DEVICE_INDEX: dict[str, int] = {}


class HostEvent:
    """A stand-in for ``torch.Event`` on the host clock: recording reads ``perf_counter_ns``."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0

    def record(self, stream=None) -> None:
        self.t = _perf_ns()

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) / 1e6  # ms, as torch.Event does


def record_on(event, stream) -> None:
    """Record ``event`` on ``stream`` (None: the current stream)."""
    if stream is None:
        event.record()
        return
    try:
        event.record(stream)
    except TypeError:  # an event type whose record() takes no foreign stream object
        import torch

        acc_stream = getattr(torch.accelerator, "stream", None)  # not in every torch release
        with acc_stream(stream) if acc_stream is not None else torch.cuda.stream(stream):
            event.record()


class EventPair:
    __slots__ = ("start", "end", "pool", "tries", "stream")

    def __init__(self, start, end, pool) -> None:
        self.start = start
        self.end = end
        self.pool = pool
        self.tries = 0
        self.stream = None

    def finish(self) -> None:
        """Hot path: record the end event on the stream the start went to."""
        record_on(self.end, self.stream)

    def ready(self) -> bool:
        try:
            return bool(self.end.query())
        except Exception:  # noqa: BLE001
            return True

    def resolve(self):
        """(device ns, "event"), or (None, "pending") when the events have not completed."""
        if not self.ready():
            self.tries += 1
            return None, "pending"
        try:
            ns = int(self.start.elapsed_time(self.end) * 1e6)
        except Exception:  # noqa: BLE001 - e.g. events from a reset device
            ns = None
        self.pool.release(self)
        return ns, "event"


def make_event(device_type: Optional[str]):
    """One timing event for ``device_type`` (a :class:`HostEvent` for None / "cpu")."""
    if device_type in (None, "cpu"):
        return HostEvent()
    import torch

    return torch.Event(device=device_type, enable_timing=True)


class EventPool:
    """Bounded pool of timing event pairs for one device type. ``acquire`` never blocks: when the
    pool is exhausted (the pipeline fell behind) it returns None and the step gets host timing."""

    def __init__(self, device_type: str, size: int = _POOL_MAX) -> None:
        self.device_type = device_type
        self._free: deque = deque()
        self._lock = threading.Lock()
        self.created = 0
        self.size = size
        self.exhausted = 0

    def acquire(self) -> Optional[EventPair]:
        try:
            return self._free.popleft()
        except IndexError:
            pass
        with self._lock:
            if self.created >= self.size:
                self.exhausted += 1
                return None
            self.created += 1
        return EventPair(make_event(self.device_type), make_event(self.device_type), self)

    def release(self, pair: EventPair) -> None:
        pair.tries = 0
        self._free.append(pair)


class EventBank:
    """Bounded pool of single events (DeepDive boundaries). ``take`` returns None when exhausted."""

    def __init__(self, device_type: Optional[str], size: int = 16384) -> None:
        self.device_type = device_type
        self._free: deque = deque()
        self._lock = threading.Lock()
        self.created = 0
        self.size = size
        self.exhausted = 0

    def take(self):
        try:
            return self._free.popleft()
        except IndexError:
            pass
        with self._lock:
            if self.created >= self.size:
                self.exhausted += 1
                return None
            self.created += 1
        return make_event(self.device_type)

    def give(self, events) -> None:
        self._free.extend(events)


_pools: dict[str, EventPool] = {}
_banks: dict[Optional[str], EventBank] = {}


def accelerator_of(model) -> Optional[str]:
    """The accelerator type a model runs on, or None for CPU / no torch. Notes the device index."""
    if "torch" not in sys.modules:
        return None
    try:
        dev = getattr(model, "device", None)
        if dev is None and hasattr(model, "parameters"):  # a plain nn.Module: where its weights are
            p = next(model.parameters(), None)
            dev = None if p is None else p.device
        t = getattr(dev, "type", None)
        if dev is None or t in (None, "cpu", "meta"):
            return None
        if dev.index is not None:
            DEVICE_INDEX[t] = dev.index
        return t
    except Exception:  # noqa: BLE001
        return None


def pool_for(device_type: str) -> EventPool:
    p = _pools.get(device_type)
    if p is None:
        p = _pools[device_type] = EventPool(device_type)
    return p


def bank_for(device_type: Optional[str]) -> EventBank:
    b = _banks.get(device_type)
    if b is None:
        b = _banks[device_type] = EventBank(device_type)
    return b


class _NoBurst:
    """The burst controller until DeepDive registers: never armed."""

    pending = 0

    def begin_step(self, device_type, model, stream):
        return None


_DD = _NoBurst()


def register_burst(controller) -> None:
    """Make ``controller`` (``pending``: armed steps left; ``begin_step(device_type, model, stream)``: a
    kernel-group timeline or None) the one :func:`begin` asks. DeepDive calls this once, at import."""
    global _DD
    _DD = controller


def begin(device_type: Optional[str], model=None, stream=None):
    """Hot path: the step's pending device timing, its start recorded (no synchronisation).

    A plain :class:`EventPair` (None without an accelerator), or, on a DeepDive step, a kernel-group
    timeline of ``model``. ``stream``: the stream the engine computes on (None: the current one).
    """
    if _DD.pending and model is not None:
        tl = _DD.begin_step(device_type, model, stream)
        if tl is not None:
            return tl
    if device_type is None:
        return None
    pair = pool_for(device_type).acquire()
    if pair is not None:
        pair.stream = stream
        record_on(pair.start, stream)
    return pair


def end(pair) -> None:
    """Hot path: record the end of the step's device timing."""
    if pair is not None:
        pair.finish()
