"""Detection benchmark (issue 3): accuracy on the labelled suite, verdict cost, refit cost, alert delay.

Compares prism's detector with what a user would otherwise run, in the same process and run:

* accuracy: prism vs ``static_threshold``, ``zscore`` and ``latencyprism_rule`` (LatencyPrism's
  detector reimplemented from its paper) on the labelled synthetic suite (``--size full``: 24 streams,
  96k judged steps; see ``prism_eval/simulate/suite.py``);
* verdict cost per step on the calling thread: ``AnomalyProcessor.process`` (features, compiled
  trees, tests, verdict copy) vs one ``sklearn`` ``predict`` per step (what a per-step GBDT costs
  done the obvious way), timed in alternating blocks of 100 steps; the ratio of block medians, its
  median and IQR over the blocks;
* refit on 1000 steps on the processor's own thread (two-fold calibration and final fit), vs the
  LatencyPrism-setting GBDT (200 trees, depth 4) fitted on the same rows, and the calling thread's
  verdict cost while the refit runs;
* first fit: a fresh interpreter's model-library import and its first model on 200 real steps (the
  shipped transformers-small corpus): what an instance's first verdicts wait for (no blind start);
* alert delay: steps fed through the real pipeline thread as an engine would (timestamps on the ring),
  time from a step's end to its alert's JSON line.

Usage: ``.venv/bin/python bench/detect_eval.py [--size full|small] [--seed N]``. It takes minutes and
two cores' worth of CPU: run it when the machine is quiet (other work on the 2 shared cores
inflates the timings, not the accuracy).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import threading
import time
import warnings

import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from prism_eval.simulate import suite as S  # noqa: E402
from prism_eval.simulate.synthetic import PROFILES, WORKLOADS, Anomaly, simulate  # noqa: E402
from prism_otel.record import StepFeatures, clock_ns  # noqa: E402
from prism_otel.recorder import Recorder  # noqa: E402
from processors.anomaly import AnomalyProcessor  # noqa: E402
from processors.features import StepContext  # noqa: E402
from processors.model import fit  # noqa: E402

QUIET = {"alert_file": "none", "alert_log": False}


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _features(steps) -> list:
    ctx = StepContext()
    return [ctx.features(x.instance, x.batch_size, x.prefill_tokens, x.decode_tokens, x.context_tokens,
                         x.max_context_tokens, x.start_ns, x.end_ns, x.change) for x in steps]


def accuracy(size: str, seed: int) -> dict:
    streams = S.suite(size, seed)
    t0 = time.perf_counter()
    res = S.run(streams)
    res["wall_s"] = time.perf_counter() - t0
    return res


def verdict_cost(n: int = 20000) -> dict:
    from sklearn.ensemble import GradientBoostingRegressor

    s = simulate(PROFILES["gpu8b"], WORKLOADS["chat"], n, seed=7, n_train=1500, instance="bench")
    proc = AnomalyProcessor({**QUIET, "background": True})  # refits on their own thread, as live
    proc.train(s.train)
    # the alternative: a per-step sklearn GBDT (LatencyPrism's settings) on the same features
    X = _features(s.train)
    gbr = GradientBoostingRegressor(n_estimators=200, max_depth=4, learning_rate=0.1, random_state=42)
    gbr.fit(np.array(X), np.array([x.duration_ms for x in s.train]))
    ours, theirs, ratio = [], [], []
    pc = time.perf_counter_ns
    rows = [np.array([r]) for r in _features(s.steps)]
    block = 100  # paired by blocks of steps (interleaving every call would let sklearn evict our caches)
    for b0 in range(0, len(s.steps) - block + 1, block):
        mine, alt = [], []
        for x in s.steps[b0:b0 + block]:
            t0 = pc()
            proc.process(x)
            mine.append((pc() - t0) / 1e3)
        for row in rows[b0:b0 + block]:
            t0 = pc()
            gbr.predict(row)
            alt.append((pc() - t0) / 1e3)
        if b0:  # the first block warms up
            ours += mine
            theirs += alt
            ratio.append(statistics.median(alt) / statistics.median(mine))
    proc.shutdown()
    return {"p50": _q(ours, 0.5), "p99": _q(ours, 0.99), "p999": _q(ours, 0.999), "max": max(ours), "alt_p50": _q(theirs, 0.5),
            "alt_p99": _q(theirs, 0.99), "ratio_med": statistics.median(ratio), "ratio_q1": _q(ratio, 0.25),
            "ratio_q3": _q(ratio, 0.75), "n": len(ours)}


def refit_cost(reps: int = 5) -> dict:
    from sklearn.ensemble import GradientBoostingRegressor

    s = simulate(PROFILES["gpu1b_overlap"], WORKLOADS["chat"], 3000, seed=8, n_train=3000, instance="bench")
    rows = [x for x in s.train if x.phase == "decode"][:1000]
    X = np.array(_features(rows))
    y = np.array([x.duration_ms for x in rows])
    fit(X, y)  # imports and caches warm
    ours, theirs, during = [], [], []
    for _ in range(reps):
        box = {}

        def bg():
            t = time.perf_counter()
            fit(X, y)
            box["s"] = time.perf_counter() - t

        th = threading.Thread(target=bg, name="prism-otel-fit")
        proc = AnomalyProcessor({**QUIET, "background": False, "refit_every": 10**9})
        proc.train(s.train[:1500])
        th.start()
        i = 0
        while th.is_alive():  # the calling thread keeps judging steps while the refit runs
            x = s.steps[i % len(s.steps)]
            t0 = time.perf_counter_ns()
            proc.process(x)
            during.append((time.perf_counter_ns() - t0) / 1e3)
            i += 1
            time.sleep(0.0005)  # an engine step's worth of pacing
        th.join()
        ours.append(box["s"])
        t = time.perf_counter()
        GradientBoostingRegressor(n_estimators=200, max_depth=4, learning_rate=0.1, random_state=42).fit(X, y)
        theirs.append(time.perf_counter() - t)
    return {"rows": len(y), "median_s": statistics.median(ours), "max_s": max(ours),
            "alt_median_s": statistics.median(theirs), "during_p50": _q(during, 0.5), "during_p99": _q(during, 0.99),
            "during_n": len(during)}


_FIRST_FIT = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from processors.features import StepContext
from processors.model import fit
from prism_eval.simulate import corpus, holdout
t1 = time.perf_counter()
steps, _ = holdout.load(corpus.available()["transformers-small"])
rows = steps[:{n}]
ctx = StepContext()
X = [ctx.features(x.instance, x.batch_size, x.prefill_tokens, x.decode_tokens, x.context_tokens,
                  x.max_context_tokens, x.start_ns, x.end_ns) for x in rows]
import numpy as np
t2 = time.perf_counter()
fit(np.array(X), np.array([(x.end_ns - x.start_ns) / 1e6 for x in rows]))
print(t1 - t0, time.perf_counter() - t2)
"""


