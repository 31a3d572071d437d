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

import dataclasses
import math
from collections import deque
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from prism_otel import semconv as sc
from prism_otel.record import StepRecord, Verdict
from processors.base import StepProcessor

ROOT_CAUSE = "fleet:slower_than_peers"
DEFAULT_KEY = (sc.RES_FRAMEWORK, sc.RES_FRAMEWORK_VERSION, sc.GEN_AI_REQUEST_MODEL, sc.RES_DEVICE_KIND,
               sc.RES_DEVICE_NAME, sc.RES_SERVICE_NAME)


def _features(s: StepRecord) -> Tuple[float, ...]:
    return (1.0, float(s.batch_size), s.prefill_tokens / 100.0, float(s.decode_tokens), s.context_tokens / 1000.0)


class _Model:
    __slots__ = ("xs", "ys", "coef", "since_fit", "median")

    def __init__(self, size: int) -> None:
        self.xs: deque = deque(maxlen=size)
        self.ys: deque = deque(maxlen=size)
        self.coef: Optional[np.ndarray] = None
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
                self.coef = coef

    def predict(self, x) -> Optional[float]:
        if self.coef is not None:
            p = float(np.dot(self.coef, x))
            if p > 0:
                return max(p, 0.25 * self.median)
        return self.median or None


class _Instance:
    __slots__ = ("logs", "median", "since")

    def __init__(self, window: int) -> None:
        self.logs: deque = deque(maxlen=window)
        self.median = 0.0
        self.since = 0


class FleetProcessor(StepProcessor):
    name = "fleet"

    def __init__(self, key_attributes: Sequence[str] = DEFAULT_KEY, threshold: float = 1.25, min_steps: int = 32,
                 min_peers: int = 1, window: int = 256, model_window: int = 4096, refit_every: int = 128,
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
        self._key_of: Dict[str, Tuple[str, ...]] = {}
        self._models: Dict[Tuple[Tuple[str, ...], str], _Model] = {}
        self._groups: Dict[Tuple[str, ...], Dict[str, _Instance]] = {}

    def observe_resource(self, instance: str, resource: Mapping[str, Any]) -> None:
        if len(self._key_of) < self.max_instances:
            self._key_of[instance] = tuple(str(resource.get(a, "")) for a in self.key_attributes)

    def key_of(self, instance: str) -> Tuple[str, ...]:
        return self._key_of.get(instance, ())

    def process(self, step: StepRecord) -> StepRecord:
        if step.phase == "idle" or step.end_ns <= step.start_ns:
            return step
        key = self._key_of.get(step.instance, ())
        group = self._groups.setdefault(key, {})
        inst = group.get(step.instance)
        if inst is None:
            if len(group) >= self.max_instances:
                return step
            inst = group[step.instance] = _Instance(self.window)
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
            inst.median = float(np.median(np.fromiter(inst.logs, float)))
        if len(inst.logs) < self.min_steps:
            return step
        peers = [p.median for name, p in group.items() if name != step.instance and len(p.logs) >= self.min_steps]
        if len(peers) < self.min_peers:
            return step
        diff = inst.median - float(np.median(peers))
        return self._tag(step, key, diff, len(peers))

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
        return dataclasses.replace(step, attributes=attrs, verdict=verdict)

    def instances(self) -> Dict[str, float]:
        """Current ratio of each instance to its peers (for status and tests)."""
        out = {}
        for group in self._groups.values():
            for name, inst in group.items():
                peers = [p.median for n, p in group.items() if n != name and len(p.logs) >= self.min_steps]
                if peers and len(inst.logs) >= self.min_steps:
                    out[name] = math.exp(inst.median - float(np.median(peers)))
        return out
