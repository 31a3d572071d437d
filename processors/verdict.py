"""The verdict on one step's residual: point, window and sustained-shift tests with hysteresis.

Input per step: ``r = log(observed / predicted)`` and the model's residual statistics learned out
of fold on normal steps (``center``, robust ``scale`` s, the 99.9% ``tail``, the mean and spread of
the window mean). With ``u = r - center`` (about the relative excess over the expected latency):

* point test: ``u > max(point_k * s, 1.25 * tail * s, min_shift)``, capped at ``point_cap`` (a step
  1.65x its expected latency is anomalous however noisy or novel its workload): spikes and large
  slowdowns on the step itself (lag 0);
* window test: the one-sided residual ``max(0, u)`` averaged over the last ``window`` steps against
  the limit learned from normal residuals, ``max((win_mean + window_k * win_std) * s, min_shift)``:
  moderate sustained slowdowns within a few steps (LatencyPrism's smoothed control chart);
* sustained-shift test: a one-sided CUSUM ``S = max(0, S + min(u, point limit) - a)`` with
  allowance ``a = max(cusum_k * s, min_shift / 2)``, alarm at ``S > max(cusum_h * s, 2 * min_shift)``:
  slow drifts that stay under the other two limits;
* novelty: where the step's workload lies beyond what the model was trained on, the caller widens
  ``s`` (``inflate``) and marks the step novel until a refit has learned the region: a novel step
  does not feed the window or the CUSUM (see :meth:`KeyVerdict.judge`);
* hysteresis: the *alarm* stays up until ``clear_steps`` steps in a row fire nothing, so alerts
  (rising edges) do not flap; a step is *anomalous* when the point test fires, or while a
  window/CUSUM alarm is up and the step itself is over ``flag_k * s`` and over ``min_rel``.

``min_shift`` is the smallest sustained slowdown worth an alarm (default 8%): a model is never
perfect across every workload, and a bias of a few percent in a sparsely seen region must not read
as an anomaly however long it lasts. Pure, a few float operations and one bounded deque per step.
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
    cusum_h: float = 5.0
    flag_k: float = 1.5
    min_rel: float = 0.03
    min_shift: float = 0.08
    point_cap: float = 0.5
    clear_steps: int = 3


class KeyVerdict:
    """Verdict state of one (instance, phase)."""

    __slots__ = ("p", "win", "win_sum", "cusum", "alarm", "sustained", "quiet", "quiet_s", "level", "held_by")

    def __init__(self, params: VerdictParams) -> None:
        self.p = params
        self.win: deque = deque(maxlen=params.window)
        self.win_sum = 0.0
        self.cusum = 0.0
        self.alarm = False  # any test fired within the last clear_steps steps
        self.sustained = False  # a window or CUSUM alarm is up
        self.quiet = 0
        self.quiet_s = 0
        self.level = 0.0  # typical residual of the current sustained episode
        self.held_by = "window"  # the test that raised the current sustained alarm

    def judge(self, r: float, model, inflate: float = 1.0, novel: bool = False) -> tuple:
        """(score, anomalous, rising_edge, test) for one step's log residual ``r`` under ``model``
        (``test``: on an anomalous step, ``point``, ``window`` or ``shift``, the test that flagged it);
        ``inflate`` widens the residual scale where the model extrapolates. A ``novel`` step (a
        workload the model has not learned yet) leaves the window and the CUSUM as they are: a model's
        error where it extrapolates is no evidence of a shift. Outside an alarm it is judged by the
        (widened) point test alone; inside one it holds the alarm while it stays near the episode's
        level (an anomaly that pushed the workload somewhere new, e.g. a backlog) and counts towards
        clearing it once it falls under half of that level (the episode ended)."""
        p = self.p
        s = model.scale * inflate
        u = r - model.center
        point_thr = model.point_limit(p.point_k) * s
        if point_thr < p.min_shift:
            point_thr = p.min_shift
        elif point_thr > p.point_cap:
            point_thr = p.point_cap  # e^0.5 = 1.65x expected is anomalous however noisy or novel
        point = u > point_thr
        if novel:
            return self._judge_novel(u, s, point, point_thr)
        # window of one-sided residuals
        e = u if u > 0.0 else 0.0
        win = self.win
        if len(win) == win.maxlen:
            self.win_sum -= win[0]
        win.append(e)
        self.win_sum += e
        win_thr = (model.win_mean + p.window_k * model.win_std) * s
        if win_thr < p.min_shift:
            win_thr = p.min_shift
        wm = self.win_sum / len(win) if len(win) == win.maxlen else 0.0
        # CUSUM, each step's push bounded by the point limit
        a = p.cusum_k * s
        if a < 0.5 * p.min_shift:
            a = 0.5 * p.min_shift
        h = p.cusum_h * s
        if h < 2.0 * p.min_shift:
            h = 2.0 * p.min_shift
        c = self.cusum + (u if u < point_thr else point_thr) - a
        c = 0.0 if c < 0.0 else (2.0 * h if c > 2.0 * h else c)
        if c > h and len(win) == win.maxlen and wm < 0.5 * win_thr:
            c = h  # the last window looks normal again: recover in a step, not 2h / a of them
        self.cusum = c
        win_fire, shift_fire = wm > win_thr, c > h
        sus_fire = win_fire or shift_fire
        if sus_fire:
            if not self.sustained:
                self.level = wm if wm > u else u
                self.held_by = "window" if win_fire else "shift"
            self.sustained = True
            self.quiet_s = 0
        elif self.sustained:
            self.quiet_s += 1
            if self.quiet_s >= p.clear_steps:
                self.sustained = False
        rising = self._alarm(point or sus_fire)
        anomalous = point or (self.sustained and u > p.flag_k * s and u > p.min_rel)
        if self.sustained and anomalous:
            self.level += 0.1 * (u - self.level)
        score = u / point_thr
        s2 = wm / win_thr
        s3 = c / h
        if s2 > score:
            score = s2
        if s3 > score:
            score = s3
        test = None
        if anomalous:
            test = "point" if point else ("window" if win_fire else ("shift" if shift_fire else self.held_by))
        return score, anomalous, rising, test

    def _judge_novel(self, u: float, s: float, point: bool, point_thr: float) -> tuple:
        p = self.p
        held = False
        if self.sustained:
            if u >= 0.5 * self.level:
                held = True
                self.quiet_s = 0
            else:
                self.quiet_s += 1
                if self.quiet_s >= p.clear_steps:
                    # the episode ended while the workload was somewhere new: its evidence is stale
                    self.sustained = False
                    self.cusum = self.win_sum = 0.0
                    self.win.clear()
        rising = self._alarm(point or held)
        anomalous = point or (held and u > p.flag_k * s and u > p.min_rel)
        test = ("point" if point else self.held_by) if anomalous else None
        return u / point_thr, anomalous, rising, test

    def _alarm(self, fired: bool) -> bool:
        """Update the alarm (hysteresis); True on its rising edge."""
        if fired:
            rising = not self.alarm
            self.alarm = True
            self.quiet = 0
            return rising
        if self.alarm:
            self.quiet += 1
            if self.quiet >= self.p.clear_steps:
                self.alarm = False
        return False
