"""Small deterministic synthetic streams shared by the processor tests."""

from __future__ import annotations

import functools

import numpy as np

from prism_eval.simulate.synthetic import PROFILES, WORKLOADS, Anomaly, simulate

QUIET = {"background": False, "alert_file": "none", "alert_log": False}

# one episode of every shape, far enough apart that each is judged on its own
EPISODES = (
    Anomaly("spike", 300, 1, 1.0),  # an isolated spike is an incident only when extreme (2x here)
    Anomaly("slowdown", 600, 120, 0.10),
    Anomaly("slowdown", 1000, 60, 1.0),
    Anomaly("stall", 1300, 80, 0.5, stage="schedule"),
    Anomaly("drift", 1600, 450, 0.5, ramp=350),
)


@functools.cache
def shapes_stream():
    return simulate(PROFILES["gpu8b"], WORKLOADS["chat"], 2300, seed=11, anomalies=EPISODES, instance="t-shapes",
                    n_train=1000)


@functools.cache
def shift_stream():
    """No anomaly; a tidal load plus a 3x arrival surge and a 3x prompt-length shift (bursty)."""
    return simulate(PROFILES["gpu8b"], WORKLOADS["bursty"], 3000, seed=12, instance="t-shift", n_train=1000)


def run(proc, steps):
    """Process steps in order; (flags, verdicts)."""
    verdicts = [proc.process(s).verdict for s in steps]
    flags = np.array([bool(v is not None and v.anomaly) for v in verdicts])
    return flags, verdicts
