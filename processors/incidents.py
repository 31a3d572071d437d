"""Incidents, not step alerts: anomalous steps grouped into one episode per instance.

A detector that judges hundreds of steps a second flags some healthy ones (a descheduled thread, a
cache refill); paging on each flagged step, or on each rising edge of a per-step alarm, pages every
few seconds on a busy shared host (45-118 alerts in 30-42 s were counted before this module). An
incident needs *sustained* evidence and ends with hysteresis:

* **Open** when, over the judged steps of the last ``open_window_s`` seconds (at least
  ``min_window_steps`` of them), at least ``open_fraction`` of the steps, and of their time
  (``open_time_fraction``), were anomalous, at least ``open_min_steps`` of them, whose ends span at
  least ``open_min_s``: one long stall and the flagged steps right after it are a hiccup, not
  sustained evidence. The incident starts at the first anomalous step of that window.
* **Close** when, over the last ``close_quiet_s`` seconds (at least ``close_min_steps`` judged
  steps), no more than ``close_fraction`` of the steps were anomalous (a stall now and then on a busy
  host does not hold an incident open). It ended at its last anomalous step. A process that stops
  closes its open incident (``close_reason``: ``shutdown``).

An incident carries its start, peak (the largest observed/expected ratio), duration, the phases and
the stages it hit (a stage whose mean during the incident is well over its mean on normal steps
before it), its main root cause (the one that explains the most extra time over its anomalous steps,
with the evidence of the latest such step) and how many steps it affected. It notifies twice: when it opens and
when it closes (:mod:`processors.notify`: stderr line, incident log, Alertmanager, webhook).

Runs after the detector (and the root-cause processor) on the same thread; costs a few deque
operations per step. Steps without a verdict (no model yet) are not evidence either way, and an anomalous
step whose root cause is ``workload`` (it lies beyond the workloads the model was fitted on and the engine's
threads ran as usual: the detector's blind spot) counts as a normal one: it is flagged on its span, it
pages nobody.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
import weakref
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Optional

from prism_otel import semconv as sc
from prism_otel.record import StepRecord
from processors.base import StepProcessor
from processors.config import build, env_pairs, invalid, key_path, positive

logger = logging.getLogger("prism_otel.incidents")

EVIDENCE_PREFIX = sc.ANOMALY_ROOT_CAUSE.rsplit(".", 1)[0] + ".evidence."  # prism.anomaly.evidence.*


@dataclass
class IncidentConfig:
    """Keys and defaults are listed in docs/alerting.md."""

    open_window_s: float = 1.0
    min_window_steps: int = 16
    open_fraction: float = 0.3
    open_time_fraction: float = 0.3
    open_min_steps: int = 6
    open_min_s: float = 0.3
    close_quiet_s: float = 3.0
    close_min_steps: int = 16
    close_fraction: float = 0.05
    stage_ratio: float = 1.5  # a stage is "hit" when its mean during the incident is this much over normal
    stage_min_ms: float = 0.05  # ... and at least this many ms over it
    severity: str = "warning"
    # delivery
    log_per_engine: bool = True  # name the incident log after the engine's pid (false: this process's; the collector)
    stderr: bool = True
    file: str = ""
    follow: bool = True
    alertmanager_url: str = ""
    webhook: str = ""
    queue: int = 64
    timeout_s: float = 2.0
    resend_s: float = 30.0
    ttl_s: float = 300.0

    def validate(self, where: str = "") -> None:
        positive(where, open_window_s=self.open_window_s, min_window_steps=self.min_window_steps,
                 open_fraction=self.open_fraction, open_time_fraction=self.open_time_fraction,
                 open_min_steps=self.open_min_steps,
                 close_quiet_s=self.close_quiet_s, close_min_steps=self.close_min_steps, stage_ratio=self.stage_ratio,
                 queue=self.queue, timeout_s=self.timeout_s, resend_s=self.resend_s, ttl_s=self.ttl_s)
        for key in ("open_fraction", "open_time_fraction"):
            if getattr(self, key) > 1:
                raise invalid(key_path(where, key), f"must be <= 1, got {getattr(self, key)}")
        if not 0 <= self.close_fraction < self.open_fraction:
            raise invalid(key_path(where, "close_fraction"),
                          f"must be >= 0 and below open_fraction ({self.open_fraction}), got {self.close_fraction}")
        if self.open_min_s < 0:
            raise invalid(key_path(where, "open_min_s"), f"must be >= 0, got {self.open_min_s}")
        for key in ("alertmanager_url", "webhook"):
            v = getattr(self, key)
            if v and not v.startswith(("http://", "https://")):
                raise invalid(key_path(where, key), f"must be an http:// or https:// URL, got {v!r}")

    @classmethod
    def from_dict(cls, d, where: str = "") -> IncidentConfig:
        return build(cls, d, where)


class _Window:
    """Judged steps that ended in the last ``span_ns`` (at least ``min_steps`` of them), with their count,
    the anomalous count, and the step time of each (anomalous steps are the slow ones: a fraction of
    *time* rises as soon as a slowdown starts, a fraction of steps lags behind it)."""

    __slots__ = ("span_ns", "min_steps", "q", "n_anom", "ns", "anom_ns")

    def __init__(self, span_s: float, min_steps: int) -> None:
        self.span_ns = int(span_s * 1e9)
        self.min_steps = min_steps
        self.q: deque = deque()
        self.n_anom = 0
        self.ns = 0
        self.anom_ns = 0

    def add(self, t_ns: int, dur_ns: int, anom: bool) -> None:
        q = self.q
        q.append((t_ns, dur_ns, anom))
        self.n_anom += anom
        self.ns += dur_ns
        if anom:
            self.anom_ns += dur_ns
        edge = t_ns - self.span_ns
        while len(q) > self.min_steps and q[0][0] < edge or len(q) > 100000:  # (a clock gone wrong: bounded)
            self._pop()

    def _pop(self) -> None:
        _, d, a = self.q.popleft()
        self.n_anom -= a
        self.ns -= d
        if a:
            self.anom_ns -= d

    def full(self) -> bool:
        return len(self.q) >= self.min_steps

    def time_fraction(self) -> float:
        return self.anom_ns / self.ns if self.ns > 0 else 0.0

    def covered_ns(self) -> int:
        q = self.q
        return q[-1][0] - q[0][0] + q[0][1] if q else 0

    def step_fraction(self) -> float:
        return self.n_anom / len(self.q) if self.q else 0.0

    def anomalous_span_ns(self) -> int:
        """From the end of the first anomalous step to the end of the last: one long stall spans nothing."""
        first = next((t for t, d, a in self.q if a), None)
        last = next((t for t, d, a in reversed(self.q) if a), None)
        return 0 if first is None else last - first

    def first_anomalous(self) -> Optional[int]:
        return next((t - d for t, d, a in self.q if a), None)

    def clear(self) -> None:
        self.q.clear()
        self.n_anom = self.ns = self.anom_ns = 0


def _stage_name(root: Optional[str]) -> Optional[str]:
    """``stage.update`` (the root-cause vocabulary) or ``stage:update`` (older hints) -> ``update``."""
    if root and (root.startswith("stage.") or root.startswith("stage:")):
        return root[6:]
    return None


class Incident:
    """One episode of sustained anomalous steps on one instance."""

    def __init__(self, number: int, instance: str, service: str, start_ns: int, open_ns: int,
                 severity: str) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.number = number
        self.instance = instance
        self.service = service
        self.severity = severity
        self.start_ns = start_ns  # first anomalous step of the evidence that opened it
        self.open_ns = open_ns  # when the evidence was sustained (the open notification)
        self.end_ns = start_ns  # last anomalous step
        self.close_ns: Optional[int] = None
        self.close_reason: Optional[str] = None
        self.steps_affected = 0
        self.steps_judged = 0
        self.phases: Counter = Counter()
        self.causes: Counter = Counter()  # cause -> anomalous steps
        self.cause_ms: dict[str, float] = {}  # cause -> ms over the expectation on those steps
        self.evidence: dict[str, object] = {}
        self.peak_ratio = 0.0
        self.peak: dict[str, object] = {}
        self.stage_ns: dict[str, int] = {}  # stage -> total ns over the incident's anomalous steps with stages
        self.stage_steps = 0
        self.stages: list[dict] = []

    def add(self, step: StepRecord, anomalous: bool) -> None:
        self.steps_judged += 1
        if not anomalous:
            return
        v = step.verdict
        assert v is not None, "observe() passes judged steps only"
        self.steps_affected += 1
        self.end_ns = max(self.end_ns, step.end_ns)
        self.phases[step.phase] += 1
        cause = v.root_cause or "unknown"
        self.causes[cause] += 1
        if v.expected_ms:
            # a Counter of float ms (typeshed types a Counter's counts as int)
            self.cause_ms[cause] = self.cause_ms.get(cause, 0.0) + max(0.0, step.duration_ms - v.expected_ms)
        ev = _evidence(step)
        if ev and cause == self.root_cause:
            self.evidence = ev
        if v.expected_ms:
            ratio = step.duration_ms / v.expected_ms
            if ratio > self.peak_ratio:
                self.peak_ratio = ratio
                self.peak = {"step": step.index, "phase": step.phase, "duration_ms": round(step.duration_ms, 3),
                             "expected_ms": round(v.expected_ms, 3), "time_unix_nano": step.end_ns}
        if step.stages:
            self.stage_steps += 1
            for name, (a, b) in step.stages.items():
                self.stage_ns[name] = self.stage_ns.get(name, 0) + (b - a)

    @property
    def root_cause(self) -> Optional[str]:
        """The root cause that explains the most extra time (ms over the expectation) over the anomalous
        steps, the step count breaking ties; ``unknown`` only when nothing else. By time, not by steps: a
        stall of 60 ms a step outweighs a longer run of steps 10 ms slow around it (a neighbour's burst
        that the same incident took in)."""
        named = [(self.cause_ms.get(c, 0.0), n, c) for c, n in self.causes.items() if c != "unknown"]
        if named:
            return max(named)[2]
        return "unknown" if self.causes else None

    def finish_stages(self, normal_ms: dict[str, float], ratio: float, min_ms: float) -> None:
        out = []
        if self.stage_steps:
            for name, ns in self.stage_ns.items():
                mean = ns / self.stage_steps / 1e6
                base = normal_ms.get(name)
                if base is None:
                    continue
                if mean > base * ratio and mean - base > min_ms:
                    out.append({"stage": name, "mean_ms": round(mean, 3), "normal_ms": round(base, 3),
                                "excess_ms": round(mean - base, 3)})
        named = _stage_name(self.root_cause)
        out.sort(key=lambda s: (s["stage"] != named, -s["excess_ms"]))
        self.stages = out

    def to_dict(self) -> dict:
        dur = (self.end_ns - self.start_ns) / 1e9  # first to last anomalous step
        d = {"id": self.id, "number": self.number, "instance": self.instance, "service": self.service,
             "severity": self.severity, "state": "closed" if self.close_ns is not None else "open",
             "start_ns": self.start_ns, "open_ns": self.open_ns, "end_ns": self.end_ns, "close_ns": self.close_ns,
             "duration_s": round(max(0.0, dur), 3), "root_cause": self.root_cause,
             "root_causes": dict(self.causes.most_common(8)),
             "root_causes_ms": {c: round(ms, 3) for c, ms in sorted(self.cause_ms.items(), key=lambda kv: -kv[1])[:8]},
             "evidence": dict(self.evidence),
             "steps_affected": self.steps_affected, "steps_judged": self.steps_judged,
             "phases": dict(self.phases.most_common()), "stages": list(self.stages),
             "peak_ratio": round(self.peak_ratio, 3), "peak": dict(self.peak)}
        if self.close_reason:
            d["close_reason"] = self.close_reason
        d["summary"] = (f"{self.service or 'engine'} {','.join(self.phases) or 'steps'} slower than expected "
                        f"(peak {self.peak_ratio:.1f}x), root cause {self.root_cause or 'unknown'}")
        d["description"] = (f"{self.steps_affected} anomalous steps of {self.steps_judged} judged on "
                            f"{self.instance} since {self.start_ns}; phases {dict(self.phases)}")
        return d

    def event(self, kind: str) -> dict:
        return {"event": kind, "time_unix_nano": self.close_ns if kind == sc.INCIDENT_EVENT_CLOSE else self.open_ns,
                "incident": self.to_dict()}


def _evidence(step: StepRecord) -> dict[str, object]:
    """``prism.anomaly.evidence.*`` of a step: on its verdict (``evidence`` mapping) or its attributes."""
    out = {}
    ev = getattr(step.verdict, "evidence", None)
    if isinstance(ev, dict):
        out.update({str(k): v for k, v in ev.items()})
    for k, v in step.attributes.items():
        if k.startswith(EVIDENCE_PREFIX):
            out[k[len(EVIDENCE_PREFIX):]] = v
    return out


class IncidentTracker:
    """The incident state of one instance; ``observe`` returns the events (open/close) a step caused."""

    def __init__(self, instance: str, cfg: IncidentConfig, service: str = "",
                 counter: Optional[Callable[[], int]] = None) -> None:
        self.instance = instance
        self.cfg = cfg
        self.service = service
        self.open_win = _Window(cfg.open_window_s, cfg.min_window_steps)
        self.close_win = _Window(cfg.close_quiet_s, cfg.close_min_steps)
        self.current: Optional[Incident] = None
        self.closed: list[Incident] = []
        self._count = 0
        self._counter = counter
        self.normal_stage_ms: dict[str, float] = {}  # slow mean of each stage on normal steps outside incidents
        self._recent: deque = deque(maxlen=1024)  # recent anomalous steps: the evidence an incident opens on

    def _next_number(self) -> int:
        if self._counter is not None:
            return self._counter()
        self._count += 1
        return self._count

    def observe(self, step: StepRecord) -> list[dict]:
        v = step.verdict
        if v is None or v.expected_ms is None:
            return []
        # a step put down to its workload (beyond what the model was fitted on, the engine's threads running as
        # usual: the model's blind spot, not the server's trouble) stays anomalous on its span but is no evidence
        # of an incident: it neither opens one nor keeps one open
        anom = bool(v.anomaly) and v.root_cause != sc.ROOT_WORKLOAD
        t = step.end_ns
        dur = max(0, t - step.start_ns)
        cfg = self.cfg
        self.open_win.add(t, dur, anom)
        self.close_win.add(t, dur, anom)
        inc = self.current
        if inc is None:
            if not anom:
                if not self.open_win.n_anom:  # a quiet stretch: the stages' normal durations
                    self._learn_stages(step)
                return []
            self._recent.append(step)
            w = self.open_win
            n = len(w.q)
            if (w.full() and w.n_anom >= cfg.open_min_steps and w.step_fraction() >= cfg.open_fraction
                    and w.time_fraction() >= cfg.open_time_fraction and w.anomalous_span_ns() >= cfg.open_min_s * 1e9):
                start = w.first_anomalous() or t
                inc = self.current = Incident(self._next_number(), self.instance, self.service, start, t,
                                              cfg.severity)
                # the evidence window's anomalous steps belong to the incident (this one included)
                for s in self._recent:
                    if s.end_ns >= start:
                        inc.add(s, True)
                inc.steps_judged = n
                self._recent.clear()
                self.close_win.clear()
                self.close_win.add(t, dur, anom)
                return [inc.event(sc.INCIDENT_EVENT_OPEN)]
            return []
        inc.add(step, anom)
        cw = self.close_win
        if cw.full() and cw.covered_ns() >= cfg.close_quiet_s * 1e9 and cw.step_fraction() <= cfg.close_fraction:
            return [self._close(t, "recovered")]
        return []

    def _learn_stages(self, step: StepRecord) -> None:
        if not step.stages:
            return
        m = self.normal_stage_ms
        for name, (a, b) in step.stages.items():
            ms = (b - a) / 1e6
            old = m.get(name)
            m[name] = ms if old is None else old + 0.02 * (ms - old)

    def _close(self, t_ns: int, reason: str) -> dict:
        inc = self.current
        assert inc is not None, "callers close an open incident"
        self.current = None
        inc.close_ns = t_ns
        inc.close_reason = reason
        inc.finish_stages(self.normal_stage_ms, self.cfg.stage_ratio, self.cfg.stage_min_ms)
        self.closed.append(inc)
        if len(self.closed) > 256:
            self.closed.pop(0)
        self.open_win.clear()
        return inc.event(sc.INCIDENT_EVENT_CLOSE)

    def shutdown(self, t_ns: int) -> list[dict]:
        if self.current is None:
            return []
        return [self._close(max(t_ns, self.current.end_ns), "shutdown")]


def _pid_of(instance: str) -> Optional[int]:
    m = re.search(r":(\d+)$", instance or "")
    return int(m.group(1)) if m else None


_LIVE: weakref.WeakSet = weakref.WeakSet()  # the incident processors of this process (the exit summary lists them)


def summary_lines(judged: Optional[int] = None) -> list[str]:
    """The exit summary's incident lines: how many, and one line per incident."""
    incs = [i for p in list(_LIVE) for i in p.all_incidents()]
    if not _LIVE:
        return []
    if not incs:
        if judged == 0:
            return ["prism-otel: no incident, but no step was judged either (too few steps to learn from)"]
        return ["prism-otel: no incident (no sustained run of anomalous steps)"]
    from datetime import datetime

    out = [f"prism-otel: {len(incs)} incident{'s' if len(incs) > 1 else ''}"]
    for i in sorted(incs, key=lambda i: i.start_ns):
        d = i.to_dict()
        out.append(f"  #{d['number']} {datetime.fromtimestamp(d['start_ns'] / 1e9).strftime('%H:%M:%S')} "
                   f"{d['duration_s']:.1f} s, root cause {d['root_cause']}, {d['steps_affected']} anomalous steps, "
                   f"peak {d['peak_ratio']:.1f}x, phases {','.join(d['phases'])}"
                   + (f", stages {','.join(s['stage'] for s in d['stages'][:3])}" if d["stages"] else "")
                   + (" (open at exit)" if d["state"] == "open" or d.get("close_reason") == "shutdown" else ""))
    return out


