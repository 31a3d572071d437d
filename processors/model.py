"""Expected step latency from workload: a linear physics baseline times a boosted-tree correction.

``expected_ms = base(x) * exp(trees(x))``

* ``base`` is an interpretable linear model on the physics columns (ms per request, per new token,
  per context token, per sum L^2, ...), fitted robustly (Huber IRLS, :mod:`processors.gbm`) on *relative*
  error (each row divided by its latency, so a 5 ms and a 200 ms step weigh the same); columns whose
  coefficient comes out negative are dropped (no physical cost is negative). Because it is linear it
  extrapolates sensibly to batches bigger than any seen so far. Each column enters as a roofline
  ``max(x, knot)``: below the knot (at least the smallest value seen in training, picked from the low
  quantiles) fixed costs such as weight streaming dominate and the cost is flat, so the line never
  extrapolates down through the origin.
* ``trees`` (gradient boosting, shallow, on a winsorised target; numpy, :mod:`processors.gbm`) model the
  log-ratio the line misses:
  roofline knees, CUDA-graph padding steps, the ``max(device, host)`` inflection of overlapped engines.
  Outside the range they were trained on they stay at their edge value, so the line carries the trend.

The fitted trees are flat arrays evaluated here (a few vectorised numpy ops per tree level), so scoring
one step takes microseconds, and a model is plain JSON (:meth:`LatencyModel.to_dict`, no pickle).
Fitting and scoring need numpy alone, which installs with prism-otel: the detector is the same in
every install.

Calibration: residuals ``log(y / expected)`` are taken out of fold (two-fold cross-fit over time
blocks), so the limits reflect the error on unseen steps, not the training fit; each test's limit is
calibrated on them, in time order (:func:`processors.verdict.calibrate`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from processors.features import AVG_CONTEXT, LINEAR_COLUMNS, N_CLASSES, N_FEATURES, NEW_TOKENS
from processors.gbm import fit_trees, huber_line
from processors.verdict import VerdictParams, calibrate, events_apart

logger = logging.getLogger(__name__)


@dataclass
class FitParams:
    n_trees: int = 100
    depth: int = 3
    learning_rate: float = 0.1
    min_leaf: int = 15
    scale_floor: float = 0.004  # smallest residual scale accepted (log units, ~0.4%)
    verdict: VerdictParams = field(default_factory=VerdictParams)  # how the test limits are calibrated
    # a refit of a calibrated model: keep its calibration ({"limits", "scales", "cells", "scale"}: no
    # out-of-fold fits, no search), only the latency model is fitted again
    keep: Optional[dict] = None
    bars_rows: int = 0  # the training steps the kept bars came from


class LatencyModel:
    """A fitted model plus what the verdict needs: the median out-of-fold residual (``center``), its
    robust scale, and each test's limit calibrated on the training steps (``limits``,
    :func:`processors.verdict.calibrate`). Immutable once built."""

    def __init__(self, cols, coef, intercept, floor_ms, trees, center, scale, limits, n_train, ranges=None,
                 fit_s=0.0, lo=None, piece2=None, cond_hi=None, cells=None, scales=None, bars_rows=0) -> None:
        self.cols = tuple(int(c) for c in cols)
        self.coef = tuple(float(c) for c in coef)
        self.lo = tuple(float(v) for v in lo) if lo is not None else tuple(0.0 for _ in self.cols)
        self.intercept = float(intercept)
        self.floor_ms = float(floor_ms)
        self.trees = trees  # None or dict of numpy arrays (feat, thr, child, value, roots, depth, init)
        self.center = float(center)  # median out-of-fold log residual
        self.scale = float(scale)  # robust sigma of it
        # test -> its bar (processors.verdict.calibrate): point / pair / window / stay in units of the
        # step's class scale, shift a log-ratio
        self.limits = {str(k): float(v) for k, v in (limits or {}).items()}
        # residual scale of each step class (processors.features.step_class): event, after, ordinary
        self.scales = tuple(float(v) for v in scales) if scales is not None else (self.scale,) * N_CLASSES
        self.n_train = int(n_train)
        self.bars_rows = int(bars_rows or n_train)  # the training steps the bars were chosen on
        # workload cell -> residual bias in the training steps (processors.verdict.calibrate)
        self.cells = {int(k): float(b) for k, b in (cells or {}).items()}
        self.ranges = ranges
        self.fit_s = fit_s  # CPU seconds the fit took on its thread (its wall time adds whatever else runs)
        self._lin = tuple(zip(self.cols, self.coef, self.lo))
        # optional second affine piece: base = max(piece 1, piece 2) (overlap: max(device, host))
        p2 = None if piece2 is None else [float(v) for v in piece2]  # intercept, coefs
        self.piece2 = p2
        self._lin2 = None if p2 is None else tuple(zip(self.cols, p2[1:], self.lo))
        # upper edges (99th percentiles) of the training envelope of the physics columns and of the
        # context per request, for novelty (see excess()); ranges: [min, p99, max] per feature
        self._hi = tuple((c, float(ranges[c][1])) for c in LINEAR_COLUMNS + (AVG_CONTEXT,)
                         if ranges and ranges[c][1] > 0)
        # and per batch-size bin (quarter octaves): the largest context per request and new tokens seen
        # at about that batch size. Batch and context move together in traffic, so a combination can
        # be new while each value alone is well inside the envelope (long contexts at mid batches)
        self.cond_hi = {int(k): (float(a), float(b)) for k, (a, b) in (cond_hi or {}).items()}
        if trees is not None:
            self._init = float(trees["init"])
            self._feat, self._thr, self._child = trees["feat"], trees["thr"], trees["child"]
            self._value, self._roots, self._depth = trees["value"], trees["roots"], int(trees["depth"])

    @property
    def events_apart(self) -> bool:
        """Whether event steps are judged apart (:func:`processors.verdict.events_apart`)."""
        return events_apart(self.scales)

    # -- scoring ----------------------------------------------------------------------------------
    def excess(self, x) -> float:
        """How far beyond the training envelope a step's workload lies (0 inside; 0.5 = 50% past the
        largest value of some physics column). Predictions out there are extrapolations."""
        e = 0.0
        for c, hi in self._hi:
            v = x[c] / hi - 1.0
            if v > e:
                e = v
        if self.cond_hi:
            hi = self.cond_hi.get(_batch_bin(x[0]))
            if hi is not None:
                for v, h in ((x[AVG_CONTEXT], hi[0]), (x[NEW_TOKENS], hi[1])):
                    if h > 0:
                        v = v / h - 1.0
                        if v > e:
                            e = v
        return e

    def base_one(self, x) -> float:
        b = self.intercept
        for c, k, lo in self._lin:
            v = x[c]
            b += k * (v if v > lo else lo)
        lin2, p2 = self._lin2, self.piece2  # set together (a second piece) or both None
        if lin2 is not None and p2 is not None:
            b2 = p2[0]
            for c, k, lo in lin2:
                v = x[c]
                b2 += k * (v if v > lo else lo)
            if b2 > b:
                b = b2
        return b if b > self.floor_ms else self.floor_ms

    def predict_one(self, x) -> float:
        """Expected latency (ms) of one step's feature tuple."""
        return self.expect(x)

    def expect(self, x) -> float:
        """Expected latency (ms) of one step: the line times the trees' correction (every split of every
        tree judged at once, then one walk down over all the roots)."""
        b = self.base_one(x)
        if self.trees is None:
            return b
        right = np.asarray(x, dtype=np.float32)[self._feat] > self._thr  # compared in float32, as cut
        node = self._roots
        child = self._child
        for _ in range(self._depth):
            node = child[2 * node + right[node]]
        return b * math.exp(self._init + float(self._value[node].sum()))

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        b = np.full(len(X), self.intercept)
        for c, k, lo in self._lin:
            b += k * np.maximum(X[:, c], lo)
        lin2, p2 = self._lin2, self.piece2  # set together (a second piece) or both None
        if lin2 is not None and p2 is not None:
            b2 = np.full(len(X), p2[0])
            for c, k, lo in lin2:
                b2 += k * np.maximum(X[:, c], lo)
            b = np.maximum(b, b2)
        b = np.maximum(b, self.floor_ms)
        if self.trees is None:
            return b
        return b * np.exp(_tree_raw(self.trees, X))

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"cols": list(self.cols), "coef": list(self.coef), "lo": list(self.lo), "intercept": self.intercept,
                "floor_ms": self.floor_ms, "center": self.center, "scale": self.scale, "limits": dict(self.limits),
                "n_train": self.n_train, "ranges": self.ranges, "trees": _trees_to_dict(self.trees),
                "piece2": self.piece2, "cond_hi": {str(k): list(v) for k, v in self.cond_hi.items()},
                "cells": [[k, b] for k, b in self.cells.items()], "scales": list(self.scales),
                "bars_rows": self.bars_rows}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        return cls(d["cols"], d["coef"], d["intercept"], d["floor_ms"], _trees_from_dict(d.get("trees")), d["center"],
                   d["scale"], d["limits"], d["n_train"], d.get("ranges"), lo=d.get("lo"), piece2=d.get("piece2"),
                   cond_hi=d.get("cond_hi"), cells={int(c[0]): c[1] for c in d.get("cells") or ()},
                   scales=d.get("scales"), bars_rows=d.get("bars_rows", 0))


