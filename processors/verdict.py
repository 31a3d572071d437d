"""The verdict on one step: tests calibrated to the engine's own noise, on a residual corrected for the
workload it runs.

Input per step: ``u = log(observed / expected) - center``, the relative excess over what the model
expects. Real engines are noisy in a particular way (measured on the real-data corpus, docs/detection.md):
about one normal step in a hundred is 20-80% slower than expected, and the slow ones come in clusters
of a few steps (a descheduled thread, a cache refill, a collection). A test whose limit ignores that
flags a few percent of healthy steps, and a monitor that does gets muted. So:

* **Every limit is calibrated on the engine's own normal steps.** When the model is fitted, the
  out-of-fold residuals of its training steps, in time order, are run through the same tests as live
  steps; each test's limit is the ``1 - alpha`` quantile of its statistic there (extrapolated from the
  90th and 99th percentiles while the sample is small), never under a floor. Clusters of slow steps
  in the training data raise the window limits exactly as much as they need.
* **Tests on several time scales**, each with its name on the flagged step (``prism.anomaly.test``):

  - ``point``: the step alone, over its limit and over ``min_point`` (1.5x expected by default): an
    isolated spike is not an incident unless it is extreme;
  - ``window``: the median of the last ``short`` steps, or of the last ``window``: a slowdown that lasts
    a few steps (a median: one spike in the window moves it not at all);
  - ``shift``: the median of the last ``long_window`` steps: a small slowdown that lasts.

  A window or shift test flags a step only while the step itself is slow (over half that test's
  limit): when an episode ends, its last steps still fill the window, but the steps after it are not
  flagged for them.

* **Workload cells.** A model is never equally good everywhere: on a workload it saw little of, it is
  off by a few percent for as long as that workload runs, and that is no anomaly. Each (instance, phase)
  keeps the recent residual of every workload cell (batch size in half-octaves, context per request and
  new tokens in octaves) from its unflagged steps outside an episode, and the tests judge the residual
  minus that bias. A cell's first ``cell_min_steps`` steps set its bias: the window and shift tests
  flag them only ``max_bias`` over their limits (the point test as always), so a workload never seen
  before is learned, not flagged for being new; a slowdown that starts later in the same workload is
  judged against it. A bias never exceeds ``max_bias`` (20%): no cell can learn a real slowdown away,
  and a process that starts slow (a restart into a fault) is still flagged.
* **Hysteresis** for alerts: the alarm stays up until ``clear_steps`` steps in a row fire nothing; its
  rising edge is the alert.

Pure Python: a few float operations, three bounded deques and three small sorts per step.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

TESTS = ("point", "short", "window", "shift")
NAME = {"point": "point", "short": "window", "window": "window", "shift": "shift"}  # semconv.ANOMALY_TESTS
MAX_CELLS = 512


@dataclass
class VerdictParams:
    alpha: float = 0.002
    short: int = 3
    window: int = 8
    long_window: int = 32
    min_point: float = 0.405  # log(1.5)
    min_shift: float = 0.08
    clear_steps: int = 8
    cell_min_steps: int = 0
    bias_rate: float = 0.02
    max_bias: float = 0.2


def cell_of(x: Sequence[float]) -> Tuple[int, int, int]:
    """Workload cell of a feature row (processors.features): batch in half-octaves, context per request
    and new tokens in octaves."""
    b, new, ctx = x[0], x[1], x[8]
    return (int(2.0 * math.log2(b)) if b >= 1 else -1, int(math.log2(ctx)) if ctx >= 1 else -1,
            int(math.log2(new + 1.0)))


def _median(d: deque) -> float:
    s = sorted(d)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class _Stats:
    """The running statistics of one residual stream: the step, and the medians of the last ``short``,
    ``window`` and ``long_window`` steps (the long one every 4 steps: it moves slowly)."""

    __slots__ = ("short", "win", "long", "n", "last_long")

    def __init__(self, p: VerdictParams) -> None:
        self.short: deque = deque(maxlen=p.short)
        self.win: deque = deque(maxlen=p.window)
        self.long: deque = deque(maxlen=p.long_window)
        self.n = 0
        self.last_long = 0.0

    def push(self, v: float) -> Dict[str, float]:
        self.short.append(v)
        self.win.append(v)
        self.long.append(v)
        self.n += 1
        out = {"point": v}
        if len(self.short) == self.short.maxlen:
            out["short"] = _median(self.short)
        if len(self.win) == self.win.maxlen:
            out["window"] = _median(self.win)
        if len(self.long) == self.long.maxlen:
            if self.n % 4 == 0 or not self.last_long:
                self.last_long = _median(self.long)
            out["shift"] = self.last_long
        return out


class Cells:
    """The residual bias of each workload cell, learned from unflagged steps (bounded, least recent out).

    A cell learns its offset from the *recent level of all cells* (``level``, a slow average over every
    learned step): what is particular to the workload, not what moves every workload at once. So a slow
    drift of the whole engine is not absorbed by the cells (the shift test sees it), while a workload
    the model is a few percent off on is."""

    __slots__ = ("p", "_c", "level")

    def __init__(self, p: VerdictParams) -> None:
        self.p = p
        self._c: "OrderedDict[tuple, list]" = OrderedDict()  # cell -> [bias, steps learned, steps seen]
        self.level = 0.0

    def get(self, cell, known=None) -> list:
        """The cell's entry; a cell new here starts from ``known`` (its bias in the model's training
        steps, :func:`calibrate`) when given, learned already."""
        e = self._c.get(cell)
        if e is None:
            m = self.p.cell_min_steps
            e = self._c[cell] = [0.0, 0, 0] if known is None else [float(known), m + 1, m + 1]
            if len(self._c) > MAX_CELLS:
                self._c.popitem(last=False)
        else:
            self._c.move_to_end(cell)
        return e

    def learn(self, e: list, u: float) -> None:
        b, n = e[0], e[1]
        d = u - self.level
        rate = 1.0 / (n + 1) if n + 1 < 1.0 / self.p.bias_rate else self.p.bias_rate
        b += rate * (d - b)
        m = self.p.max_bias
        e[0] = -m if b < -m else (m if b > m else b)
        e[1] = n + 1
        self.level += 0.01 * (u - self.level)




def _quantile_limit(values: Sequence[float], alpha: float, floor: float) -> float:
    """The ``1 - alpha`` quantile, extrapolated from the 90th and 99th percentiles (an exponential
    tail) while the sample is too small to hold it; never under ``floor``."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) < 20:
        return max(floor, 1.0)
    q90, q99 = float(np.quantile(v, 0.90)), float(np.quantile(v, 0.99))
    tail = q99 + max(q99 - q90, 0.0) * math.log10(0.01 / alpha)
    lim = float(np.quantile(v, 1.0 - alpha)) if len(v) * alpha >= 5 else tail
    return max(floor, lim)


