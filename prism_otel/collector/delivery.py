"""Bookkeeping that makes a persistent pipeline lose nothing and send nothing twice.

* :class:`Ledger` tracks, for every log record (``seq``) the pipeline has read, how many span
  deliveries are still owed (spans x persistent exporters). When the lowest records are paid off
  the log's cursor moves past them; after a crash everything at or above the cursor is replayed.
* :class:`DeliveredIDs` remembers, per persistent exporter, the spans already delivered (and, in
  memory, those in flight), keyed by the exact (trace id, span id) bytes, in a journal next to the
  log. Replayed records and a client's re-sent request (its ack was lost in a crash) are filtered against
  it, so each span id reaches the backend once. The key is the ids themselves, not a hash of them:
  ids that look alike (B3/Jaeger 64-bit trace ids zero-padded, span id = the trace id's low half) are
  still distinct spans. The one gap: a crash after the backend accepted a request and before the
  journal write that follows it (microseconds) re-sends that request.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable

KEY_BYTES = 24  # trace id (16) + span id (8)


def span_key(span) -> bytes:
    """The span's identity: its trace id and span id, exactly (24 bytes for valid ids)."""
    return bytes(span.trace_id) + bytes(span.span_id)


def request_keys(req) -> list[bytes]:
    return [span_key(s) for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _open_append(path: str):
    """Unbuffered append, created owner-only (0600): span ids are the tenant's data."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab", buffering=0)


class DeliveredIDs:
    """Bounded set of delivered / in-flight span keys, journaled to ``path`` (24 bytes per key)."""

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
            data = data[: len(data) - len(data) % KEY_BYTES]  # a torn last write
            tail = data[-KEY_BYTES * capacity:]
            for i in range(0, len(tail), KEY_BYTES):
                self._add(tail[i:i + KEY_BYTES])
            self._journal_entries = len(data) // KEY_BYTES
        self._fh = _open_append(path)

    def _add(self, k: bytes) -> None:
        if k in self._set:
            return
        self._set.add(k)
        self._order.append(k)
        if len(self._order) > self.capacity:
            self._set.discard(self._order.popleft())

    def __contains__(self, k: bytes) -> bool:
        return k in self._set

    def __len__(self) -> int:
        return len(self._set)

    def reserve(self, keys: Iterable[bytes]) -> list[bool]:
        """Mark keys in flight; returns, per key, whether it was already delivered or in flight."""
        with self._lock:
            out = []
            for k in keys:
                dup = k in self._set
                out.append(dup)
                if not dup:
                    self._add(k)
            return out

    def release(self, keys: Iterable[bytes]) -> None:
        """A send failed for good: these keys may come again (e.g. a client retry)."""
        with self._lock:
            for k in keys:
                self._set.discard(k)

    def delivered(self, keys: list[bytes]) -> None:
        if not keys:
            return
        data = b"".join(k for k in keys if len(k) == KEY_BYTES)
        with self._lock:
            for k in keys:
                self._add(k)
            self._fh.write(data)
            self._journal_entries += len(keys)
            if self._journal_entries > 4 * self.capacity:
                self._compact()

    def _compact(self) -> None:
        tmp = self.path + ".tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(b"".join(self._order))
        self._fh.close()
        os.replace(tmp, self.path)
        self._fh = _open_append(self.path)
        self._journal_entries = len(self._order)

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


class Ledger:
    """Owed deliveries per log record; tells the log how far it may commit. Thread-safe."""

    def __init__(self, start: int) -> None:
        self._lock = threading.Lock()
        self._owed: OrderedDict[int, int] = OrderedDict()
        self._next = start  # the next seq the pipeline will open

    def open(self, seq: int, owed: int) -> None:
        with self._lock:
            self._next = seq + 1
            if owed > 0:
                self._owed[seq] = owed

    def pay(self, sources: dict[int, int], per_source: int = 1) -> None:
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
