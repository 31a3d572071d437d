"""Baselines persist by key and load in a new process: its first steps are judged (no warm-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from prism_eval.simulate.synthetic import PROFILES, WORKLOADS, simulate
from processors import baseline as bl
from processors.anomaly import AnomalyProcessor
from processors.model import LatencyModel, fit
from tests.processors.streams import QUIET, shift_stream

KEY = {"model": "llama-tiny", "hardware": "cpu x2", "framework": "transformers", "parallelism": "world=1",
       "versions": "transformers=5.23.0;torch=2.13.0"}


def _learn(tmp_path, key=KEY):
    """A live processor (fits on its own thread) learns from normal traffic and saves on shutdown."""
    s = shift_stream()
    proc = AnomalyProcessor({**QUIET, "background": True, "baseline_dir": str(tmp_path), "baseline_key": key,
                             "min_train": 150})
    for x in s.train:
        proc.process(x)
    assert proc.wait_idle(60)
    proc.shutdown()
    return proc


def test_baseline_saved_as_json_under_its_key(tmp_path):
    _learn(tmp_path)
    files = os.listdir(tmp_path)
    assert files == [os.path.basename(bl.path_for(str(tmp_path), KEY))]
    doc = json.loads((tmp_path / files[0]).read_text())
    assert doc["key"] == KEY and doc["format"] == bl.FORMAT
    m = doc["model"]  # one model for every phase
    assert m["model"]["trees"] is not None and len(m["sample"]["y"]) > 100
    X = np.array(m["sample"]["X"])
    assert (X[:, 1] > 0).any() and (X[:, 1] == 0).any()  # prefill and decode steps in its sample


def test_restarted_process_judges_its_first_steps(tmp_path):
    _learn(tmp_path)
    # a new process (fresh interpreter) with the same key: step 1 already has a verdict, and a slowdown
    # starting at step 3 is flagged within two steps (a lone step 1.5x over is at the point test's floor)
    code = f"""
import json, sys
from processors.anomaly import AnomalyProcessor
from prism_eval.simulate.synthetic import PROFILES, WORKLOADS, Anomaly, simulate
s = simulate(PROFILES["gpu8b"], WORKLOADS["bursty"], 40, seed=99, instance="restarted",
             anomalies=[Anomaly("slowdown", 3, 20, 0.5)])
p = AnomalyProcessor({{"alert_file": "none", "alert_log": False, "baseline_dir": {str(tmp_path)!r},
                       "baseline_key": {KEY!r}}})
vs = [p.process(x).verdict for x in s.steps]
print(json.dumps({{"loaded": p.baseline_loaded, "judged": [v is not None for v in vs],
                   "flags": [bool(v and v.anomaly) for v in vs], "labels": s.labels}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["loaded"] and r["judged"][0] and all(r["judged"])
    lab = np.array(r["labels"])
    flags = np.array(r["flags"])
    assert flags[lab == 1].mean() > 0.9 and flags[3:5].any()
    assert not flags[:3].any()


def test_other_key_starts_cold(tmp_path):
    _learn(tmp_path)
    s = shift_stream()
    p = AnomalyProcessor({**QUIET, "baseline_dir": str(tmp_path), "baseline_key": {**KEY, "hardware": "H100 x1"}})
    assert not p.baseline_loaded
    assert p.process(s.steps[0]).verdict is None


def test_unreadable_baseline_is_ignored(tmp_path, caplog):
    path = bl.path_for(str(tmp_path), KEY)
    with open(path, "w") as f:
        f.write("{not json")
    p = AnomalyProcessor({**QUIET, "baseline_dir": str(tmp_path), "baseline_key": KEY})
    assert not p.baseline_loaded
    assert "unreadable baseline" in caplog.text


def test_model_round_trip_and_numpy_trees_as_good_as_sklearn():
    s = simulate(PROFILES["gpu1b_overlap"], WORKLOADS["chat"], 10, seed=5, n_train=1200)
    from processors.features import StepContext

    ctx = StepContext()
    X = np.array([ctx.features(x.instance, x.batch_size, x.prefill_tokens, x.decode_tokens, x.context_tokens,
                               x.max_context_tokens, x.start_ns, x.end_ns) for x in s.train])
    y = np.array([x.duration_ms for x in s.train])
    m = fit(X, y)
    m2 = LatencyModel.from_dict(json.loads(json.dumps(m.to_dict())))
    many = m.predict_many(X)
    assert np.allclose(m2.predict_many(X), many, rtol=1e-12)
    assert m2.limits == m.limits and m2.cells == m.cells and m.cells
    one = np.array([m.expect(tuple(x)) for x in X[:300]])
    assert np.allclose(one, many[:300], rtol=1e-9)
    # the numpy trees fit the correction as well as scikit-learn's GBR does, on rows neither saw
    from sklearn.ensemble import GradientBoostingRegressor

    from processors.gbm import fit_trees
    from processors.model import FitParams, _fit_once, _tree_raw

    base = _fit_once(X, y, FitParams(), with_trees=False)
    z = np.log(y / base.predict_many(X))
    med = np.median(z)
    lim = 6 * 1.4826 * max(np.median(np.abs(z - med)), 1e-4)
    z = np.clip(z, med - lim, med + lim)
    tr, te = slice(0, 900), slice(900, None)
    ours = _tree_raw(fit_trees(X[tr], z[tr]), X[te])
    g = GradientBoostingRegressor(n_estimators=100, max_depth=3, learning_rate=0.1, subsample=0.8, min_samples_leaf=15,
                                  random_state=0).fit(X[tr].astype(np.float32), z[tr])

    def rmse(pred):
        return float(np.sqrt(np.mean((pred - z[te]) ** 2)))

    assert rmse(ours) <= 1.15 * rmse(g.predict(X[te].astype(np.float32))) + 1e-4, (rmse(ours), rmse(g.predict(X[te].astype(np.float32))))
    # the median error of the expected latency on these (training) steps is small
    assert np.median(np.abs(many / y - 1)) < 0.03


def test_no_downward_extrapolation():
    s = simulate(PROFILES["gpu8b"], WORKLOADS["chat"], 10, seed=6, n_train=1500)
    big = [x for x in s.train if x.phase == "decode" and x.batch_size >= 16]
    from processors.features import step_features

    X = np.array([step_features(x.batch_size, 0, x.decode_tokens, x.context_tokens, x.max_context_tokens, None)
                  for x in big])
    m = fit(X, np.array([x.duration_ms for x in big]))
    tiny = m.expect(step_features(1, 0, 1, 500, 500, None))
    # the weight-streaming floor (~5 ms on this profile) holds below the smallest batch seen
    assert tiny > 4.0, tiny
