"""What every exporter shares: the Collector's ``sending_queue`` and ``retry_on_failure``.

An exporter implements ``send(item)`` (one attempt; raise :class:`Retryable` or
:class:`~prism_otel.collector.errors.PermanentError`); :class:`QueuedExporter` runs it behind a
queue bounded in requests or spans (``queue_size``, ``sizer``) and in bytes (its share of the memory budget, queued and in
flight together: :mod:`prism_otel.collector.memory`) with ``num_consumers`` threads, retrying with jittered exponential backoff (the
server's RetryInfo / Retry-After wins when longer) until ``max_elapsed_time``.

Keys and defaults are the Collector's exporterhelper ones. ``sending_queue.storage`` names a
``file_storage`` extension: the pipeline then keeps its data in a log on disk until this exporter
has delivered it (see :mod:`prism_otel.collector.pipeline`); a full queue then holds the pipeline
back (the receivers push back on senders) instead of dropping.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from prism_otel import semconv as sc
from prism_otel.collector.decode import Duration, check
from prism_otel.collector.errors import PermanentError
from prism_otel.collector.memory import outgoing_bytes

logger = logging.getLogger(__name__)

Done = Callable[[bool], None]


@dataclass
class SendingQueueConfig:
    enabled: bool = True
    num_consumers: int = 10
    queue_size: int = 1000
    sizer: Literal["requests", "items"] = "requests"  # what queue_size counts: requests, or spans in them
    block_on_overflow: bool = False
    storage: str = ""

    def validate(self) -> None:
        check(self.num_consumers >= 1, "num_consumers", "must be at least 1")
        check(self.queue_size >= 1, "queue_size", "must be at least 1")


@dataclass
class RetryConfig:
    enabled: bool = True
    initial_interval: Duration = Duration(5.0)
    randomization_factor: float = 0.5
    multiplier: float = 1.5
    max_interval: Duration = Duration(30.0)
    max_elapsed_time: Duration = Duration(300.0)  # 0: retry forever

    def validate(self) -> None:
        check(self.initial_interval > 0, "initial_interval", "must be greater than 0")
        check(0 <= self.randomization_factor < 1, "randomization_factor", "must be in [0, 1)")
        check(self.multiplier >= 1, "multiplier", "must be at least 1")
        check(self.max_interval >= self.initial_interval, "max_interval", "must be >= initial_interval")
        check(self.max_elapsed_time >= 0, "max_elapsed_time", "must not be negative")


class Retryable(Exception):
    """A send to retry. ``uncertain``: it timed out, so the backend may have the data (a retry may
    deliver it twice; counted in ``prism.collector.export_uncertain_spans``)."""

    def __init__(self, message: str, retry_after: Optional[float] = None, uncertain: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.uncertain = uncertain


class Concurrency:
    """How many sends this exporter has in flight at once, adapted to the backend (up to ``num_consumers``).

    Starts at 2 and grows by one after a send answered within a quarter of the timeout; shrinks by one
    after a send that took over half of it, and halves after a timeout. A slow backend thus sees no
    more calls than it answers in time: a call that times out at the sender but is still processed by
    the backend is delivered twice when retried (OTLP cannot ask), so the way to fewer duplicates is
    not to queue calls at the backend."""

    def __init__(self, most: int, timeout: float) -> None:
        self.most = most
        self.timeout = timeout
        self.limit = min(2, most)
        self.busy = 0
        self._cv = threading.Condition()

    def acquire(self, stopping: threading.Event) -> bool:
        with self._cv:
            while self.busy >= self.limit:
                if stopping.is_set():
                    return False
                self._cv.wait(0.1)
            self.busy += 1
            return True

    def release(self, seconds: float, timed_out: bool) -> None:
        with self._cv:
            self.busy -= 1
            if timed_out:
                self.limit = max(1, self.limit // 2)
            elif seconds > self.timeout / 2:
                self.limit = max(1, self.limit - 1)
            elif seconds < self.timeout / 4 and self.limit < self.most:
                self.limit += 1
            self._cv.notify_all()


class OutItem:
    """One request on its way out: the tagged protobuf, its encoding, and where its spans came from."""

    __slots__ = ("request", "payload", "n_spans", "sources", "keys", "size")

    def __init__(self, request, payload: bytes, n_spans: int, sources: dict, keys: Optional[list[bytes]] = None):
        self.request = request
        self.payload = payload
        self.n_spans = n_spans
        self.sources = sources
        self.keys = keys
        self.size = outgoing_bytes(len(payload))  # what it holds in memory (prism_otel/collector/memory.py)


class QueuedExporter:
    """Base class. Subclasses set ``queue``/``retry`` configs and implement ``send(item)``."""

    queue: SendingQueueConfig = SendingQueueConfig(num_consumers=1)
    retry: RetryConfig = RetryConfig(enabled=False)

    def __init__(self, settings) -> None:
        self.id = str(settings.id)
        self.telemetry = settings.telemetry
        self._q: deque = deque()
        self._cv = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inflight = 0
        self.max_bytes = settings.budget.exporter_bytes  # queued and in flight, this exporter's share
        self._bytes = 0
        self._items = 0  # spans queued (not in flight): what queue_size bounds with sizer "items"
        self._slots: Optional[Concurrency] = None
        self._count_abandoned = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, host) -> None:
        if not self.queue.enabled or self._threads:
            return
        timeout = float(getattr(getattr(self, "cfg", None), "timeout", 0) or 0)
        if timeout and self.queue.num_consumers > 1:
            self._slots = Concurrency(self.queue.num_consumers, timeout)
        for i in range(self.queue.num_consumers):
            t = threading.Thread(target=self._worker, name=f"prism-exporter-{self.id}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self, timeout: float = 5.0, drain: bool = True) -> None:
        """Stop taking items; deliver what is queued within ``timeout`` (``drain``), then stop.

        With ``drain`` (an in-memory queue: nothing else holds the data) what is still queued or
        in a retry wait at the deadline is lost, and counted (``export_failed_spans{reason=shutdown}``);
        without it (a persistent pipeline) it stays in the pipeline's log for the next start."""
        self._count_abandoned = drain
        deadline = time.monotonic() + timeout
        while drain and (self._q or self._inflight) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()) + 0.5)
        self._threads = []
        with self._cv:
            left, self._q = list(self._q), deque()
            self._items = 0
        if drain:
            for item, _ in left:
                self._count_failed(item, "shutdown")
            if left:
                logger.warning("exporter %s: %d spans still queued at shutdown are lost (counted)", self.id,
                               sum(item.n_spans for item, _ in left))
        self.close()

    def close(self) -> None:
        """Release connections and files (subclasses)."""

    # -- intake ---------------------------------------------------------------------------------
    def enqueue(self, item: OutItem, done: Done, block: bool = False) -> None:
        """Queue ``item``; ``done(ok)`` is called once it is delivered or given up on. With ``block``
        (or ``block_on_overflow``) a full queue waits for room; otherwise the item is dropped and counted."""
        if not self.queue.enabled:
            ok = self._deliver(item)
            if ok is not None:
                done(ok)
            return
        block = block or self.queue.block_on_overflow
        with self._cv:
            while self._full(item):
                if block and self._stopping.is_set():
                    if self._count_abandoned:
                        self._count_failed(item, "shutdown")
                    return  # abandoned at shutdown (a persistent pipeline still has it in its log)
                if not block:
                    self._count_failed(item, "queue_full")
                    done(False)
                    return
                self._cv.wait(0.1)
            self._q.append((item, done))
            self._bytes += item.size
            self._items += item.n_spans
            self._cv.notify()

    def _full(self, item: OutItem) -> bool:
        """No room for ``item`` (lock held). An item alone in an empty queue always fits."""
        if self._bytes and self._bytes + item.size > self.max_bytes:
            return True
        if self.queue.sizer == "items":
            return bool(self._q) and self._items + item.n_spans > self.queue.queue_size
        return len(self._q) >= self.queue.queue_size

    def __len__(self) -> int:
        return len(self._q)

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._stopping.is_set():
                    self._cv.wait(0.5)
                if self._stopping.is_set():
                    return
                item, done = self._q.popleft()
                self._items -= item.n_spans
                self._inflight += 1
                self._cv.notify_all()
            try:
                ok = self._deliver(item)
            finally:
                with self._cv:
                    self._inflight -= 1
                    self._bytes -= item.size
                    self._cv.notify_all()
            if ok is None and self._count_abandoned:
                self._count_failed(item, "shutdown")
            if ok is not None:
                try:
                    done(ok)
                except Exception:  # noqa: BLE001 - bookkeeping failure must not kill the consumer
                    logger.exception("exporter %s: completion callback failed", self.id)

    # -- delivery with retries ------------------------------------------------------------------
    def _deliver(self, item: OutItem) -> Optional[bool]:
        """True delivered, False given up (counted), None abandoned at shutdown (left for replay)."""
        retry = self.retry
        start = time.monotonic()
        interval = retry.initial_interval
        while True:
            try:
                self._send_paced(item)
                self.telemetry.add(sc.COLLECTOR_EXPORTED_SPANS, item.n_spans, exporter=self.id)
                return True
            except PermanentError as exc:
                logger.warning("exporter %s: dropping %d spans: %s", self.id, item.n_spans, exc)
                self._count_failed(item, "permanent")
                return False
            except Retryable as exc:
                if not retry.enabled:
                    self._count_failed(item, "retry_disabled")
                    return False
                rf = retry.randomization_factor
                delay = max(interval * random.uniform(1 - rf, 1 + rf), exc.retry_after or 0.0)
                interval = min(interval * retry.multiplier, retry.max_interval)
                if retry.max_elapsed_time and time.monotonic() - start + delay > retry.max_elapsed_time:
                    logger.warning("exporter %s: giving up after %.0fs: %s", self.id, time.monotonic() - start, exc)
                    self._count_failed(item, "retries_exhausted")
                    return False
                self.telemetry.add(sc.COLLECTOR_EXPORT_RETRIES, exporter=self.id)
                logger.debug("exporter %s: retrying in %.2fs: %s", self.id, delay, exc)
                if self._stopping.wait(delay):
                    return None
            except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill its thread
                logger.warning("exporter %s: send failed: %r", self.id, exc, exc_info=True)
                self._count_failed(item, "error")
                return False

    def _send_paced(self, item: OutItem) -> None:
        slots = self._slots
        if slots is None:
            self.send(item)
            return
        if not slots.acquire(self._stopping):
            raise Retryable("shutting down")
        t0, timed_out = time.monotonic(), False
        try:
            self.send(item)
        except Retryable as exc:
            timed_out = exc.uncertain
            if exc.uncertain:
                self.telemetry.add(sc.COLLECTOR_EXPORT_UNCERTAIN, item.n_spans, exporter=self.id)
            raise
        finally:
            slots.release(time.monotonic() - t0, timed_out)

    def _count_failed(self, item: OutItem, reason: str) -> None:
        self.telemetry.add(sc.COLLECTOR_EXPORT_FAILED_SPANS, item.n_spans, exporter=self.id, reason=reason)

    def send(self, item: OutItem) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def queue_field(**overrides) -> SendingQueueConfig:
    return field(default_factory=lambda: SendingQueueConfig(**overrides))
