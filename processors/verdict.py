"""The verdict on one step: tests on a residual corrected for the workload and for the engine's recent
level, on a scale of its own for steps where the batch changes, at an operating point chosen by
injecting slowdowns into the engine's own training steps.

Input per step: ``u = log(observed / expected) - center``, the relative excess over what the model
expects. What real engines do to it (measured: docs/detection.md):

* **Heavy tails sit on event steps.** On a real GPU server the steps where the batch changes (a request
  joins or leaves, the batch size moves, a run starts) are about a tenth of the steps and carry most of
  the tail (residual p99 ~0.76 against ~0.12 for the rest). Limits taken over all steps are set by
  them and end above the slowdowns worth catching. So each step is judged on the scale of its class
  (:func:`processors.features.step_class`: the step that changes the batch, the step after it, the
  rest), each scale measured on the out-of-fold training residuals of that class alone.
* **A workload the model knows little of** is off by a few percent for as long as it runs. Each
  instance keeps the bias of every workload cell (batch size in half-octaves, context per request and
  new tokens in octaves) learned from its unflagged steps, capped at ``max_bias``; the cells of the
  training data are carried in the model.
* **The machine's speed wanders** (frequency, neighbours, caches): on CPU engines, stretches of normal
  steps run 10-40% slow for tens of steps. The residual is taken against the instance's recent *level*
  (an average of its unflagged steps at rate ``level_rate``, each step's pull clipped to ``GATE`` of its
  class scales), which may absorb at most ``max_level``: a slowdown that is being flagged does not teach
  it, one that is not moves it slowly. After ``release`` flagged steps in a row it learns again (a new
  normal; the ``shift`` test, which ignores the level, still flags a lasting slowdown).

The tests, on ``z = (u - cell bias - level) / scale of the step's class`` (``prism.anomaly.test`` names
the one that fired):

* ``point``: one step far over (``z > point``; and at least ``min_point`` over expected);
* ``window``: two steps in a row over a lower bar (``pair``), the median of the last ``short`` over
  ``window``, or, once flagged, the next steps while they stay over ``stay`` (hysteresis);
* ``shift``: the median of the last ``long_window`` residuals (cell-corrected, not level-corrected)
  over its limit, the median of the last three over it too (still slow: not the tail of an episode)
  and the step over half of it: a small slowdown that lasts, or one that grows slowly.

Every flagged step is itself at least ``min_shift`` over its expected latency.

**The operating point** (:func:`calibrate`): when a model is fitted, the out-of-fold residuals of its
training steps run, in time order, through the same cells and level; slowdowns of the evaluation's
recipe (flat 1.3-3x over 10-50 steps, ramps, 3-8-step bursts) are injected into copies of that
stretch; the bars (``point``, ``pair``, ``window``, ``stay``) are the ones with the best F1 whose
false-positive rate on the clean steps stays within ``target_fpr``. No bar is a raw quantile that a few
event steps decide; the ``shift`` limit is the ``1 - alpha`` quantile of its statistic.

**Hysteresis** for alerts: the alarm stays up until ``clear_steps`` steps in a row fire nothing; its
rising edge is the alert.

Pure Python per step: a few float operations, small bounded deques, a sort of three to sixteen numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from numpy.typing import ArrayLike

from processors.features import EVENT, N_CLASSES, ORDINARY, step_class

TESTS = ("point", "pair", "window", "stay", "shift")
NAME = {"point": "point", "pair": "window", "window": "window", "stay": "window", "shift": "shift"}  # semconv
BARS = ("point", "pair", "window", "stay", "stay_event")
MAX_CELLS = 64  # workload cells an instance remembers a bias for (least recently seen out)
OFF = 1e9  # a bar that never fires (the test is off)
APART = 3.0  # event steps are judged apart when their scale is this many times the ordinary steps' (events_apart)
GATE = 1.5  # a step pulls the level by at most this many of its class scales

# the injection recipe (prism_eval.simulate.holdout's): magnitudes, and lengths per shape
_MAGNITUDES = (1.3, 1.5, 2.0, 3.0)
_GRID = {"point": (4.0, 5.0, 6.0, 8.0, 10.0, 13.0, 17.0, 22.0),
         "pair": (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 11.0),
         "window": (2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, OFF),
         "stay": (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, OFF),
         "stay_event": (-0.5, 0.0, 0.5, 1.0, 2.0, OFF)}
_START = {"point": 8.0, "pair": 4.0, "window": 4.0, "stay": 2.0, "stay_event": 1.0}


@dataclass
class VerdictParams:
    alpha: float = 0.002  # the shift limit's false-alarm rate on training steps
    target_fpr: float = 0.005  # operating point: best F1 on injected training steps at no more FPR than this
    # the bars' ceilings, as ratios to the expectation on the ordinary steps' scale: a step this many times its
    # expectation is always over the point bar, two in a row this many times over the pair bar (0: no ceiling)
    point_ratio: float = 4.0
    pair_ratio: float = 3.0
    short: int = 3
    long_window: int = 32
    level_rate: float = 0.1
    max_level: float = 0.2
    release: int = 256
    min_point: float = 0.405  # log(1.5)
    min_shift: float = 0.08
    clear_steps: int = 8
    cell_min_steps: int = 0
    bias_rate: float = 0.01
    max_bias: float = 0.2
    scale_floor: float = 0.004


def events_apart(scales: Sequence[float]) -> bool:
    """Whether event steps are judged apart: when their residual scale is :data:`APART` times the ordinary
    steps' or more (a GPU server's batch changes), an event step's tail says little, so it neither makes nor
    breaks a pair, a window or a run, teaches the level nothing and keeps cells of its own. Where batch
    changes cost about what other steps cost (these CPU engines: 1.2-2x), they are steps like any other."""
    return scales[EVENT] >= APART * scales[ORDINARY]


def cell_key(x: Sequence[float], event: bool) -> int:
    """The verdict's cell of a step: its workload cell, event steps apart when they are judged apart."""
    return 2 * cell_of(x) + event


