"""Fleet comparison: is this engine instance slower than its peers doing the same work?

A detector that learns each instance's own baseline cannot see a fault the instance had from its
first step: the fault *is* its baseline. Instances that share a baseline key (resource attributes:
framework and version, model, device, service) should cost the same for the same workload, so
:class:`FleetProcessor` compares them:

* one workload model per (key, phase), fitted by least squares on recent steps of *all* instances
  with that key: duration ~ batch size, prefill tokens, decode tokens, context tokens;
* per instance, the median log of (observed / predicted) over its last ``window`` steps;
* an instance whose median exceeds the median of its peers' by ``threshold`` (a ratio) is slow:
  its steps get ``prism.fleet.slow``, ``prism.fleet.ratio``, ``prism.fleet.peers`` and, with
  ``flag_anomaly``, an anomaly verdict with root cause ``fleet:slower_than_peers``.

Runs on the collector's pipeline thread; per step it costs a dot product and, every
``refit_every`` steps of a group, a small least-squares fit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from prism_otel import semconv as sc
from prism_otel.record import StepRecord, Verdict
from processors.base import StepProcessor

ROOT_CAUSE = "fleet:slower_than_peers"
DEFAULT_KEY = (sc.RES_FRAMEWORK, sc.RES_FRAMEWORK_VERSION, sc.GEN_AI_REQUEST_MODEL, sc.RES_DEVICE_KIND,
               sc.RES_DEVICE_NAME, sc.RES_SERVICE_NAME)


def _features(s: StepRecord) -> tuple[float, ...]:
    return (1.0, float(s.batch_size), s.prefill_tokens / 100.0, float(s.decode_tokens), s.context_tokens / 1000.0)


class _Model:
    __slots__ = ("xs", "ys", "coef", "since_fit", "median")

    def __init__(self, size: int) -> None:
        self.xs: deque = deque(maxlen=size)
        self.ys: deque = deque(maxlen=size)
        self.coef: Optional[tuple[float, ...]] = None
        self.since_fit = 0
        self.median = 0.0

    def add(self, x, y: float, refit_every: int) -> None:
        self.xs.append(x)
        self.ys.append(y)
        self.since_fit += 1
        if self.since_fit >= refit_every or (self.coef is None and len(self.ys) >= 8 and self.since_fit >= 8):
            self.since_fit = 0
            ys = np.fromiter(self.ys, float)
            self.median = float(np.median(ys))
            if len(ys) >= 16:
                coef, *_ = np.linalg.lstsq(np.asarray(self.xs, float), ys, rcond=None)
                self.coef = tuple(float(c) for c in coef)

    def predict(self, x) -> Optional[float]:
        c = self.coef
        if c is not None:
            p = c[0] * x[0] + c[1] * x[1] + c[2] * x[2] + c[3] * x[3] + c[4] * x[4]
            if p > 0:
                return max(p, 0.25 * self.median)
        return self.median or None


class _Instance:
    __slots__ = ("logs", "median", "since")

    def __init__(self, window: int) -> None:
        self.logs: deque = deque(maxlen=window)
        self.median = 0.0
        self.since = 0


class _Group:
    """Instances sharing a key; the peers' reference is recomputed every few steps, not every step."""

    __slots__ = ("instances", "since", "ref")

    def __init__(self) -> None:
        self.instances: dict[str, _Instance] = {}
        self.since = 0
        self.ref: dict[str, tuple[float, int]] = {}  # instance -> (median of its peers' medians, n peers)


