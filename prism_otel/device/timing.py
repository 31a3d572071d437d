"""Device time of a step: one event pair around the forward, resolved on the pipeline thread.

Uses torch's generic ``torch.Event`` (CUDA, ROCm, XPU, NPU, MPS alike) recorded on the current
stream of the model's device. The engine thread only records the two events; the pipeline thread
polls ``query()`` and reads ``elapsed_time`` once the end event completed, so the engine never
synchronises. Events come from a bounded pool and go back to it after reading. On CPU (or when
torch has no accelerator) there are no events: the pipeline uses the host clock of the forward.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from typing import Optional

_POOL_MAX = 256


class EventPair:
    __slots__ = ("start", "end", "pool", "tries")

    def __init__(self, start, end, pool) -> None:
        self.start = start
        self.end = end
        self.pool = pool
        self.tries = 0

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


class EventPool:
    """Bounded pool of timing events for one device type. ``acquire`` never blocks: when the pool
    is exhausted (the pipeline fell behind) it returns None and the step gets host timing."""

    def __init__(self, device_type: str, size: int = _POOL_MAX) -> None:
        import torch

        self._torch = torch
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
        Event = self._torch.Event
        return EventPair(Event(device=self.device_type, enable_timing=True),
                         Event(device=self.device_type, enable_timing=True), self)

    def release(self, pair: EventPair) -> None:
        self._free.append(pair)


_pools = {}


def accelerator_of(model) -> Optional[str]:
    """The accelerator type a model runs on, or None for CPU / no torch."""
    if "torch" not in sys.modules:
        return None
    try:
        dev = getattr(model, "device", None)
        t = getattr(dev, "type", None)
        return None if t in (None, "cpu", "meta") else t
    except Exception:  # noqa: BLE001
        return None


def pool_for(device_type: str) -> EventPool:
    p = _pools.get(device_type)
    if p is None:
        p = _pools[device_type] = EventPool(device_type)
    return p


def begin(device_type: Optional[str]) -> Optional[EventPair]:
    """Hot path: record the start event on the current stream (no synchronisation)."""
    if device_type is None:
        return None
    pair = pool_for(device_type).acquire()
    if pair is not None:
        pair.start.record()
    return pair


def end(pair: Optional[EventPair]) -> None:
    if pair is not None:
        pair.end.record()