class IncidentProcessor(StepProcessor):
    """Groups each instance's anomalous steps into incidents and delivers their open/close events."""

    name = "incidents"

    def __init__(self, config=None, service: str = "", sinks: Optional[list] = None, meter_provider=None) -> None:
        """``config``: an :class:`IncidentConfig` or a dict of its keys; ``sinks``: objects with
        ``notify(event)`` and ``close(timeout)`` replacing the ones the config names (tests, tools)."""
        if config is None or isinstance(config, dict):
            config = IncidentConfig.from_dict(config or {})
        self.cfg: IncidentConfig = config
        self.service = service
        self._trackers: dict[str, IncidentTracker] = {}
        self._lock = threading.Lock()
        self._number = 0
        self.events: deque = deque(maxlen=512)  # the latest events, for status and tests
        self.opened = 0
        self.closed_count = 0
        self.sink_errors = 0
        self._last_t = 0
        self.sinks = list(sinks) if sinks is not None else self._default_sinks()
        self.on_event: Optional[Callable[[dict], None]] = None  # e.g. the metrics processor's counters
        if sinks is None:
            _LIVE.add(self)

    def _default_sinks(self) -> list:
        from processors import notify

        c = self.cfg
        out: list = []
        follow = None
        if c.follow:
            follow = notify.default_incident_dir()
        if c.stderr or c.file or follow:
            out.append(notify.IncidentLog(stderr=c.stderr, file=c.file, follow_dir=follow))
        if c.alertmanager_url:
            out.append(notify.AlertmanagerOutbox(c.alertmanager_url, c.queue, c.timeout_s, c.resend_s, c.ttl_s))
        if c.webhook:
            out.append(notify.WebhookOutbox(c.webhook, c.queue, c.timeout_s))
        return out

    def _count(self) -> int:
        self._number += 1
        return self._number

    def tracker(self, instance: str) -> IncidentTracker:
        t = self._trackers.get(instance)
        if t is None:
            t = self._trackers[instance] = IncidentTracker(instance, self.cfg, self.service, self._count)
            log = next((s for s in self.sinks if hasattr(s, "follow_dir")), None)
            pid = _pid_of(instance)
            if log is not None and pid and len(self._trackers) == 1 and not log.pid_given and self.cfg.log_per_engine:
                log.pid = pid  # incidents-<engine pid>.jsonl, also when a companion process writes it
        return t

    def process(self, step: StepRecord) -> StepRecord:
        if step.end_ns > self._last_t:
            self._last_t = step.end_ns
        events = self.tracker(step.instance).observe(step)
        for ev in events:
            self._deliver(ev)
        return step

    def _deliver(self, event: dict) -> None:
        if event["event"] == sc.INCIDENT_EVENT_OPEN:
            self.opened += 1
        else:
            self.closed_count += 1
        self.events.append(event)
        for s in self.sinks:
            try:
                s.notify(event)
            except Exception:  # noqa: BLE001 - one broken sink must not stop the others
                self.sink_errors += 1
                logger.debug("incident sink failed", exc_info=True)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001
                self.sink_errors += 1

    def forget_instance(self, instance: str) -> None:
        """The collector evicts an idle instance: its open incident closes (``evicted``), its state goes."""
        t = self._trackers.pop(instance, None)
        if t is not None and t.current is not None:
            for ev in t.shutdown(max(self._last_t, t.current.end_ns)):
                ev["incident"]["close_reason"] = "evicted"
                self._deliver(ev)

    def open_incidents(self) -> list[Incident]:
        return [t.current for t in self._trackers.values() if t.current is not None]

    def all_incidents(self) -> list[Incident]:
        out = [i for t in self._trackers.values() for i in t.closed]
        out += self.open_incidents()
        return sorted(out, key=lambda i: i.start_ns)

    def shutdown(self) -> None:
        for t in self._trackers.values():
            for ev in t.shutdown(self._last_t):
                self._deliver(ev)
        for s in self.sinks:
            try:
                s.close(3.0)
            except Exception:  # noqa: BLE001
                logger.debug("incident sink close failed", exc_info=True)

    def stats(self) -> dict:
        return {"opened": self.opened, "closed": self.closed_count, "open": len(self.open_incidents()),
                "sink_errors": self.sink_errors,
                "sinks": {type(s).__name__: s.stats() for s in self.sinks if hasattr(s, "stats")}}