def _trees_to_dict(t: Optional[dict]) -> Optional[dict]:
    if t is None:
        return None
    return {"feat": t["feat"].tolist(), "thr": [float(v) for v in t["thr"]], "child": t["child"].tolist(),
            "value": t["value"].tolist(), "roots": t["roots"].tolist(), "depth": int(t["depth"]),
            "init": float(t["init"])}


def _trees_from_dict(t: Optional[dict]) -> Optional[dict]:
    if t is None:
        return None
    trees = {"feat": np.asarray(t["feat"], dtype=np.intp), "thr": np.asarray(t["thr"], dtype=np.float64),
             "child": np.asarray(t["child"], dtype=np.intp), "value": np.asarray(t["value"], dtype=np.float64),
             "roots": np.asarray(t["roots"], dtype=np.intp), "depth": int(t["depth"]), "init": float(t["init"])}
    n = len(trees["feat"])
    if not (n == len(trees["thr"]) == len(trees["value"]) == len(trees["child"]) // 2) or \
            (n and (trees["child"].max() >= n or trees["feat"].max() >= N_FEATURES or trees["roots"].max() >= n)):
        raise ValueError("baseline trees are inconsistent")
    return trees


def _tree_raw(trees: dict, X: np.ndarray) -> np.ndarray:
    X32 = np.asarray(X, dtype=np.float32)
    n = len(X32)
    node = np.broadcast_to(trees["roots"], (n, len(trees["roots"]))).copy()
    rows = np.arange(n)[:, None]
    feat, thr, child = trees["feat"], trees["thr"], trees["child"]
    for _ in range(int(trees["depth"])):
        node = child[2 * node + (X32[rows, feat[node]] > thr[node])]
    return trees["init"] + trees["value"][node].sum(axis=1)


def _design(X, y, cols, knots):
    A = np.column_stack([np.ones(len(X))] + [np.maximum(X[:, c], k) for c, k in zip(cols, knots)]) / y[:, None]
    scale = np.maximum(np.abs(A).max(axis=0), 1e-12)
    return A / scale, scale


def _lsq_err(X, y, cols, knots) -> float:
    A, _ = _design(X, y, cols, knots)
    beta = np.linalg.lstsq(A, np.ones(len(X)), rcond=None)[0]
    r = A @ beta - 1.0
    return float(np.mean(np.minimum(r * r, 0.04)))  # bounded: a few stray steps do not pick the knot


def _fit_linear(X: np.ndarray, y: np.ndarray):
    """Robust fit of relative error (rows divided by y, target 1) on roofline columns ``max(x, knot)``.

    The knot of each column is picked from its low quantiles (least squares on relative error): below
    it the cost is flat (weight streaming, launches), above it linear. Returns (cols, coef, intercept, knots).
    """
    cols = []
    for c in LINEAR_COLUMNS:  # keep columns that vary and are not linear in those kept (decode: batch == tokens)
        if np.ptp(X[:, c]) <= 0:
            continue
        K = np.column_stack([np.ones(len(X))] + [X[:, k] for k in cols + [c]]) / y[:, None]
        K = K / np.maximum(np.abs(K).max(axis=0), 1e-12)
        if np.linalg.matrix_rank(K, tol=1e-7 * len(X)) == K.shape[1]:
            cols.append(c)
    knots = [float(X[:, c].min()) for c in cols]
    if cols:
        best = _lsq_err(X, y, cols, knots)
        for i, c in enumerate(cols):
            for q in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9):
                trial = list(knots)
                trial[i] = float(np.quantile(X[:, c], q))
                e = _lsq_err(X, y, cols, trial)
                if e < best * 0.98:
                    best, knots = e, trial
    ones = np.ones(len(X))
    while True:
        A, scale = _design(X, y, cols, knots)
        beta = huber_line(A, ones)
        beta = np.asarray(beta) / scale
        neg = [i for i, c in enumerate(cols) if beta[i + 1] < 0]
        if not neg:
            return cols, beta[1:], beta[0], knots, _max_affine(X, y, cols, knots, beta)
        worst = min(neg, key=lambda i: beta[i + 1] * np.abs(X[:, cols[i]]).mean())
        cols = cols[:worst] + cols[worst + 1:]
        knots = knots[:worst] + knots[worst + 1:]


