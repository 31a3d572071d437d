"""Per-stage aggregation for the exit summary (bounded: a reservoir of durations per stage and phase)."""

from __future__ import annotations

import random

from prism_otel.record import StepRecord

_RESERVOIR = 4096
_random = random.random


class _Series:
    __slots__ = ("n", "total_ns", "sample")

    def __init__(self) -> None:
        self.n = 0
        self.total_ns = 0
        self.sample: list[int] = []

    def add(self, ns: int) -> None:
        self.n += 1
        self.total_ns += ns
        if len(self.sample) < _RESERVOIR:
            self.sample.append(ns)
        else:  # reservoir sampling: replace a random entry with probability _RESERVOIR / n
            j = int(_random() * self.n)
            if j < _RESERVOIR:
                self.sample[j] = ns

    def quantile(self, q: float) -> float:
        s = sorted(self.sample)
        if not s:
            return 0.0
        return s[min(len(s) - 1, int(q * len(s)))] / 1e6


class StageStats:
    """Counts and latency quantiles per stage, plus whole steps per phase."""

    def __init__(self) -> None:
        self.stages: dict[str, _Series] = {}
        self.steps: dict[str, _Series] = {}
        self.tokens = 0
        self.anomalies = 0
        self.judged = 0

    def add(self, step: StepRecord) -> None:
        self._series(self.steps, step.phase).add(step.end_ns - step.start_ns)
        stages = self.stages
        for name, (t0, t1) in step.stages.items():
            s = stages.get(name)
            if s is None:
                s = stages[name] = _Series()
            s.add(t1 - t0)
        for group, ns in step.kernel_groups.items():
            self._series(stages, "kernels." + group).add(ns)
        self.tokens += step.tokens
        v = step.verdict
        if v is not None and v.expected_ms is not None:
            self.judged += 1
        if v is not None and v.anomaly:
            self.anomalies += 1

    @staticmethod
    def _series(d: dict[str, _Series], key: str) -> _Series:
        s = d.get(key)
        if s is None:
            s = d[key] = _Series()
        return s

    def render(self) -> str:
        total_step_ns = sum(s.total_ns for s in self.steps.values()) or 1
        nsteps = sum(s.n for s in self.steps.values())
        unjudged = nsteps - self.judged
        lines = [f"prism-otel: {nsteps} steps, {self.tokens} tokens; {self.judged} judged by the detector, "
                 f"{self.anomalies} of them anomalous"
                 + (f"; {unjudged} not judged (no model for their phase yet: not known to be healthy)" if unjudged else ""),
                 f"{'':2}{'stage':<22}{'count':>8}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}{'share':>8}"]

        def row(name: str, s: _Series) -> str:
            return (f"{'':2}{name:<22}{s.n:>8}{s.total_ns / s.n / 1e6:>10.3f}{s.quantile(0.5):>10.3f}"
                    f"{s.quantile(0.99):>10.3f}{100 * s.total_ns / total_step_ns:>7.1f}%")

        for name, s in sorted(self.steps.items()):
            lines.append(row("step[" + name + "]", s))
        for name, s in sorted(self.stages.items(), key=lambda kv: -kv[1].total_ns):
            lines.append(row(name, s))
        try:
            from processors.incidents import summary_lines

            lines += summary_lines(judged=self.judged)
        except ImportError:
            pass
        return "\n".join(lines)
