"""The verdict on one step's residual: point, window and sustained-shift tests with hysteresis.

Input per step: ``r = log(observed / predicted)`` and the model's residual statistics learned out
of fold on normal steps (``center``, robust ``scale``, the 99.9% ``tail``, the spread of the
window mean). Everything below is in units of that scale (``d = (r - center) / scale``):

* point test: ``d > point_limit`` (``max(point_k, 1.25 * tail)``), catches spikes and large
  slowdowns on the step itself (lag 0);
* window test: the one-sided residual ``max(0, d)`` averaged over the last ``window`` steps
  against the limit learned from normal residuals (``win_mean + window_k * win_std``), catches
  moderate sustained slowdowns within a few steps (LatencyPrism's smoothed control chart);
* sustained-shift test: a one-sided CUSUM ``S = max(0, S + min(d, point_limit) - cusum_k)``, alarm
  at ``S > cusum_h``, catches slow drifts that stay under the other two limits;
* novelty: where the step's workload lies beyond the training envelope the model extrapolates, so
  the residual scale is widened by the caller (``inflate``) until a refit has learned the region;
* hysteresis: the *alarm* stays up until ``clear_steps`` steps in a row fire nothing, so alerts
  (rising edges) do not flap; a step is *anomalous* when the point test fires, or while a
  window/CUSUM alarm is up and the step itself is over ``flag_k`` and over ``min_rel``.

Pure and allocation-free per step (a few float operations and one bounded deque), so it runs on
the calling thread in about a microsecond.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class VerdictParams:
    point_k: float = 5.0
    window: int = 8
    window_k: float = 4.0
    cusum_k: float = 1.5
    cusum_h: float = 8.0
    flag_k: float = 1.5
    min_rel: float = 0.03
    clear_steps: int = 3


class KeyVerdict:
    """Verdict state of one (instance, phase)."""

    __slots__ = ("p", "win", "win_sum", "cusum", "alarm", "sustained", "quiet", "quiet_s")

    def __init__(self, params: VerdictParams) -> None:
        self.p = params
        self.win: deque = deque(maxlen=params.window)
        self.win_sum = 0.0
        self.cusum = 0.0
        self.alarm = False  # any test fired within the last clear_steps steps
        self.sustained = False  # a window or CUSUM alarm is up
        self.quiet = 0
        self.quiet_s = 0

    def judge(self, r: float, model, inflate: float = 1.0) -> tuple:
        """(score, anomalous, rising_edge) for one step's log residual ``r`` under ``model``;
        ``inflate`` widens the residual scale where the model extrapolates."""
        p = self.p
        d = (r - model.center) / (model.scale * inflate)
        point_lim = model.point_limit(p.point_k)
        # window of one-sided residuals
        e = d if d > 0.0 else 0.0
        win = self.win
        if len(win) == win.maxlen:
            self.win_sum -= win[0]
        win.append(e)
        self.win_sum += e
        wz = 0.0
        if len(win) == win.maxlen:
            wz = (self.win_sum / len(win) - model.win_mean) / model.win_std
        # CUSUM on the standardised residual, each step's push bounded by the point limit
        c = self.cusum + (d if d < point_lim else point_lim) - p.cusum_k
        c = 0.0 if c < 0.0 else (2.0 * p.cusum_h if c > 2.0 * p.cusum_h else c)
        self.cusum = c
        point = d > point_lim
        sus_fire = wz > p.window_k or c > p.cusum_h
        if sus_fire:
            self.sustained = True
            self.quiet_s = 0
        elif self.sustained:
            self.quiet_s += 1
            if self.quiet_s >= p.clear_steps:
                self.sustained = False
        rising = False
        if point or sus_fire:
            rising = not self.alarm
            self.alarm = True
            self.quiet = 0
        elif self.alarm:
            self.quiet += 1
            if self.quiet >= p.clear_steps:
                self.alarm = False
        rel = r - model.center
        anomalous = point or (self.sustained and d > p.flag_k and rel > p.min_rel)
        if anomalous and rel <= p.min_rel:
            anomalous = False
        score = d / point_lim
        s2 = wz / p.window_k
        s3 = c / p.cusum_h
        if s2 > score:
            score = s2
        if s3 > score:
            score = s3
        return score, anomalous, rising