def _max_affine(X, y, cols, knots, beta1, iters: int = 12) -> Optional[list]:
    """A second affine piece so that the line becomes ``max(piece 1, piece 2)`` (a convex max-affine
    fit: restarts from splits on each column, then alternating assignment and least squares on relative
    error), kept when it cuts the error by 15%. Overlapped engines cost ``max(device work, host work
    of the previous batch)``: two planes whose crossing moves with the workload, which trees alone
    cannot extrapolate."""
    n = len(y)
    if n < 60 or not cols:
        return None
    D = np.column_stack([np.ones(n)] + [np.maximum(X[:, c], k) for c, k in zip(cols, knots)])
    R = D / y[:, None]
    scale = np.maximum(np.abs(R).max(axis=0), 1e-12)
    R = R / scale
    ones = np.ones(n)

    def err(pred):
        r = pred / y - 1.0
        return float(np.mean(np.minimum(r * r, 0.04)))

    e1 = err(D @ np.asarray(beta1, dtype=np.float64))
    best, best_e = None, 0.85 * e1
    for c in cols:  # restarts: split the rows on each physics column, then alternate
        for q in (0.3, 0.5, 0.7):
            a = X[:, c] > np.quantile(X[:, c], q)
            for _ in range(iters):
                if a.sum() < 0.1 * n or (~a).sum() < 0.1 * n:
                    break
                b1 = np.linalg.lstsq(R[~a], ones[~a], rcond=None)[0] / scale
                b2 = np.linalg.lstsq(R[a], ones[a], rcond=None)[0] / scale
                na = D @ b2 > D @ b1
                if (na == a).all():
                    break
                a = na
            else:
                continue
            if a.sum() < 0.1 * n or (~a).sum() < 0.1 * n:
                continue
            e = err(np.maximum(D @ b1, D @ b2))
            if e < best_e:
                best, best_e = [b1.tolist(), b2.tolist()], e
    return best


