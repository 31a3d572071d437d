"""The detectors a user would otherwise reach for, judged on the same streams as prism's.

Each takes the warm-up (normal) steps, then flags the stream's steps in order, online (no step is
judged with knowledge of later steps):

* ``static_threshold``: per phase, the 99th percentile of warm-up latencies; a step over it is flagged;
* ``zscore``: per phase, a rolling z-score of raw latency over the previous 100 steps, flagged over 3;
* ``latencyprism_rule``: LatencyPrism's detector reimplemented from the paper's description (arXiv
  2601.09258 section 4.2.3 and its artifact's settings): a GBDT (200 trees, depth 4, rate 0.1) per
  phase on batch size and B x L (summed context), the one-sided relative error
  ``E = max(0, (y - y_hat) / (y + eps))``, smoothed over a window of 10 steps, against
  ``UCL = min(mu + 3 sigma, 0.5)`` of the same windowed statistic on the training set;
* ``gbdt_median3``: what a data scientist fits offline: a GBDT per phase on batch size, new tokens and
  summed context, the ratio observed / predicted smoothed by a 3-step median, flagged over its 99.5th
  percentile on the training set (at least 1.1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from prism_otel.record import StepRecord


def _by_phase(steps: Sequence[StepRecord]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, s in enumerate(steps):
        out.setdefault(s.phase, []).append(i)
    return out


def static_threshold(train: Sequence[StepRecord], steps: Sequence[StepRecord]) -> np.ndarray:
    dur = np.array([s.duration_ms for s in train])
    limits = {ph: float(np.percentile(dur[idx], 99)) for ph, idx in _by_phase(train).items() if len(idx) >= 10}
    overall = float(np.percentile(dur, 99)) if len(dur) else float("inf")
    return np.array([s.duration_ms > limits.get(s.phase, overall) for s in steps], dtype=bool)


def zscore(train: Sequence[StepRecord], steps: Sequence[StepRecord], window: int = 100,
           k: float = 3.0) -> np.ndarray:
    wins: dict[str, deque] = {}
    for s in train:
        wins.setdefault(s.phase, deque(maxlen=window)).append(s.duration_ms)
    out = np.zeros(len(steps), dtype=bool)
    for i, s in enumerate(steps):
        w = wins.setdefault(s.phase, deque(maxlen=window))
        y = s.duration_ms
        if len(w) >= 10:
            a = np.fromiter(w, dtype=np.float64)
            sd = a.std()
            out[i] = sd > 0 and (y - a.mean()) / sd > k
        w.append(y)
    return out


def _lp_features(steps: Sequence[StepRecord]) -> np.ndarray:
    return np.array([[s.batch_size, s.context_tokens if s.context_tokens else s.batch_size * s.tokens]
                     for s in steps], dtype=np.float64).reshape(-1, 2)


class _GBDT:
    """A plain GBDT regressor (squared error, no subsampling), fitted with :mod:`processors.gbm`, so the
    baselines run in the install users get (numpy alone)."""

    def __init__(self, n_estimators: int, learning_rate: float, max_depth: int) -> None:
        self.kw: dict[str, Any] = dict(n_trees=n_estimators, lr=learning_rate, depth=max_depth, min_leaf=1,
                                       subsample=1.0)

    def fit(self, X, y) -> _GBDT:
        from processors.gbm import fit_trees

        self.trees = fit_trees(X, y, **self.kw)
        return self

    def predict(self, X) -> np.ndarray:
        from processors.model import _tree_raw

        return _tree_raw(self.trees, np.asarray(X, dtype=np.float64))


def _per_phase(train: Sequence[StepRecord], steps: Sequence[StepRecord], judge) -> np.ndarray:
    """Flags of ``steps``: ``judge(training steps, judged steps)`` per phase with at least 20 training steps."""
    out = np.zeros(len(steps), dtype=bool)
    tr_phase = _by_phase(train)
    for phase, idx in _by_phase(steps).items():
        tidx = tr_phase.get(phase, [])
        if len(tidx) >= 20:
            out[np.asarray(idx)] = judge([train[i] for i in tidx], [steps[i] for i in idx])
    return out


def latencyprism_rule(train: Sequence[StepRecord], steps: Sequence[StepRecord], window: int = 10,
                      k: float = 3.0, max_ucl: float = 0.5, eps: float = 1e-6) -> np.ndarray:
    def judge(tr, st):
        Xtr, ytr = _lp_features(tr), np.array([s.duration_ms for s in tr])
        gbr = _GBDT(n_estimators=200, learning_rate=0.1, max_depth=4).fit(Xtr, ytr)
        e_tr = np.maximum(0.0, (ytr - gbr.predict(Xtr)) / (ytr + eps))
        w_tr = np.convolve(e_tr, np.ones(window) / window, mode="valid") if len(e_tr) >= window else e_tr
        ucl = min(float(w_tr.mean() + k * w_tr.std()), max_ucl)
        y = np.array([s.duration_ms for s in st])
        e = np.maximum(0.0, (y - gbr.predict(_lp_features(st))) / (y + eps))
        # the window carries over from the end of training, as a monitor that kept running would
        e_all = np.concatenate([e_tr[-(window - 1):], e]) if window > 1 else e
        wm = np.convolve(e_all, np.ones(window) / window, mode="valid")[-len(e):]
        return wm > ucl

    return _per_phase(train, steps, judge)


def gbdt_median3(train: Sequence[StepRecord], steps: Sequence[StepRecord], q: float = 99.5) -> np.ndarray:
    def feats(ss):
        return np.array([[s.batch_size, s.prefill_tokens, s.decode_tokens, s.context_tokens] for s in ss],
                        dtype=np.float64).reshape(-1, 4)

    def med3(r):
        p = np.concatenate([r[:1], r[:1], r])
        return np.median(np.stack([p[:-2], p[1:-1], p[2:]]), axis=0)

    def judge(tr, st):
        ytr = np.array([s.duration_ms for s in tr])
        gbr = _GBDT(n_estimators=200, learning_rate=0.1, max_depth=4).fit(feats(tr), np.log(ytr))
        lim = max(1.1, float(np.percentile(med3(ytr / np.exp(gbr.predict(feats(tr)))), q)))
        y = np.array([s.duration_ms for s in st])
        return med3(y / np.exp(gbr.predict(feats(st)))) > lim

    return _per_phase(train, steps, judge)

BASELINES = {"static_threshold": static_threshold, "zscore": zscore, "latencyprism_rule": latencyprism_rule,
             "gbdt_median3": gbdt_median3}