def first_fit(n: int = 200, reps: int = 5) -> dict:
    """A fresh interpreter's first model on ``n`` real decode steps (the shipped transformers-small
    corpus): the model libraries' import, then the fit (what an instance's first ``min_train`` steps wait
    for), medians and max over ``reps`` fresh processes."""
    import os
    import subprocess

    root = __file__.rsplit("/bench/", 1)[0]
    imp, fits = [], []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", _FIRST_FIT.format(root=os.path.abspath(root), n=n)],
                             capture_output=True, text=True, check=True).stdout.split()
        imp.append(float(out[0]))
        fits.append(float(out[1]))
    return {"rows": n, "import_s": statistics.median(imp), "fit_s": statistics.median(fits), "fit_max_s": max(fits)}


def alert_delay() -> dict:
    """Steps go on the ring as an engine records them, paced 1 ms apart (their timestamps are the
    simulated ones, shifted into the past so starts stay in order); the delay is from the moment a
    step was recorded to the moment its alert was delivered, on the pipeline thread."""
    from opentelemetry.sdk.trace import TracerProvider

    from prism_otel.pipeline import Pipeline
    from processors.alerts import AlertSink

    recorded: dict = {}
    delays = []

    class Timed(AlertSink):
        def emit(self, alert):
            delays.append((time.perf_counter_ns() - recorded[alert["prism.step.index"]]) / 1e6)

    s = simulate(PROFILES["gpu8b"], WORKLOADS["chat"], 3000, seed=9, n_train=1500, instance="bench",
                 anomalies=[Anomaly("spike", 300 + 250 * k, 1, 1.0) for k in range(10)])
    proc = AnomalyProcessor({**QUIET, "background": True})
    proc.train(s.train)
    proc.sink = Timed(log=False, file="none")
    rec = Recorder(1 << 16)
    pipe = Pipeline(rec, TracerProvider(), "bench", [proc])
    pipe.start()
    shift = clock_ns() - (s.steps[-1].end_ns - s.steps[0].start_ns) - 10**9 - s.steps[0].start_ns
    for i, x in enumerate(s.steps):
        feat = StepFeatures(x.phase, x.batch_size, x.prefill_tokens, x.decode_tokens, x.context_tokens,
                            x.max_context_tokens)
        recorded[i + 1] = time.perf_counter_ns()  # the pipeline numbers steps from 1
        rec.step(i, x.start_ns + shift, x.end_ns + shift, feat, (), None, None)
        time.sleep(0.001)
    pipe.flush(10)
    pipe.stop()
    return {"alerts": len(delays), "p50_ms": _q(delays, 0.5) if delays else math.nan,
            "max_ms": max(delays) if delays else math.nan}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--seed", type=int, default=S.DEFAULT_SEED)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    acc = accuracy(args.size, args.seed)
    vc = verdict_cost()
    rc = refit_cost()
    ad = alert_delay()
    ff = first_fit()
    su = acc["suite"]
    print(f"# detection benchmark: suite {args.size} (seed {args.seed}): {su['streams']} streams, {su['steps']} judged "
          f"steps, {su['anomalous_steps']} anomalous; accuracy run {acc['wall_s']:.0f} s")
    print(S.render(acc))
    print("LatencyPrism as published (its own data, not this suite): precision 0.971 recall 0.999 f1 0.985 "
          "fpr 0.59% lag 0.2 batches")
    print()
    print(f"{'measure':<44} {'prism':>14} {'alternative':>14} {'ratio (alt/prism)':>24}")
    print(f"{'verdict per step, p50 (us)':<44} {vc['p50']:>14.1f} {vc['alt_p50']:>14.1f} "
          f"{vc['ratio_med']:>10.1f} [IQR {vc['ratio_q1']:.1f}-{vc['ratio_q3']:.1f}]")
    print(f"{'verdict per step, p99 (us)':<44} {vc['p99']:>14.1f} {vc['alt_p99']:>14.1f} {'':>24}")
    print(f"{'verdict per step, p99.9 / max (us), n=' + str(vc['n']):<44} {vc['p999']:>6.0f} / {vc['max']:<7.0f}"
          f"{'':>14} {'':>24}")
    print(f"{'refit on ' + str(rc['rows']) + ' steps, median (s), own thread':<44} {rc['median_s']:>14.3f} "
          f"{rc['alt_median_s']:>14.3f} {rc['alt_median_s'] / rc['median_s']:>24.2f}")
    print(f"{'refit on ' + str(rc['rows']) + ' steps, max of 5 (s)':<44} {rc['max_s']:>14.3f} {'':>14} {'':>24}")
    print(f"{'verdict during a refit, p50 / p99 (us)':<44} {rc['during_p50']:>6.1f} / {rc['during_p99']:<5.1f} "
          f"{'':>14} {'':>24}")
    print(f"{'alert delay, step end -> alert, p50 / max (ms)':<44} {ad['p50_ms']:>6.2f} / {ad['max_ms']:<5.2f} "
          f"{'':>14} {'(' + str(ad['alerts']) + ' alerts)':>24}")
    print(f"{'first fit, fresh process, ' + str(ff['rows']) + ' real steps (s)':<44} {ff['fit_s']:>14.3f} "
          f"{'':>14} {'max ' + format(ff['fit_max_s'], '.3f') + ', imports ' + format(ff['import_s'], '.3f'):>24}")
    print("alternatives: verdict = sklearn GradientBoostingRegressor.predict per step (200 trees, depth 4); "
          "refit = the same GBDT fitted on the same rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
