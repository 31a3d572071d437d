"""The collector's own counters (received, refused, malformed, exported, dropped by reason...).

The Collector never logs per item at thousands of spans a second; it counts. So do we: every
component increments named counters here (names from :mod:`prism_otel.semconv`), the service logs
them at shutdown and on SIGUSR1, and tests read :meth:`Telemetry.get`.
"""

from __future__ import annotations

import threading
from collections import defaultdict

Key = tuple[str, tuple[tuple[str, str], ...]]


class Telemetry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Key, int] = defaultdict(int)

    def add(self, name: str, n: int = 1, **labels: str) -> None:
        if not n:
            return
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counts[key] += n

    def get(self, name: str, **labels: str) -> int:
        """Sum of ``name`` over every label set that includes ``labels``."""
        want = set(labels.items())
        with self._lock:
            return sum(v for (n, lab), v in self._counts.items() if n == name and want <= set(lab))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            items = list(self._counts.items())
        out = {}
        for (name, labels), v in sorted(items):
            suffix = ",".join(f"{k}={val}" for k, val in labels)
            out[f"{name}{{{suffix}}}" if suffix else name] = v
        return out