class FleetProcessor(StepProcessor):
    name = "fleet"

    def __init__(self, key_attributes: Sequence[str] = DEFAULT_KEY, threshold: float = 1.25, min_steps: int = 32,
                 min_peers: int = 1, window: int = 256, model_window: int = 4096, refit_every: int = 512,
                 flag_anomaly: bool = True, max_instances: int = 4096) -> None:
        self.key_attributes = tuple(key_attributes)
        self.threshold = threshold
        self.log_threshold = math.log(threshold)
        self.min_steps = min_steps
        self.min_peers = min_peers
        self.window = window
        self.model_window = model_window
        self.refit_every = refit_every
        self.flag_anomaly = flag_anomaly
        self.max_instances = max_instances
        self._key_of: dict[str, tuple[str, ...]] = {}
        self._models: dict[tuple[tuple[str, ...], str], _Model] = {}
        self._groups: dict[tuple[str, ...], _Group] = {}

    def observe_resource(self, instance: str, resource: Mapping[str, Any]) -> None:
        if len(self._key_of) < self.max_instances:
            self._key_of[instance] = tuple(str(resource.get(a, "")) for a in self.key_attributes)

    def key_of(self, instance: str) -> tuple[str, ...]:
        return self._key_of.get(instance, ())

    def forget_instance(self, instance: str) -> None:
        """Drop what is kept for ``instance`` (the collector evicts idle instances)."""
        key = self._key_of.pop(instance, None)
        groups = [self._groups[key]] if key in self._groups else list(self._groups.values())
        for g in groups:
            g.instances.pop(instance, None)
            g.ref.pop(instance, None)

    def process(self, step: StepRecord) -> StepRecord:
        if step.phase == "idle" or step.end_ns <= step.start_ns:
            return step
        key = self._key_of.get(step.instance, ())
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        inst = group.instances.get(step.instance)
        if inst is None:
            if len(group.instances) >= self.max_instances:
                return step
            inst = group.instances[step.instance] = _Instance(self.window)
        model = self._models.get((key, step.phase))
        if model is None:
            model = self._models[(key, step.phase)] = _Model(self.model_window)
        x = _features(step)
        dur = step.duration_ms
        pred = model.predict(x)
        model.add(x, dur, self.refit_every)
        if pred is None:
            return step
        inst.logs.append(math.log(max(dur, 1e-6) / pred))
        inst.since += 1
        if inst.since >= 16 or len(inst.logs) <= self.min_steps:
            inst.since = 0
            inst.median = statistics.median(inst.logs)
        if len(inst.logs) < self.min_steps:
            return step
        group.since += 1
        if group.since >= 16 or step.instance not in group.ref:
            group.since = 0
            self._refresh(group)
        ref = group.ref.get(step.instance)
        if ref is None or ref[1] < self.min_peers:
            return step
        return self._tag(step, key, inst.median - ref[0], ref[1])

    def _refresh(self, group: _Group) -> None:
        ready = {n: i.median for n, i in group.instances.items() if len(i.logs) >= self.min_steps}
        group.ref = {}
        for name in ready:
            peers = [m for n, m in ready.items() if n != name]
            if peers:
                group.ref[name] = (statistics.median(peers), len(peers))

    def _tag(self, step: StepRecord, key, diff: float, n_peers: int) -> StepRecord:
        slow = diff >= self.log_threshold
        attrs = dict(step.attributes)
        attrs[sc.FLEET_SLOW] = slow
        attrs[sc.FLEET_RATIO] = round(math.exp(diff), 4)
        attrs[sc.FLEET_PEERS] = n_peers
        if slow:
            attrs[sc.FLEET_KEY] = "|".join(key)
        verdict = step.verdict
        if slow and self.flag_anomaly and (verdict is None or not verdict.anomaly):
            base = verdict or Verdict()
            verdict = dataclasses.replace(base, anomaly=True, root_cause=base.root_cause or ROOT_CAUSE,
                                          score=base.score if base.score is not None else round(math.exp(diff), 4))
        out = copy.copy(step)  # dataclasses.replace re-runs __init__: 5x the cost on this per-step path
        object.__setattr__(out, "attributes", attrs)
        object.__setattr__(out, "verdict", verdict)
        return out

    def instances(self) -> dict[str, float]:
        """Current ratio of each instance to its peers (for status and tests)."""
        out = {}
        for group in self._groups.values():
            self._refresh(group)
            for name, (ref, _) in group.ref.items():
                out[name] = math.exp(group.instances[name].median - ref)
        return out
