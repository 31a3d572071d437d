"""Gradient-boosted regression trees and a Huber line, in numpy alone.

The detector's models are small (a few thousand rows, nine features, shallow trees), so they need no
machine-learning library: this module fits them with numpy, in the detector's own install, and imports
in milliseconds. The trees come out in the flat, compiled layout :mod:`processors.model` evaluates
(``feat``, ``thr``, ``child``, ``value``, ``roots``, ``depth``, ``init``; leaves loop onto themselves).

* :func:`fit_trees`: least-squares boosting with row subsampling. Features are binned once into at most
  ``max_bins`` quantile bins (float32 edges, the precision the evaluator compares in); each tree grows
  level by level, every node of a level split at once from per-(node, bin) gradient histograms
  (``np.bincount``), the best split per node the one with the largest variance reduction whose
  children keep ``min_leaf`` rows.
* :func:`huber_line`: iteratively reweighted least squares with Huber weights (``t = 1.345`` robust
  scales, the usual 95%-efficiency tuning), the scale re-estimated from the residuals' MAD each round.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _bins(X: np.ndarray, max_bins: int):
    """Per feature: float32 edges (at most ``max_bins - 1``) and each row's bin (x <= edge[k] is bin <= k)."""
    n, f = X.shape
    Xb = np.zeros((n, f), dtype=np.int32)
    edges = []
    qs = np.linspace(0.0, 1.0, max_bins + 1)[1:-1]
    for j in range(f):
        col = X[:, j]
        e = np.unique(np.quantile(col, qs).astype(np.float32)) if n else np.zeros(0, dtype=np.float32)
        e = e[e < col.max()] if n else e  # an edge at the max would split nothing off
        edges.append(e)
        Xb[:, j] = np.searchsorted(e, col, side="left")
    return Xb, edges


