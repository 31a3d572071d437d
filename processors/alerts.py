"""Alert delivery: a log record, a JSON line (stderr or a file) and an optional webhook.

Alerts are rising edges of the detector's alarm, so they are rare; the log record and the JSON
line are written on the calling (pipeline) thread, milliseconds after the step ended. The webhook
is a bounded queue drained by a thread of its own (HTTP POST of the same JSON, short timeout):
when the queue is full the oldest alert is dropped and counted, so a slow receiver never blocks
the pipeline. The span event and the ``prism.anomaly.count`` metric are the pipeline's
(:mod:`prism_otel.spans`, :mod:`prism_otel.pipeline`), not done here.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import urllib.request
from collections import deque
from typing import Optional

logger = logging.getLogger("prism_otel.alerts")


class AlertSink:
    def __init__(self, log: bool = True, file: str = "stderr", webhook: str = "", queue_size: int = 64,
                 timeout_s: float = 2.0) -> None:
        self.log = log
        self.file = file or ""
        self.webhook = webhook or ""
        self.timeout_s = timeout_s
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._fh = None
        self._lock = threading.Lock()
        self._q: deque = deque(maxlen=max(1, queue_size))
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        if self.file and self.file not in ("stderr", "-", "none"):
            self._fh = open(self.file, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def emit(self, alert: dict) -> None:
        """Deliver one alert (never raises)."""
        try:
            line = json.dumps(alert, separators=(",", ":"), default=str)
            if self.log:
                logger.warning("prism-otel alert: %s", line)
            if self.file in ("stderr", "-"):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            elif self._fh is not None:
                self._fh.write(line + "\n")
                self._fh.flush()
            if self.webhook:
                self._post(line)
            self.sent += 1
        except Exception:  # noqa: BLE001 - alert delivery must not break detection
            self.failed += 1
            logger.debug("alert delivery failed", exc_info=True)

    def _post(self, line: str) -> None:
        q = self._q
        if len(q) == q.maxlen:
            self.dropped += 1
        q.append(line)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="prism-otel-alerts", daemon=True)
                    self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._q:
                try:
                    line = self._q.popleft()
                except IndexError:
                    break
                try:
                    req = urllib.request.Request(self.webhook, data=line.encode(), method="POST",
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - operator's URL
                        resp.read()
                except Exception:  # noqa: BLE001 - a failing receiver is counted, not fatal
                    self.failed += 1

    def close(self, timeout: float = 2.0) -> None:
        t = self._thread
        if t is not None:
            self._wake.set()
            deadline = timeout
            # let queued webhooks go out, bounded
            import time as _t

            end = _t.monotonic() + deadline
            while self._q and _t.monotonic() < end:
                _t.sleep(0.01)
            self._stop = True
            self._wake.set()
            t.join(max(0.0, end - _t.monotonic()) + 0.1)
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
