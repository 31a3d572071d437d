"""The anomaly-aware export policy: for fleets whose backends cannot take every step.

Selected with the standard variable: ``OTEL_TRACES_SAMPLER=prism_anomaly`` and
``OTEL_TRACES_SAMPLER_ARG="N,K"`` (default ``8,100``; ``context=N,keep_one_in=K`` works too).

* Every step is still judged (the processors see all of them) and counted in the metrics.
* An anomalous step is exported with the ``N`` steps before it and the ``N`` steps after it;
* of the other steps, one in ``K`` is exported (every ``K``-th, so the rate is exact);
* request spans are always exported (a request links to the steps that served it; links to steps
  that were not exported point at nothing, which backends show as a missing span).

A ``Sampler`` decides when a span starts; which steps surround an anomaly is only known later, so the
window is applied by the companion's span sink (:class:`AnomalyWindow`), holding the last ``N``
normal steps' encoded spans until the next step decides their fate. :class:`AnomalyAwareSampler` is
the ``opentelemetry_traces_sampler`` entry point (``prism_anomaly``): it names the policy, and for
spans of other instrumentations in the same process (an SDK provider the application built) it
samples everything. The default stays "export every step".
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Optional

from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from prism_otel import semconv as sc

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8
DEFAULT_KEEP_ONE_IN = 100


def parse_arg(arg: Optional[str]) -> tuple[int, int]:
    """(N, K) from ``OTEL_TRACES_SAMPLER_ARG``; a bad value is reported and the defaults used."""
    n, k = DEFAULT_CONTEXT, DEFAULT_KEEP_ONE_IN
    if not arg or not arg.strip():
        return n, k
    try:
        parts = [p.strip() for p in arg.split(",") if p.strip()]
        if parts and all("=" in p for p in parts):
            kv = {a.strip(): int(b) for a, b in (p.split("=", 1) for p in parts)}
            unknown = set(kv) - {"context", "keep_one_in"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            n, k = kv.get("context", n), kv.get("keep_one_in", k)
        else:
            vals = [int(p) for p in parts]
            if len(vals) > 2:
                raise ValueError("expected N,K")
            n = vals[0]
            k = vals[1] if len(vals) > 1 else k
        if n < 0 or k < 1:
            raise ValueError("N must be >= 0 and K >= 1")
    except ValueError as exc:
        logger.error("prism-otel: %s=%r is not N,K (%s); using %d,%d", sc.OTEL_TRACES_SAMPLER_ARG, arg, exc,
                     DEFAULT_CONTEXT, DEFAULT_KEEP_ONE_IN)
        return DEFAULT_CONTEXT, DEFAULT_KEEP_ONE_IN
    return n, k


class AnomalyAwareSampler(Sampler):
    """The policy's name in the SDK's sampler registry (see the module docstring)."""

    def __init__(self, context: int = DEFAULT_CONTEXT, keep_one_in: int = DEFAULT_KEEP_ONE_IN) -> None:
        self.context = context
        self.keep_one_in = keep_one_in

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return f"PrismAnomalyAware{{context={self.context},keep_one_in={self.keep_one_in}}}"

    def window(self) -> AnomalyWindow:
        return AnomalyWindow(self.context, self.keep_one_in)


def anomaly_sampler(arg: Optional[str] = None) -> AnomalyAwareSampler:
    """``opentelemetry_traces_sampler`` entry point factory (the SDK passes ``OTEL_TRACES_SAMPLER_ARG``)."""
    return AnomalyAwareSampler(*parse_arg(arg))


class AnomalyWindow:
    """Which steps to export, decided as their verdicts arrive (``offer`` returns what to export now)."""

    def __init__(self, context: int = DEFAULT_CONTEXT, keep_one_in: int = DEFAULT_KEEP_ONE_IN) -> None:
        self.context = max(0, context)
        self.keep_one_in = max(1, keep_one_in)
        self._before: deque = deque()
        self._after = 0
        self._normal = 0
        self.held_out = 0  # normal steps that no window or sample took
        self.exported = 0

    def offer(self, anomalous: bool, item) -> list:
        out: list = []
        if anomalous:
            out.extend(self._before)
            self._before.clear()
            out.append(item)
            self._after = self.context
        elif self._after > 0:
            self._after -= 1
            out.append(item)
        else:
            self._normal += 1
            if self._normal % self.keep_one_in == 0:
                out.append(item)
            elif self.context:
                self._before.append(item)
                if len(self._before) > self.context:
                    self._before.popleft()
                    self.held_out += 1
            else:
                self.held_out += 1
        self.exported += len(out)
        return out


def from_env() -> tuple[Optional[Sampler], Optional[AnomalyWindow]]:
    """(the SDK sampler ``OTEL_TRACES_SAMPLER`` names or None for the default, the anomaly window or None)."""
    name = os.environ.get(sc.OTEL_TRACES_SAMPLER, "").strip().lower()
    arg = os.environ.get(sc.OTEL_TRACES_SAMPLER_ARG)
    if not name:
        return None, None
    if name == sc.SAMPLER_ANOMALY:
        s = anomaly_sampler(arg)
        return None, s.window()
    from opentelemetry.sdk.trace import sampling

    builtin = {"always_on": lambda: sampling.ALWAYS_ON, "always_off": lambda: sampling.ALWAYS_OFF,
               "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
               "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
               "traceidratio": lambda: sampling.TraceIdRatioBased(_rate(arg)),
               "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(_rate(arg)))}
    if name in builtin:
        return builtin[name](), None
    from importlib.metadata import entry_points

    for ep in entry_points(group="opentelemetry_traces_sampler"):
        if ep.name == name:
            try:
                s = ep.load()(arg)
            except Exception as exc:  # noqa: BLE001
                logger.error("prism-otel: sampler %r failed to load: %r; exporting every step", name, exc)
                return None, None
            if isinstance(s, AnomalyAwareSampler):
                return None, s.window()
            return s, None
    logger.error("prism-otel: %s=%r is not a known sampler; exporting every step", sc.OTEL_TRACES_SAMPLER, name)
    return None, None


def _rate(arg: Optional[str]) -> float:
    try:
        r = float(arg) if arg else 1.0
    except ValueError:
        r = 1.0
    return min(1.0, max(0.0, r))


__all__: Sequence[str] = ("AnomalyAwareSampler", "AnomalyWindow", "anomaly_sampler", "from_env", "parse_arg")