def _tree(Xb, nedge, g, w, depth: int, min_leaf: int, lr: float):
    """One tree on residuals ``g`` (rows weighted ``w``; 0 = out of the subsample); returns
    (feat, split bin, left, right, value) per node in creation order and each row's leaf. ``nedge``:
    edges per feature. Every node of a level is split at once, from one histogram per statistic."""
    n, f = Xb.shape
    nb = int(nedge.max()) + 1 if f else 1
    node = np.zeros(n, dtype=np.int64)
    feats, bins, lefts, rights = [0], [0], [-1], [-1]
    frontier = [0]
    wg = w * g
    act = w > 0
    Xa, wga, wa = Xb[act], wg[act], w[act]
    col = (np.arange(f) * nb)[None, :]
    valid = np.arange(nb)[None, :] < nedge[:, None]  # (f, nb): a split after bin b exists for b < edges
    for _ in range(depth):
        if not frontier:
            break
        m = len(frontier)
        loc = np.full(len(feats), -1, dtype=np.int64)
        loc[frontier] = np.arange(m)
        li = loc[node[act]]
        on = li >= 0
        if not on.any():
            break
        lio, Xo, wgo, wo = li[on], Xa[on], wga[on], wa[on]
        idx = ((lio[:, None] * (f * nb)) + col + Xo).ravel()
        size = m * f * nb
        hg = np.bincount(idx, weights=np.repeat(wgo, f), minlength=size).reshape(m, f, nb)
        hw = np.bincount(idx, weights=np.repeat(wo, f), minlength=size).reshape(m, f, nb)
        hc = np.bincount(idx, minlength=size).reshape(m, f, nb)
        GL, WL, CL = np.cumsum(hg, 2), np.cumsum(hw, 2), np.cumsum(hc, 2)
        G, W, C = GL[:, :, -1:], WL[:, :, -1:], CL[:, :, -1:]
        GR, WR, CR = G - GL, W - WL, C - CL
        ok = (CL >= min_leaf) & (CR >= min_leaf) & (WL > 0) & (WR > 0) & valid[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(ok, GL * GL / WL + GR * GR / WR - G * G / W, -np.inf)
        flat = gain.reshape(m, -1)
        best = np.argmax(flat, axis=1)
        best_gain = flat[np.arange(m), best]
        nxt = []
        for i, nd in enumerate(frontier):
            if not best_gain[i] > 1e-12:
                continue
            j, b = divmod(int(best[i]), nb)
            feats[nd], bins[nd] = j, b
            lid, rid = len(feats), len(feats) + 1
            feats += [0, 0]
            bins += [0, 0]
            lefts += [-1, -1]
            rights += [-1, -1]
            lefts[nd], rights[nd] = lid, rid
            here = node == nd
            node[here] = np.where(Xb[here, j] > b, rid, lid)
            nxt += [lid, rid]
        frontier = nxt
    k = len(feats)
    lg = np.bincount(node, weights=wg, minlength=k)
    lw = np.bincount(node, weights=w, minlength=k)
    leaves = np.asarray(lefts) < 0
    v = np.where(leaves & (lw > 0), lg / np.maximum(lw, 1e-12), 0.0) * lr
    return (np.asarray(feats, dtype=np.intp), np.asarray(bins, dtype=np.intp), np.asarray(lefts, dtype=np.intp),
            np.asarray(rights, dtype=np.intp), v, node)


def fit_trees(X: np.ndarray, z: np.ndarray, n_trees: int = 100, depth: int = 3, lr: float = 0.1, min_leaf: int = 15,
              subsample: float = 0.8, weights: Optional[np.ndarray] = None, max_bins: int = 64, seed: int = 0) -> dict:
    """Boosted trees fitting ``z`` on ``X`` (least squares), in the compiled layout."""
    X = np.asarray(X, dtype=np.float64)
    X = X.reshape(len(X), -1)
    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    w0 = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    init = float(np.average(z, weights=w0)) if n else 0.0
    Xb, edges = _bins(X.astype(np.float32).astype(np.float64), max_bins)
    # only features that can split anything are histogrammed (a constant column costs as much as any)
    live = np.asarray([j for j, e in enumerate(edges) if len(e)], dtype=np.intp)
    if len(live) == 0:
        live = np.zeros(1, dtype=np.intp)
    Xb = np.ascontiguousarray(Xb[:, live])
    edges = [edges[j] for j in live]
    nedge = np.asarray([len(e) for e in edges], dtype=np.int64)
    rng = np.random.default_rng(seed)
    F = np.full(n, init)
    feats, thrs, childs, vals, roots = [], [], [], [], []
    off = 0
    d_max = 0
    for _ in range(n_trees):
        w = w0 * (rng.random(n) < subsample) if subsample < 1.0 else w0
        f, bn, lft, rgt, v, node = _tree(Xb, nedge, z - F, w, depth, min_leaf, lr)
        F += v[node]
        m = len(f)
        t = np.array([float(edges[j][b]) if lft[i] >= 0 else np.inf for i, (j, b) in enumerate(zip(f, bn))])
        ids = np.arange(m, dtype=np.intp)
        leaf = lft < 0
        child = np.empty(2 * m, dtype=np.intp)
        child[0::2] = np.where(leaf, ids, lft) + off
        child[1::2] = np.where(leaf, ids, rgt) + off
        feats.append(live[f])
        thrs.append(t)
        childs.append(child)
        vals.append(v)
        roots.append(off)
        off += m
        d = 0
        frontier = [0]
        while frontier and any(lft[i] >= 0 for i in frontier):
            frontier = [c for i in frontier if lft[i] >= 0 for c in (lft[i], rgt[i])]
            d += 1
        d_max = max(d_max, d)
    return {"feat": np.concatenate(feats) if feats else np.zeros(0, np.intp),
            "thr": np.concatenate(thrs) if thrs else np.zeros(0),
            "child": np.concatenate(childs) if childs else np.zeros(0, np.intp),
            "value": np.concatenate(vals) if vals else np.zeros(0),
            "roots": np.asarray(roots, dtype=np.intp), "depth": max(d_max, 1), "init": init}


def huber_line(A: np.ndarray, b: np.ndarray, t: float = 1.345, iters: int = 30) -> np.ndarray:
    """Coefficients of ``A @ beta ~ b`` by Huber M-estimation (IRLS)."""
    beta = np.linalg.lstsq(A, b, rcond=None)[0]
    for _ in range(iters):
        r = b - A @ beta
        s = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        if s <= 1e-12:
            break
        a = np.abs(r) / s
        w = np.where(a <= t, 1.0, t / np.maximum(a, 1e-12))
        sw = np.sqrt(w)
        new = np.linalg.lstsq(A * sw[:, None], b * sw, rcond=None)[0]
        if np.allclose(new, beta, rtol=1e-6, atol=1e-10):
            beta = new
            break
        beta = new
    return beta
