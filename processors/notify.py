"""Where incidents go: Prometheus Alertmanager (its v2 API), a webhook, and the incident log.

Every remote destination is an :class:`Outbox`: a bounded queue drained by a daemon thread of its
own, with a short timeout per HTTP call. ``put`` appends and returns (when the queue is full the
oldest item is dropped and counted), so a slow or dead receiver never blocks the pipeline thread,
and therefore never the engine. Failures are counted, retried once on the next wake-up for
Alertmanager (it re-sends every firing alert anyway), never raised.

* :class:`AlertmanagerOutbox` speaks the Alertmanager v2 API (``POST /api/v2/alerts``, a JSON list
  of ``{labels, annotations, startsAt, endsAt, generatorURL}``). An open incident is a firing alert
  whose ``endsAt`` lies ``ttl_s`` ahead; the thread re-sends it every ``resend_s`` (as Prometheus
  re-sends its firing alerts), so Alertmanager keeps it firing while we live and resolves it by
  itself ``ttl_s`` after we die. A closed incident is sent once more with ``endsAt`` = its close
  time: Alertmanager then sends its receivers the resolved notification. Each incident carries its
  own ``incident_id`` label, so one incident is one alert: one notification when it opens, one
  when it closes (with ``send_resolved``).
* :class:`WebhookOutbox` POSTs each incident event (the JSON of :meth:`Incident.event`) as is.
* :class:`IncidentLog` is local and synchronous (events are rare: two per incident): a one-line
  description on stderr, a JSON line in ``incidents-<pid>.jsonl`` (what ``prism-otel alerts`` and
  ``prism-otel attach PID --follow`` follow), and a JSON line in a file of the operator's choice.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from datetime import datetime, timezone
from typing import IO, Optional

from prism_otel import semconv as sc

logger = logging.getLogger("prism_otel.incidents")


def rfc3339(ns: int) -> str:
    """Epoch ns as RFC 3339 UTC with milliseconds (what Alertmanager parses)."""
    dt = datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _post_json(url: str, body, timeout_s: float) -> None:
    data = json.dumps(body, separators=(",", ":"), default=str).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - the operator's URL
        resp.read()


class Outbox:
    """A bounded queue and the daemon thread that sends what is put on it."""

    name = "outbox"

    def __init__(self, queue_size: int = 64, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._q: deque = deque(maxlen=max(1, queue_size))
        self._wake = threading.Event()
        self._stop = False
        self._busy = False
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def put(self, item) -> None:
        """Queue ``item`` for the thread (never blocks, never raises)."""
        q = self._q
        if len(q) == q.maxlen:
            self.dropped += 1
        q.append(item)
        self._ensure_thread()
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name=f"prism-otel-{self.name}", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.tick_s())
            self._wake.clear()
            self._drain()
            try:
                self.on_tick()
            except Exception:  # noqa: BLE001
                logger.debug("%s tick failed", self.name, exc_info=True)

    def _drain(self) -> None:
        while self._q:
            try:
                item = self._q.popleft()
            except IndexError:
                break
            self._busy = True
            try:
                self.send(item)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - a failing receiver is counted, never fatal
                self.failed += 1
                self.on_failure(item, exc)
            finally:
                self._busy = False

    def tick_s(self) -> float:
        return 1.0

    def on_tick(self) -> None:
        pass

    def on_failure(self, item, exc) -> None:
        logger.debug("%s: delivery failed: %s", self.name, exc)

    def send(self, item) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 3.0) -> None:
        """Send what is queued (bounded by ``timeout``), then stop the thread."""
        t = self._thread
        if t is None:
            return
        end = time.monotonic() + timeout
        self._wake.set()
        while (self._q or self._busy) and time.monotonic() < end:
            time.sleep(0.01)
        self._stop = True
        self._wake.set()
        t.join(max(0.0, end - time.monotonic()) + 0.1)

    def stats(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}


class WebhookOutbox(Outbox):
    """POSTs every incident event (open and close) as JSON to ``url``."""

    name = "webhook"

    def __init__(self, url: str, queue_size: int = 64, timeout_s: float = 2.0) -> None:
        super().__init__(queue_size, timeout_s)
        self.url = url

    def notify(self, event: dict) -> None:
        self.put(event)

    def send(self, event: dict) -> None:
        _post_json(self.url, event, self.timeout_s)


class AlertmanagerOutbox(Outbox):
    """Incidents as Alertmanager v2 alerts (see the module docstring for the protocol)."""

    name = "alertmanager"

    def __init__(self, url: str, queue_size: int = 64, timeout_s: float = 2.0, resend_s: float = 30.0,
                 ttl_s: float = 300.0, extra_labels: Optional[dict[str, str]] = None,
                 generator_url: str = "") -> None:
        super().__init__(queue_size, timeout_s)
        base = url.rstrip("/")
        if base.endswith("/api/v2/alerts"):
            base = base[: -len("/api/v2/alerts")]
        self.url = base + "/api/v2/alerts"
        self.resend_s = resend_s
        self.ttl_s = ttl_s
        self.extra_labels = dict(extra_labels or {})
        self.generator_url = generator_url
        self._active: dict[str, dict] = {}  # incident id -> alert body (firing), re-sent every resend_s
        self._last_resend = time.monotonic()

    def alert(self, event: dict) -> dict:
        inc = event["incident"]
        labels = {"alertname": sc.INCIDENT_ALERTNAME, "severity": inc.get("severity", "warning"),
                  "instance": inc["instance"], "incident_id": inc["id"]}
        if inc.get("service"):
            labels["service"] = inc["service"]
        labels.update(self.extra_labels)
        ann = {"summary": inc.get("summary", ""), "description": inc.get("description", ""),
               "root_cause": inc.get("root_cause") or "unknown",
               "peak_ratio": f"{inc.get('peak_ratio', 0):.2f}", "steps_affected": str(inc.get("steps_affected", 0)),
               "phases": ",".join(inc.get("phases", {})), "stages": ",".join(s["stage"] for s in inc.get("stages", []))}
        for k, v in (inc.get("evidence") or {}).items():
            ann[_label_name("evidence_" + k)] = str(v)
        body = {"labels": labels, "annotations": ann, "startsAt": rfc3339(inc["start_ns"])}
        if self.generator_url:
            body["generatorURL"] = self.generator_url
        if event["event"] == sc.INCIDENT_EVENT_CLOSE:
            body["endsAt"] = rfc3339(inc["close_ns"])
        return body

    def notify(self, event: dict) -> None:
        body = self.alert(event)
        iid = event["incident"]["id"]
        if event["event"] == sc.INCIDENT_EVENT_CLOSE:
            self._active.pop(iid, None)
        else:
            self._active[iid] = body
        self.put(body)

    def _with_ttl(self, body: dict) -> dict:
        if "endsAt" in body:
            return body
        return {**body, "endsAt": rfc3339(time.time_ns() + int(self.ttl_s * 1e9))}

    def send(self, body: dict) -> None:
        _post_json(self.url, [self._with_ttl(body)], self.timeout_s)

    def tick_s(self) -> float:
        return min(1.0, self.resend_s)

    def on_tick(self) -> None:
        now = time.monotonic()
        if self._active and now - self._last_resend >= self.resend_s:
            self._last_resend = now
            bodies = [self._with_ttl(b) for b in list(self._active.values())]
            try:
                _post_json(self.url, bodies, self.timeout_s)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001
                self.failed += 1
                logger.debug("alertmanager: re-send failed: %s", exc)

    def on_failure(self, item, exc) -> None:
        # a firing alert that did not get through goes out with the next re-send; say so once per failure
        logger.warning("prism-otel: Alertmanager at %s did not take an incident (%s); counted, re-sent while "
                       "the incident is open", self.url, exc)


def _label_name(name: str) -> str:
    """Alertmanager takes label and annotation names that match ``[a-zA-Z_][a-zA-Z0-9_]*`` only (it
    refuses the whole alert with HTTP 400 otherwise): every other character becomes ``_``."""
    out = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)
    return out if out and not out[0].isdigit() else "_" + out


def default_incident_dir() -> str:
    """Where processes append ``incidents-<pid>.jsonl`` when ``PRISM_OTEL_INCIDENT_DIR`` is unset: the
    embedded default's output directory when no exporter is configured (so a report of it has them),
    else a directory of this user's under the temporary directory."""
    d = os.environ.get(sc.ENV_INCIDENT_DIR)
    if d:
        return d
    if not (os.environ.get(sc.OTEL_TRACES_EXPORTER) or os.environ.get(sc.OTEL_EXPORTER_OTLP_ENDPOINT)
            or os.environ.get(sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)):
        return os.environ.get(sc.ENV_OUT_DIR) or os.path.join(os.getcwd(), "prism-out")
    return runtime_incident_dir()