def incident_config_from_env() -> dict:
    """The incident processor's config from the environment (names in :mod:`prism_otel.semconv`)."""

    cfg: dict[str, object] = {}
    f = os.environ.get(sc.ENV_ALERT_FILE, "").strip()
    if f:
        if f == "none":
            cfg["stderr"] = False
        elif f not in ("stderr", "-"):
            cfg["stderr"] = False
            cfg["file"] = f
    if os.environ.get(sc.ENV_ALERT_WEBHOOK):
        cfg["webhook"] = os.environ[sc.ENV_ALERT_WEBHOOK]
    if os.environ.get(sc.ENV_ALERTMANAGER_URL):
        cfg["alertmanager_url"] = os.environ[sc.ENV_ALERTMANAGER_URL]
    cfg.update(env_pairs(sc.ENV_INCIDENT_CONFIG))
    return cfg


def replay(steps, config=None) -> list[Incident]:
    """The incidents a stream of judged steps makes (offline: ``prism-otel report`` on spans that came
    without an incident log). Same rules as live, no delivery."""
    p = IncidentProcessor(config, sinks=[])
    last = 0
    for s in steps:
        p.process(s)
        last = max(last, s.end_ns)
    for t in p._trackers.values():
        if t.current is not None:
            t.current.finish_stages(t.normal_stage_ms, p.cfg.stage_ratio, p.cfg.stage_min_ms)
    return p.all_incidents()