def cell_of(x: Sequence[float]) -> int:
    """Workload cell of a feature row (processors.features), packed in an int: batch in half-octaves,
    context per request and new tokens in octaves."""
    b, new, ctx = x[0], x[1], x[8]
    cb = int(2.0 * math.log2(b)) + 1 if b >= 1 else 0
    cc = int(math.log2(ctx)) + 1 if ctx >= 1 else 0
    return (cb << 12) | (min(cc, 63) << 6) | min(int(math.log2(new + 1.0)), 63)


def _median(d) -> float:
    s = sorted(d)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class Cells:
    """The residual bias of each workload cell, learned from unflagged steps (bounded, least recent out):
    a cell's first steps set it (their mean), later ones move it at ``bias_rate``, never past
    ``max_bias``. What the model gets wrong about a workload is particular to it, so a cell learns it
    for itself; what moves every workload at once is left to the level and the ``shift`` test."""

    __slots__ = ("p", "_c")

    def __init__(self, p: VerdictParams) -> None:
        self.p = p
        self._c: dict[int, list] = {}  # cell -> [bias, steps learned, steps seen]; insertion order = recency

    def get(self, cell: int, known=None) -> list:
        """The cell's entry; a cell new here starts from ``known`` (its bias in the model's training
        steps, :func:`calibrate`) when given, learned already."""
        c = self._c
        e = c.pop(cell, None)
        if e is None:
            m = self.p.cell_min_steps
            e = [0.0, 0, 0] if known is None else [float(known), m + 1, m + 1]
            if len(c) >= MAX_CELLS:
                del c[next(iter(c))]
        c[cell] = e
        return e

    def learn(self, e: list, u: float) -> None:
        b, n = e[0], e[1]
        rate = 1.0 / (n + 1) if n + 1 < 1.0 / self.p.bias_rate else self.p.bias_rate
        b += rate * (u - b)
        m = self.p.max_bias
        e[0] = -m if b < -m else (m if b > m else b)
        e[1] = n + 1

    def known(self) -> dict[int, float]:
        return {c: e[0] for c, e in self._c.items() if e[1] >= self.p.cell_min_steps}


class _Level:
    """The instance's recent level: an exponentially weighted average of its unflagged residuals, each
    step's pull clipped to ``GATE`` times its class scale (a Huber filter: a run of slow steps that
    fires nothing moves it slowly), within ``[-2 max_level, max_level]``."""

    __slots__ = ("value", "rate", "cap")

    def __init__(self, p: VerdictParams) -> None:
        self.value = 0.0
        self.rate = p.level_rate
        self.cap = p.max_level

    def add(self, w: float, scale: float) -> None:
        d = w - self.value
        c = GATE * scale
        d = c if d > c else (-c if d < -c else d)
        v = self.value + self.rate * d
        c = self.cap
        self.value = c if v > c else (-2 * c if v < -2 * c else v)


