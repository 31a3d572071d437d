"""The device processor: turns verdicts into DeepDive bursts and puts device health on anomalous steps.

It runs on the pipeline thread after the detection processors (so it sees their verdicts), once per
step, and costs a few attribute reads unless the step is anomalous:

* anomalous step: asks for a burst (trigger ``anomaly``; the outcome - armed, rate_limited, busy -
  goes on the step as ``prism.deepdive.request``; the burst's steps carry
  ``prism.deepdive.trigger_step`` = this step's index, which links them back) and attaches the
  device-health sample nearest the step's end (``prism.device.health.*``);
* a signal was received (``PRISM_OTEL_DEEPDIVE_SIGNAL``) or the step index is listed in
  ``PRISM_OTEL_DEEPDIVE_AT_STEP``: an on-demand burst (not rate-limited);
* otherwise, with probability ``PRISM_OTEL_DEEPDIVE_RATE``: a sampled burst (rate-limited).

Automatic bursts (anomaly, sample) happen on steps timed by device events, i.e. on an accelerator;
on a CPU-only engine only when ``PRISM_OTEL_DEEPDIVE=1`` (the groups are then host time). On-demand
bursts work everywhere; ``PRISM_OTEL_DEEPDIVE=0`` turns every kind off.

The health sampler starts with the first step timed by device events (an accelerator is in use).
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.device.deepdive import DEEPDIVE, DeepDive
from prism_otel.record import StepRecord
from processors.base import StepProcessor  # (the processors package ships in the same distribution)


def _at_steps() -> frozenset:
    raw = os.environ.get(sc.ENV_DEEPDIVE_AT_STEP, "")
    out = set()
    for part in raw.split(","):
        part = part.strip()
        if part.isdigit():
            out.add(int(part))
    return frozenset(out)


class DeviceProcessor(StepProcessor):
    name = "device"

    def __init__(self, deepdive: Optional[DeepDive] = None, rate: Optional[float] = None, health=True,
                 seed: Optional[int] = None, on_host: Optional[bool] = None) -> None:
        self.dd = deepdive or DEEPDIVE
        self.rate = self.dd.rate if rate is None else rate
        self.on_host = os.environ.get(sc.ENV_DEEPDIVE, "") == "1" if on_host is None else on_host
        self.at_steps = _at_steps()
        self._rand = random.Random(seed).random
        self._health_wanted = health
        self.health = None if isinstance(health, bool) else health
        self._health_tried = not health or self.health is not None
        self.outcomes: dict = {}

    def _start_health(self, step: StepRecord) -> None:
        self._health_tried = True
        if step.attributes.get(sc.DEVICE_TIMING) != "event":
            self._health_tried = False  # not on an accelerator (yet): look again later
            return
        from prism_otel.device.health import HealthSampler

        self.health = HealthSampler.start_if_available()

    def process(self, step: StepRecord) -> StepRecord:
        if not self._health_tried:
            self._start_health(step)
        dd = self.dd
        v = step.verdict
        attrs = None
        auto = self.on_host or step.attributes.get(sc.DEVICE_TIMING) == "event"
        if v is not None and v.anomaly and auto:
            attrs = {sc.DEEPDIVE_REQUEST: dd.request("anomaly", step.index)}
            if self.health is not None:
                from prism_otel.device.timing import DEVICE_INDEX

                attrs.update(self.health.attributes_at(step.end_ns, DEVICE_INDEX.get("cuda", 0)))
        elif dd.signal_flag or step.index in self.at_steps:
            dd.signal_flag = False
            attrs = {sc.DEEPDIVE_REQUEST: dd.request("on_demand", step.index, force=True)}
        elif auto and self.rate > 0 and dd.enabled and not dd.pending and self._rand() < self.rate:
            outcome = dd.request("sample", step.index)
            if outcome == "armed":
                attrs = {sc.DEEPDIVE_REQUEST: outcome}
        if attrs is None:
            return step
        o = attrs[sc.DEEPDIVE_REQUEST]
        self.outcomes[o] = self.outcomes.get(o, 0) + 1
        return dataclasses.replace(step, attributes={**step.attributes, **attrs})

    def shutdown(self) -> None:
        if self.health is not None:
            self.health.stop()