def calibrate(residuals: Sequence[float], X: Sequence[Sequence[float]], p: VerdictParams) -> tuple:
    """Each test's limit from normal residuals in time order (their feature rows give the cells): the
    residuals go through the same cells and statistics as live steps. Returns ``(limits, cells)``:
    ``cells`` maps each workload cell with at least ``cell_min_steps`` training steps to its bias, so
    a verdict (a restarted process too) starts from it instead of learning it again."""
    cells = Cells(p)
    st = _Stats(p)
    seen: Dict[str, list] = {t: [] for t in TESTS}
    for u, x in zip(residuals, X):
        e = cells.get(cell_of(x))
        e[2] += 1
        v = u - e[0] if e[1] else u
        for t, val in st.push(v).items():
            seen[t].append(val)
        cells.learn(e, u)
    floors = {"point": p.min_point, "short": p.min_shift, "window": p.min_shift, "shift": p.min_shift}
    limits = {t: _quantile_limit(seen[t], p.alpha, floors[t]) for t in TESTS}
    known = {c: e[0] for c, e in cells._c.items() if e[1] >= p.cell_min_steps}
    return limits, known


class KeyVerdict:
    """Verdict state of one (instance, phase)."""

    __slots__ = ("p", "stats", "cells", "alarm", "quiet")

    def __init__(self, params: VerdictParams) -> None:
        self.p = params
        self.stats = _Stats(params)
        self.cells = Cells(params)
        self.alarm = False  # a test fired within the last clear_steps steps
        self.quiet = 0

    def judge(self, u: float, x, model) -> tuple:
        """(score, anomalous, rising_edge, test) for one step's residual ``u`` (``log(y / expected) -
        center``) with features ``x``, against ``model.limits`` (:func:`calibrate`). ``test``: on an anomalous step, ``point``, ``window`` or ``shift``."""
        p = self.p
        limits = model.limits
        c = cell_of(x)
        e = self.cells.get(c, model.cells.get(c))
        e[2] += 1
        learning = e[2] <= p.cell_min_steps  # the cell's first steps here set its bias
        v = u - e[0] if e[1] else u
        fired = None
        score = -1e9
        for t, val in self.stats.push(v).items():
            lim = limits.get(t)
            if lim is None:
                continue
            s = val / lim
            if s > score:
                score = s
            if fired is None and val > lim and (t == "point" or (
                    v > 0.5 * lim and (not learning or val > lim + p.max_bias))):
                fired = t
        anomalous = fired is not None
        # learn the cell's bias from normal steps outside an episode (the steps of a slowdown that happen
        # to pass must not teach it, nor a queue a slowdown built, which moves the workload somewhere new)
        if not self.alarm and not anomalous:
            self.cells.learn(e, u)
        rising = self._alarm(anomalous)
        return score, anomalous, rising, (NAME[fired] if anomalous else None)

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