class KeyVerdict:
    """Verdict state of one instance: a few bounded deques, the cells, the alarm."""

    __slots__ = ("p", "cells", "lvl", "zs", "ws", "n", "shift", "zprev", "prev_flag", "run", "alarm", "quiet")

    def __init__(self, params: VerdictParams) -> None:
        self.p = params
        self.cells = Cells(params)
        self.lvl = _Level(params)
        self.zs: deque = deque(maxlen=params.short - 1)  # the z of the last informative steps before this one
        self.ws: deque = deque(maxlen=params.long_window)
        self.n = 0
        self.shift = 0.0
        self.zprev = -1e9
        self.prev_flag = False
        self.run = 0  # flagged steps in a row
        self.alarm = False  # a test fired within the last clear_steps steps
        self.quiet = 0

    def judge(self, u: float, x, model, cell: Optional[int] = None) -> tuple:
        """(score, anomalous, rising_edge, test) for one step's residual ``u`` (``log(y / expected) -
        center``) with features ``x``, against ``model``'s scales and limits (:func:`calibrate`).
        ``test``: on an anomalous step, ``point``, ``window`` or ``shift``. ``cell``: ``cell_of(x)`` when the
        caller has it."""
        p = self.p
        lim = model.limits
        cls = step_class(x)
        event = cls == EVENT and model.events_apart
        c = 2 * (cell_of(x) if cell is None else cell) + event  # cell_key(x, event)
        e = self.cells.get(c, model.cells.get(c))
        e[2] += 1
        w = u - e[0] if e[1] else u
        v = w - self.lvl.value
        z = v / model.scales[cls]
        if not event:
            self.ws.append(w)
            self.n += 1
        fired = None
        score = z / lim["point"]
        if z > lim["point"] and v > p.min_point:
            fired = "point"
        if v > p.min_shift:
            # two in a row: this step and the last informative one (an event step's own tail says little,
            # so event steps neither make nor break a pair, a window or a run unless they are over the bar)
            t = lim["pair"]
            pz = self.zprev
            if fired is None and z > t and pz > t:
                fired = "pair"
            sc = (pz if pz < z else z) / t
            if sc > score:
                score = sc
            t = lim["window"]
            if not event and len(self.zs) == self.zs.maxlen and z > 0.5 * t and t < OFF:
                m = _median(tuple(self.zs) + (z,))
                if fired is None and m > t:
                    fired = "window"
                if m / t > score:
                    score = m / t
            if fired is None and self.prev_flag and z > lim["stay_event" if event else "stay"]:
                fired = "stay"
        if not event and len(self.ws) == self.ws.maxlen:
            if self.n % 4 == 0 or not self.shift:
                self.shift = _median(self.ws)
            t = lim["shift"]
            if fired is None and self.shift > t and w > 0.5 * t:
                ws = self.ws
                k = len(ws)
                if _median((ws[k - 1], ws[k - 2], ws[k - 3])) > t:  # still slow: not the tail of an episode
                    fired = "shift"
            if self.shift / t > score:
                score = self.shift / t
        anomalous = fired is not None
        if fired is not None and score < 1.0:
            score = 1.0  # the stay test keeps an episode flagged under the bars that opened it
        if not event:
            self.zprev = z
            self.zs.append(z)
        if not event or anomalous:
            self.prev_flag = anomalous
        self.run = self.run + 1 if anomalous else 0
        # learn from steps that fire nothing, outside an episode (a slowdown's steps must not teach the
        # level or the cells); the level from informative steps only, each at most GATE scales from it (the
        # unflagged steps of a slowdown move it slowly); after `release` flagged steps in a row, from every
        # step again
        if (not anomalous and not self.alarm) or self.run > p.release:
            if not event:
                self.lvl.add(w, model.scales[cls])
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


# -- calibration --------------------------------------------------------------------------------------