def runtime_incident_dir() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"prism-otel-{os.getuid()}", "incidents")


class IncidentLog:
    """Synchronous local outputs: the stderr line, the follow file, an operator's JSON-lines file."""

    def __init__(self, stderr: bool = True, file: str = "", follow_dir: Optional[str] = None,
                 pid: Optional[int] = None) -> None:
        self.stderr = stderr
        self.file = file
        self.follow_dir = follow_dir
        self.pid = pid or os.getpid()
        self.pid_given = pid is not None  # else the incident processor names the file after the engine's pid
        self.failed = 0
        self._fhs: dict[str, IO[str]] = {}

    @property
    def follow_path(self) -> Optional[str]:
        if not self.follow_dir:
            return None
        return os.path.join(self.follow_dir, f"{sc.INCIDENT_LOG_PREFIX}{self.pid}.jsonl")

    def _append(self, path: str, line: str) -> None:
        fh = self._fhs.get(path)
        if fh is None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fh = self._fhs[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        fh.write(line + "\n")
        fh.flush()

    def notify(self, event: dict) -> None:
        try:
            if self.stderr:
                sys.stderr.write(describe(event) + "\n")
                sys.stderr.flush()
            line = json.dumps(event, separators=(",", ":"), default=str)
            for path in (self.follow_path, self.file):
                if path:
                    self._append(path, line)
        except Exception:  # noqa: BLE001 - a full disk must not stop detection
            self.failed += 1
            logger.debug("incident log failed", exc_info=True)

    def close(self, timeout: float = 0.0) -> None:
        for fh in self._fhs.values():
            try:
                fh.close()
            except OSError:
                pass
        self._fhs.clear()

    def stats(self) -> dict:
        return {"failed": self.failed}


def describe(event: dict) -> str:
    """The one line an operator reads (stderr, ``prism-otel alerts``)."""
    inc = event.get("incident", {})
    n = inc.get("number", "?")
    cause = inc.get("root_cause") or "unknown"
    phases = ",".join(inc.get("phases", {})) or "-"
    when = datetime.fromtimestamp(inc.get("start_ns", 0) / 1e9).strftime("%H:%M:%S")
    if event.get("event") == sc.INCIDENT_EVENT_OPEN:
        return (f"prism-otel: INCIDENT #{n} OPEN since {when} on {inc.get('instance')}: {phases} steps "
                f"{inc.get('peak_ratio', 0):.1f}x their expected latency, root cause {cause} "
                f"({inc.get('steps_affected', 0)} anomalous steps so far)")
    stages = ", ".join(f"{s['stage']} {s['normal_ms']:.2f}->{s['mean_ms']:.2f} ms" for s in inc.get("stages", [])[:3])
    return (f"prism-otel: INCIDENT #{n} CLOSED after {inc.get('duration_s', 0):.1f} s on {inc.get('instance')}: "
            f"root cause {cause}, {inc.get('steps_affected', 0)} of {inc.get('steps_judged', 0)} steps anomalous, "
            f"peak {inc.get('peak_ratio', 0):.1f}x, phases {phases}" + (f", stages {stages}" if stages else "")
            + (f" ({inc['close_reason']})" if inc.get("close_reason") not in (None, "recovered") else ""))
