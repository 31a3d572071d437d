"""Steps where the batch changes carry the heavy tail on real GPU servers (a request's first step, a new batch
shape): the detector judges them on a scale of their own, so 1.3x slowdowns of the other steps are caught
while the event steps' tail is not flagged. A stream built for that shape (the derived change, from the
rows alone, as a steps.csv gives them)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np

from prism_eval.simulate import baselines
from processors.anomaly import AnomalyProcessor
from tests.processors.streams import QUIET
from tests.processors.test_change_features import cb_stream


def event_tail_stream(n, seed, episodes=()):
    """cb_stream's steps with a GPU-like cost: quiet ordinary steps (3% noise), event steps (a request joins
    or leaves, a prefill) 0-3x slower, heavy-tailed; ``episodes`` (start, length, factor) multiply steps."""
    rng = random.Random(seed)
    out, prev_ids = [], set()
    for s, reqs in cb_stream(n, seed=seed):
        ids = {r[0] for r in reqs}
        event = ids != prev_ids
        prev_ids = ids
        ms = 6.0 + 0.15 * s.batch_size + 0.0004 * s.context_tokens + 0.01 * s.prefill_tokens
        ms *= math.exp(rng.gauss(0.0, 0.03))
        if event:
            ms *= math.exp(abs(rng.gauss(0.0, 0.45)))  # the tail a batch change brings
        for a, ln, f in episodes:
            if a <= len(out) < a + ln:
                ms *= f
        out.append(dataclasses.replace(s, end_ns=s.start_ns + int(ms * 1e6)))
    # the timeline shifted so steps do not overlap
    t, res = out[0].start_ns, []
    for s in out:
        d = s.end_ns - s.start_ns
        res.append(dataclasses.replace(s, start_ns=t, end_ns=t + d))
        t += d + 50_000
    return res


def test_event_steps_tail_is_judged_on_its_own_scale():
    train = event_tail_stream(2500, seed=21)
    eps = [(300 + 250 * k, 25, 1.3) for k in range(6)]
    test = event_tail_stream(2000, seed=22, episodes=eps)
    lab = np.zeros(len(test), dtype=bool)
    for a, ln, _ in eps:
        lab[a:a + ln] = True
    proc = AnomalyProcessor(dict(QUIET))
    proc.train(train)
    flags = np.array([bool((v := proc.process(s).verdict) and v.anomaly) for s in test])
    m = proc._seed[0]
    assert m.scales[0] > 3 * m.scales[2], m.scales  # event steps' scale, ordinary steps' scale
    fpr, recall = flags[~lab].mean(), flags[lab].mean()
    assert fpr < 0.01 and recall > 0.7, (fpr, recall)
    # the plain offline model with a 3-step median, on the same steps, does worse
    base = np.asarray(baselines.gbdt_median3(train, test), dtype=bool)
    b_f1 = 2 * (base & lab).sum() / (base.sum() + lab.sum())
    f1 = 2 * (flags & lab).sum() / (flags.sum() + lab.sum())
    assert f1 > b_f1 + 0.1, (f1, b_f1)