def _fit_once(X, y, p: FitParams, with_trees: bool, w=None):
    cols, coef, icpt, lo, pieces = _fit_linear(X, y)
    floor = 0.5 * float(np.percentile(y, 1))
    piece2 = None
    if pieces is not None:
        (icpt, *coef), piece2 = pieces
    base = np.full(len(X), icpt)
    for c, k, kn in zip(cols, coef, lo):
        base += k * np.maximum(X[:, c], kn)
    if piece2 is not None:
        b2 = np.full(len(X), piece2[0])
        for c, k, kn in zip(cols, piece2[1:], lo):
            b2 += k * np.maximum(X[:, c], kn)
        base = np.maximum(base, b2)
    base = np.maximum(base, floor)
    trees = None
    if with_trees:
        z = np.log(y / base)
        med = np.median(z)
        lim = 6 * 1.4826 * max(np.median(np.abs(z - med)), 1e-4)
        z = np.clip(z, med - lim, med + lim)  # a stray slow step must not bend the trees
        trees = fit_trees(X, z, p.n_trees, p.depth, p.learning_rate, max(p.min_leaf, len(X) // 200), 0.8, w)
    return LatencyModel(cols, coef, icpt, floor, trees, 0.0, 1.0, {}, len(X), lo=lo, piece2=piece2)


def fit(X: np.ndarray, y: np.ndarray, p: Optional[FitParams] = None, weights=None) -> LatencyModel:
    """Fit on normal steps (rows of features in time order, latencies in ms) and calibrate.
    ``weights``: per-row weight of the tree correction (rows of a workload new to the model count more,
    so one refit learns the region instead of averaging it away)."""
    p = p or FitParams()
    t0 = time.thread_time()
    X = np.asarray(X, dtype=np.float64).reshape(-1, N_FEATURES)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
    with_trees = n >= 4 * p.min_leaf
    if p.keep is not None:
        final = _fit_once(X, y, p, with_trees, weights)
        k = p.keep
        center = float(np.median(np.log(y / final.predict_many(X))))
        return _finish(final, X, center, k["scale"], dict(k["limits"]), k["scales"], k["cells"], p.bars_rows, t0)
    # out-of-fold residuals: two folds of alternating time blocks (sixteenths of the stream)
    blk = max(8, n // 16)
    fold = (np.arange(n) // blk) % 2 == 0
    oof = np.empty(n)
    if fold.all() or not fold.any():
        fold = np.arange(n) % 2 == 0
    for f in (fold, ~fold):
        m = _fit_once(X[~f], y[~f], p, with_trees, None if weights is None else weights[~f])
        oof[f] = m.predict_many(X[f])
    r = np.log(y / oof)
    center = float(np.median(r))
    dev = r - center
    scale = max(p.scale_floor, 1.4826 * float(np.median(np.abs(dev))))
    limits, scales, cells = calibrate(dev, X, p.verdict)
    final = _fit_once(X, y, p, with_trees, weights)
    return _finish(final, X, center, scale, limits, scales, cells, n, t0)


def _finish(final, X, center, scale, limits, scales, cells, bars_rows, t0) -> LatencyModel:
    n = len(X)
    # the envelope's edges are sparse: novelty starts past the 99th percentile, not the maximum
    ranges = [[float(a), float(q), float(b)] for a, q, b in zip(X.min(axis=0), np.percentile(X, 99, axis=0),
                                                               X.max(axis=0))]
    bins = np.array([_batch_bin(b) for b in X[:, 0]])
    cond = {}
    for b in np.unique(bins):
        near = np.abs(bins - b) <= 1
        cond[int(b)] = (float(X[near, AVG_CONTEXT].max()), float(X[near, NEW_TOKENS].max()))
    model = LatencyModel(final.cols, final.coef, final.intercept, final.floor_ms, final.trees, center, scale, limits,
                         n, ranges, time.thread_time() - t0, lo=final.lo, piece2=final.piece2, cond_hi=cond,
                         cells=cells, scales=scales, bars_rows=bars_rows)
    return model


def _batch_bin(b: float) -> int:
    return int(4.0 * math.log2(b)) if b >= 1.0 else -1