def _quantile_limit(values, alpha: float, floor: float) -> float:
    """The ``1 - alpha`` quantile, extrapolated from the 90th and 99th percentiles (an exponential
    tail) while the sample is too small to hold it; never under ``floor``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 20:
        return max(floor, 1.0)
    q90, q99 = float(np.quantile(v, 0.90)), float(np.quantile(v, 0.99))
    tail = q99 + max(q99 - q90, 0.0) * math.log10(0.01 / alpha)
    lim = float(np.quantile(v, 1.0 - alpha)) if len(v) * alpha >= 5 else tail
    return max(floor, lim)


def _replay(residuals, X, p: VerdictParams, scales0, apart: bool) -> tuple:
    """The training residuals through the cells and the level, as live steps go: (w, v, class) per step
    and the cells learned."""
    n = len(residuals)
    cells = Cells(p)
    lvl = _Level(p)
    w = np.empty(n)
    v = np.empty(n)
    cls = np.empty(n, dtype=np.int64)
    for i, (u, x) in enumerate(zip(residuals, X)):
        c = step_class(x)
        event = apart and c == EVENT
        e = cells.get(cell_key(x, event))
        e[2] += 1
        wi = u - e[0] if e[1] else u
        vi = wi - lvl.value
        w[i], v[i], cls[i] = wi, vi, c
        if not event:
            lvl.add(wi, scales0[c])
        cells.learn(e, u)
    return w, v, cls, cells.known()


def _scales(v: np.ndarray, cls: np.ndarray, floor: float) -> list[float]:
    """Robust scale (1.4826 MAD) of each class; a class with few steps takes the scale of all."""
    pooled = max(floor, 1.4826 * float(np.median(np.abs(v - np.median(v))))) if len(v) else 1.0
    out = []
    for k in range(N_CLASSES):
        vk = v[cls == k]
        out.append(max(floor, 1.4826 * float(np.median(np.abs(vk - np.median(vk))))) if len(vk) >= 30 else pooled)
    return out


def injections(n: int, rng: np.random.Generator, gap: int = 120) -> list[np.ndarray]:
    """Multipliers of the evaluation's recipe over ``n`` steps, one array per shape (flat 1.3-3x over
    10-50 steps; a ramp to 1.3-3x over 30-80 steps then held 10; bursts of 3-8 steps), episodes at least
    ``gap`` steps apart."""
    out = []
    for shape in ("flat", "ramp", "burst"):
        m = np.ones(n)
        pos = int(rng.integers(20, 20 + gap // 2))
        while True:
            mag = float(rng.choice(_MAGNITUDES))
            if shape == "flat":
                ln, ramp = int(rng.integers(10, 51)), 0
            elif shape == "ramp":
                ramp = int(rng.integers(30, 81))
                ln = ramp + 10
            else:
                ln, ramp = int(rng.integers(3, 9)), 0
            if pos + ln + 10 >= n:
                break
            k = np.arange(ln)
            f = np.where(k < ramp, 1.0 + (mag - 1.0) * (k + 1) / max(ramp, 1), mag)
            m[pos:pos + ln] = f
            pos += ln + gap + int(rng.integers(0, gap))
        out.append(m)
    return out


def _rolling_median(a: np.ndarray, k: int) -> np.ndarray:
    """Median of the last ``k`` values at each position (-inf before ``k`` are there)."""
    out = np.full(len(a), -np.inf)
    if len(a) >= k:
        out[k - 1:] = np.median(np.lib.stride_tricks.sliding_window_view(a, k), axis=1)
    return out


class _Case:
    """One injected copy of the training stretch, with what the rule needs precomputed (the same tests
    as :meth:`KeyVerdict.judge`, vectorised: event steps neither make nor break a pair, a window or a run
    unless they are over the bar)."""

    def __init__(self, v, w, cls, scales, mult, p: VerdictParams, shift_lim: float) -> None:
        lm = np.log(mult)
        n = len(v)
        self.v = v + lm
        self.z = z = self.v / np.asarray(scales)[cls]
        self.inf = inf = (cls != EVENT) | (not events_apart(scales))
        idx = np.arange(n)
        last = np.maximum.accumulate(np.where(inf, idx, -1))  # the last informative step, this one included
        prev = np.concatenate([[-1], last[:-1]])
        zp = np.where(prev >= 0, z[np.maximum(prev, 0)], -np.inf)
        self.zmin2 = np.minimum(z, zp)
        m3 = np.full(n, -np.inf)
        zi = z[inf]
        m3[inf] = _rolling_median(zi, p.short)
        self.m3 = m3
        wi = (w + lm)[inf]  # the shift test sees the informative steps
        sh = np.zeros(n, dtype=bool)
        sh[inf] = (_rolling_median(wi, p.long_window) > shift_lim) & (wi > 0.5 * shift_lim) & \
            (_rolling_median(wi, 3) > shift_lim)
        self.shift = sh
        self.big = self.v > p.min_point
        self.over = self.v > p.min_shift
        self.lab = np.where(mult >= 1.1, 1, np.where(mult > 1.0, -1, 0))
        self.idx = idx

    def flags(self, t: dict[str, float]) -> np.ndarray:
        z, over, inf = self.z, self.over, self.inf
        trig = ((z > t["point"]) & self.big) | ((self.zmin2 > t["pair"]) & over) | self.shift
        if t["window"] < OFF:
            trig |= (self.m3 > t["window"]) & (z > 0.5 * t["window"]) & over
        stay = trig | (np.where(inf, z > t["stay"], z > t["stay_event"]) & over)
        cont = stay | ~inf  # an event step does not end a run
        idx = self.idx
        run_start = np.maximum.accumulate(np.where(cont, -1, idx)) + 1
        last_trig = np.maximum.accumulate(np.where(trig, idx, -1))
        return stay & (last_trig >= run_start)


def _score(cases: Sequence[_Case], t: dict[str, float]) -> tuple[float, float]:
    tp = fp = fn = tn = 0
    for c in cases:
        f = c.flags(t)
        pos, neg = c.lab == 1, c.lab == 0
        tp += int(np.count_nonzero(f & pos))
        fn += int(np.count_nonzero(~f & pos))
        fp += int(np.count_nonzero(f & neg))
        tn += int(np.count_nonzero(~f & neg))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1, fp / max(1, fp + tn)


def operating_point(cases: Sequence[_Case], target_fpr: float,
                    ceilings: Optional[dict[str, float]] = None) -> dict[str, float]:
    """The bars with the best F1 whose FPR stays within ``target_fpr`` (coordinate search over
    :data:`_GRID`, each bar at most its ``ceilings`` value, or the grid's lowest where that is lower);
    when none does, the ones with the least FPR."""
    grid = {n: tuple(v for v in vals if ceilings is None or n not in ceilings or v <= ceilings[n]) or (min(vals),)
            for n, vals in _GRID.items()}
    def key(t):
        f1, fpr = _score(cases, t)
        return (fpr <= target_fpr, f1 if fpr <= target_fpr else -fpr)

    best = {n: v if v in grid[n] else max(grid[n]) for n, v in _START.items()}
    bk = key(best)
    for _ in range(3):
        moved = False
        for name, vals in grid.items():
            for val in vals:
                if val == best[name]:
                    continue
                t = dict(best, **{name: val})
                k = key(t)
                if k > bk:
                    best, bk, moved = t, k, True
        if not moved:
            break
    return best


def calibrate(residuals: ArrayLike, X: ArrayLike, p: VerdictParams, seed: int = 0) -> tuple:
    """Scales, limits and cells from normal out-of-fold residuals in time order (their feature rows give
    the cells and classes). Returns ``(limits, scales, cells)``: ``cells`` maps each workload cell with at
    least ``cell_min_steps`` training steps to its bias, so a verdict (a restarted process too) starts
    from it instead of learning it again."""
    r = np.asarray(residuals, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if len(r) == 0:
        return dict(_START, shift=max(p.min_shift, 0.1)), [1.0] * N_CLASSES, {}
    cls0 = np.fromiter((step_class(x) for x in X), dtype=np.int64, count=len(X))
    scales0 = _scales(r, cls0, p.scale_floor)
    w, v, cls, cells = _replay(r, X, p, scales0, events_apart(scales0))
    scales = _scales(v, cls, p.scale_floor)
    if events_apart(scales) != events_apart(scales0):  # the level moved the ratio across: replay as judged
        w, v, cls, cells = _replay(r, X, p, scales0, events_apart(scales))
        scales = _scales(v, cls, p.scale_floor)
    inf = (cls != EVENT) | (not events_apart(scales))
    shift_lim = _quantile_limit(_rolling_median(w[inf], p.long_window)[p.long_window - 1:], p.alpha, p.min_shift)
    rng = np.random.default_rng(seed)
    cases = []
    if len(r) >= 200:
        for _ in range(2):
            for mult in injections(len(r), rng):
                cases.append(_Case(v, w, cls, scales, mult, p, shift_lim))
    # on a noisy stretch no bars meet target_fpr, and the least FPR would put them out of reach of any
    # slowdown: a 4x step alone and two 3x steps in a row stay within reach of the point and pair bars
    ceilings = {n: math.log(ratio) / scales[ORDINARY] for n, ratio in (("point", p.point_ratio), ("pair", p.pair_ratio))
                if ratio > 1}
    limits = operating_point(cases, p.target_fpr, ceilings) if cases else dict(_START)
    limits["shift"] = shift_lim
    return limits, scales, cells
