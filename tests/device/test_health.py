"""Device health: graceful without NVML, throttle decoding, nearest-sample selection, and evidence
attached to anomalous steps only."""

from __future__ import annotations

import pytest

from prism_otel import semconv as sc
from prism_otel.device.health import HealthSampler, decode_throttle
from prism_otel.device.processor import DeviceProcessor
from prism_otel.pipeline import replace_verdict
from prism_otel.record import StepRecord


def test_throttle_reasons():
    assert decode_throttle(0) == []
    assert decode_throttle(0x1) == []  # idle is not a throttle
    assert decode_throttle(0x4 | 0x40 | 0x1) == ["sw_power_cap", "hw_thermal_slowdown"]


def test_absent_nvml_is_graceful(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: NVML may well be there")
    assert HealthSampler.start_if_available() is None
    monkeypatch.setenv(sc.ENV_DEVICE_HEALTH, "0")
    assert HealthSampler.start_if_available() is None


def _sampler(samples):
    s = HealthSampler(interval_s=1.0)
    for t, snap in samples:
        s.ring.append((t, snap))
    return s


def test_nearest_sample_at_or_before_the_step():
    s = _sampler([(1_000, {0: {sc.HEALTH_SM_CLOCK_MHZ: 1980, "_nvlink_kib": (0, [1, 2])}}),
                  (2_000_000, {0: {sc.HEALTH_SM_CLOCK_MHZ: 1200, sc.HEALTH_THROTTLE_REASONS: ["sw_power_cap"]}}),
                  (9_000_000, {0: {sc.HEALTH_SM_CLOCK_MHZ: 1700}})])
    a = s.attributes_at(5_000_000)
    assert a[sc.HEALTH_SM_CLOCK_MHZ] == 1200 and a[sc.HEALTH_THROTTLE_REASONS] == ["sw_power_cap"]
    assert a[sc.HEALTH_AGE_MS] == 3.0 and a[sc.HEALTH_INDEX] == 0
    assert "_nvlink_kib" not in s.attributes_at(1_500)  # internal counters never leave
    assert s.attributes_at(500)[sc.HEALTH_SM_CLOCK_MHZ] == 1980  # all later: the earliest
    assert s.attributes_at(5_000_000, index=3) == {}
    assert HealthSampler().attributes_at(1) == {}


def _step(index, anomaly):
    s = StepRecord(instance="i", index=index, start_ns=0, end_ns=3_000_000, phase="decode", batch_size=1,
                   prefill_tokens=0, decode_tokens=1, attributes={sc.DEVICE_TIMING: "event"})
    return replace_verdict(s, anomaly=anomaly)


def test_evidence_only_on_anomalous_steps(clean_deepdive):
    clean_deepdive.enabled = False  # no burst here, only the evidence
    s = _sampler([(1_000_000, {0: {sc.HEALTH_SM_CLOCK_MHZ: 1100, sc.HEALTH_PROCESSES: 2}})])
    p = DeviceProcessor(rate=0.0, health=s)
    normal = p.process(_step(1, False))
    assert not any(k.startswith(sc.HEALTH_PREFIX) for k in normal.attributes)
    bad = p.process(_step(2, True))
    assert bad.attributes[sc.HEALTH_SM_CLOCK_MHZ] == 1100 and bad.attributes[sc.HEALTH_PROCESSES] == 2
    assert bad.attributes[sc.DEEPDIVE_REQUEST] == "disabled"
