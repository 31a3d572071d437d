"""SLO processor: TTFT, TPOT and step-latency targets; violation tags; attainment and burn rate.

* A finished request whose time to first token or time per output token is over its target gets
  ``slo_violations`` (``ttft``, ``tpot``), rendered as ``prism.slo.violated`` on the request span.
* A step (of the phases in ``step_phases``) longer than ``step_ms`` gets ``step`` in its verdict's
  ``slo_violations`` (``prism.slo.violated`` on the step span).
* Attainment (the fraction of requests, or steps, within target over the last ``window_s`` seconds
  of record time) and burn rate (``(1 - attainment) / (1 - objective)``: 1 spends the error budget
  exactly over the SLO period, above 1 faster) are observable gauges per target, plus a violation
  counter. Targets left unset are not checked. Costs a comparison and a deque append per record.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.record import RequestRecord, StepRecord, Verdict
from processors.base import StepProcessor
from processors.config import build, invalid, key_path, positive

TARGETS = (sc.SLO_TARGET_TTFT, sc.SLO_TARGET_TPOT, sc.SLO_TARGET_STEP, sc.SLO_TARGET_REQUEST)


@dataclass
class SLOConfig:
    """Keys and defaults are listed in processors/README.md."""

    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    step_ms: Optional[float] = None
    step_phases: str = "decode,mixed"
    objective: float = 0.99
    window_s: float = 300.0
    max_records: int = 100000
    metrics: bool = True

    def validate(self, where: str = "") -> None:
        for k in ("ttft_ms", "tpot_ms", "step_ms"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise invalid(key_path(where, k), f"must be > 0, got {v!r}")
        if not 0.0 < self.objective < 1.0:
            raise invalid(key_path(where, "objective"), f"must be between 0 and 1 (exclusive), got {self.objective!r}")
        positive(where, window_s=self.window_s, max_records=self.max_records)
        bad = [p for p in self.phase_set() if p not in sc.PHASES]
        if bad:
            raise invalid(key_path(where, "step_phases"), f"unknown phase {bad[0]!r} (known: {', '.join(sc.PHASES)})")

    def phase_set(self) -> frozenset:
        return frozenset(p.strip() for p in self.step_phases.split(",") if p.strip())

    @classmethod
    def from_dict(cls, d, where: str = "") -> SLOConfig:
        return build(cls, d, where)


class _Window:
    """Rolling (time, ok) outcomes of one target over ``window_ns``; counts kept incrementally."""

    __slots__ = ("window_ns", "q", "n", "bad", "total", "total_bad")

    def __init__(self, window_ns: int, cap: int) -> None:
        self.window_ns = window_ns
        self.q: deque = deque(maxlen=cap)
        self.n = self.bad = self.total = self.total_bad = 0

    def add(self, t_ns: int, ok: bool) -> None:
        q = self.q
        if len(q) == q.maxlen:
            _, old_ok = q[0]
            self.n -= 1
            self.bad -= not old_ok
        q.append((t_ns, ok))
        self.n += 1
        self.bad += not ok
        self.total += 1
        self.total_bad += not ok
        edge = t_ns - self.window_ns
        while q and q[0][0] < edge:
            _, old_ok = q.popleft()
            self.n -= 1
            self.bad -= not old_ok

    def attainment(self) -> Optional[float]:
        n = self.n
        return None if n <= 0 else (n - self.bad) / n


class SLOProcessor(StepProcessor):
    name = "slo"

    def __init__(self, config=None, meter_provider=None) -> None:
        """``config``: an :class:`SLOConfig` or a dict of its keys; ``meter_provider``: where the gauges
        and the counter go (default: the global one)."""
        if config is None or isinstance(config, dict):
            config = SLOConfig.from_dict(config or {})
        self.cfg: SLOConfig = config
        self._phases = config.phase_set()
        w = int(config.window_s * 1e9)
        self.windows: dict[str, _Window] = {t: _Window(w, config.max_records) for t in TARGETS}
        self._lock = threading.Lock()
        self._m_viol = None
        self._m_checked = None
        if config.metrics:
            self._register_metrics(meter_provider)

    # -- records -----------------------------------------------------------------------------------
    def process(self, step: StepRecord) -> StepRecord:
        lim = self.cfg.step_ms
        if lim is None or step.phase not in self._phases:
            return step
        ok = (step.end_ns - step.start_ns) / 1e6 <= lim
        self.windows[sc.SLO_TARGET_STEP].add(step.end_ns, ok)
        self._check(sc.SLO_TARGET_STEP)
        if ok:
            return step
        self._count(sc.SLO_TARGET_STEP)
        v = step.verdict
        if v is None:
            v = Verdict(slo_violations=(sc.SLO_TARGET_STEP,))
        elif sc.SLO_TARGET_STEP not in v.slo_violations:
            v = dataclasses.replace(v, slo_violations=v.slo_violations + (sc.SLO_TARGET_STEP,))
        return dataclasses.replace(step, verdict=v)

    def process_request(self, request: RequestRecord) -> RequestRecord:
        c = self.cfg
        if c.ttft_ms is None and c.tpot_ms is None:
            return request
        viol = []
        t = request.end_ns
        for target, lim, val in ((sc.SLO_TARGET_TTFT, c.ttft_ms, request.ttft_ms),
                                 (sc.SLO_TARGET_TPOT, c.tpot_ms, request.tpot_ms)):
            if lim is None or val is None:
                continue
            ok = val <= lim
            self.windows[target].add(t, ok)
            self._check(target)
            if not ok:
                viol.append(target)
                self._count(target)
        self.windows[sc.SLO_TARGET_REQUEST].add(t, not viol)
        self._check(sc.SLO_TARGET_REQUEST)
        if viol:
            self._count(sc.SLO_TARGET_REQUEST)
        if not viol:
            return request
        return dataclasses.replace(request, slo_violations=tuple(request.slo_violations) + tuple(
            v for v in viol if v not in request.slo_violations))

    # -- metrics -----------------------------------------------------------------------------------
    def attainment(self, target: str) -> Optional[float]:
        return self.windows[target].attainment()

    def burn_rate(self, target: str) -> Optional[float]:
        a = self.attainment(target)
        return None if a is None else (1.0 - a) / (1.0 - self.cfg.objective)

    def _count(self, target: str) -> None:
        if self._m_viol is not None:
            self._m_viol.add(1, {sc.SLO_TARGET: target})

    def _check(self, target: str) -> None:
        if self._m_checked is not None:
            self._m_checked.add(1, {sc.SLO_TARGET: target})

    def _register_metrics(self, provider) -> None:
        from opentelemetry import metrics
        from opentelemetry.metrics import Observation

        meter = (provider or metrics.get_meter_provider()).get_meter(sc.SCOPE)

        def _obs(fn):
            def cb(_options):
                out = []
                for t in TARGETS:
                    v = fn(t)
                    if v is not None:
                        out.append(Observation(v, {sc.SLO_TARGET: t}))
                return out

            return cb

        meter.create_observable_gauge(sc.METRIC_SLO_ATTAINMENT, callbacks=[_obs(self.attainment)], unit="1",
                                      description="fraction within the SLO target over the rolling window")
        meter.create_observable_gauge(sc.METRIC_SLO_BURN_RATE, callbacks=[_obs(self.burn_rate)], unit="1",
                                      description="error-budget burn rate: (1 - attainment) / (1 - objective)")
        self._m_viol = meter.create_counter(sc.METRIC_SLO_VIOLATIONS, description="records over their SLO target")
        # violations / checked over any window is the error ratio the multi-window burn-rate alerts use
        # (otel-config/prometheus/prism-rules.yml); the objective is exported so the rules need no copy of it
        self._m_checked = meter.create_counter(sc.METRIC_SLO_CHECKED, description="records checked against an SLO target")
        objective = self.cfg.objective
        targets = [t for t, lim in ((sc.SLO_TARGET_TTFT, self.cfg.ttft_ms), (sc.SLO_TARGET_TPOT, self.cfg.tpot_ms),
                                    (sc.SLO_TARGET_STEP, self.cfg.step_ms)) if lim is not None]
        if self.cfg.ttft_ms is not None or self.cfg.tpot_ms is not None:
            targets.append(sc.SLO_TARGET_REQUEST)

        def _objective(_options):
            return [Observation(objective, {sc.SLO_TARGET: t}) for t in targets]

        meter.create_observable_gauge(sc.METRIC_SLO_OBJECTIVE, callbacks=[_objective], unit="1",
                                      description="fraction within target the SLO promises")

    def stats(self) -> dict:
        return {t: {"attainment": w.attainment(), "window": w.n, "total": w.total, "violations": w.total_bad}
                for t, w in self.windows.items()}
