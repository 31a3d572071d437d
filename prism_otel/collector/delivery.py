"""Bookkeeping that makes a persistent pipeline lose nothing and send nothing twice.

* :class:`Ledger` tracks, for every log record (``seq``) the pipeline has read, how many span
  deliveries are still owed (spans x persistent exporters). When the lowest records are paid off
  the log's cursor moves past them; after a crash everything at or above the cursor is replayed.
* :class:`DeliveredIDs` remembers, per persistent exporter, the spans already delivered (and, in
  memory, those in flight), as 64-bit keys of (trace id, span id) in a journal next to the log.
  Replayed records and a client's re-sent request (its ack was lost in a crash) are filtered against
  it, so each span id reaches the backend once. The one gap: a crash after the backend accepted a
  request and before the journal write that follows it (microseconds) re-sends that request.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict, deque
from typing import Dict, Iterable, List

_KEY = struct.Struct("<Q")


_MASK = (1 << 64) - 1


def span_key(span) -> int:
    """64 bits of (trace id, span id): collisions among the ~10^5 keys kept are ~10^-9 likely."""
    tid = span.trace_id
    return (int.from_bytes(span.span_id, "little") ^ ((int.from_bytes(tid[:8], "little") * 0x9E3779B97F4A7C15) & _MASK)
            ^ int.from_bytes(tid[8:], "little"))


def request_keys(req) -> List[int]:
    return [span_key(s) for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


class DeliveredIDs:
    """Bounded set of delivered / in-flight span keys, journaled to ``path`` (8 bytes per key)."""

    def __init__(self, path: str, capacity: int = 1 << 18) -> None:
        self.path = path
        self.capacity = capacity
        self._lock = threading.Lock()
        self._set = set()
        self._order: deque = deque()
        self._journal_entries = 0
        if os.path.exists(path):
            with open(path, "rb") as fh:
                data = fh.read()
            data = data[: len(data) - len(data) % 8]
            for (k,) in _KEY.iter_unpack(data[-8 * capacity:]):
                self._add(k)
            self._journal_entries = len(data) // 8
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def _add(self, k: int) -> None:
        if k in self._set:
            return
        self._set.add(k)
        self._order.append(k)
        if len(self._order) > self.capacity:
            self._set.discard(self._order.popleft())

    def __contains__(self, k: int) -> bool:
        return k in self._set

    def __len__(self) -> int:
        return len(self._set)

    def reserve(self, keys: Iterable[int]) -> List[bool]:
        """Mark keys in flight; returns, per key, whether it was already delivered or in flight."""
        with self._lock:
            out = []
            for k in keys:
                dup = k in self._set
                out.append(dup)
                if not dup:
                    self._add(k)
            return out

    def release(self, keys: Iterable[int]) -> None:
        """A send failed for good: these keys may come again (e.g. a client retry)."""
        with self._lock:
            for k in keys:
                self._set.discard(k)

    def delivered(self, keys: List[int]) -> None:
        if not keys:
            return
        data = b"".join(_KEY.pack(k) for k in keys)
        with self._lock:
            for k in keys:
                self._add(k)
            self._fh.write(data)
            self._journal_entries += len(keys)
            if self._journal_entries > 4 * self.capacity:
                self._compact()

    def _compact(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(b"".join(_KEY.pack(k) for k in self._order))
        self._fh.close()
        os.replace(tmp, self.path)
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._journal_entries = len(self._order)

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


class Ledger:
    """Owed deliveries per log record; tells the log how far it may commit. Thread-safe."""

    def __init__(self, start: int) -> None:
        self._lock = threading.Lock()
        self._owed: "OrderedDict[int, int]" = OrderedDict()
        self._next = start  # the next seq the pipeline will open

    def open(self, seq: int, owed: int) -> None:
        with self._lock:
            self._next = seq + 1
            if owed > 0:
                self._owed[seq] = owed

    def pay(self, sources: Dict[int, int], per_source: int = 1) -> None:
        with self._lock:
            for seq, n in sources.items():
                left = self._owed.get(seq)
                if left is not None:
                    self._owed[seq] = left - n * per_source

    def committable(self) -> int:
        """Everything below the returned seq is fully delivered."""
        with self._lock:
            owed = self._owed
            while owed:
                seq, left = next(iter(owed.items()))
                if left > 0:
                    return seq
                owed.popitem(last=False)
            return self._next

    @property
    def open_records(self) -> int:
        return len(self._owed)
