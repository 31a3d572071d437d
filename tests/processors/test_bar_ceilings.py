"""On a noisy engine no bars meet ``target_fpr`` on the injected training steps, and the least-FPR fallback used to
put them out of any slowdown's reach: on the recorded stage-stall run of the transformers engine (shipped with
the fault runs, recorded on a shared 2-core VM), trained on its warm-up, the stalled steps went unflagged (F1 0).
The ceilings (``point_ratio``, ``pair_ratio``) keep a 4x step alone and two 3x steps in a row within reach of the
point and pair bars."""

from __future__ import annotations

import numpy as np
import pytest

from prism_eval.simulate import faultruns
from prism_eval.simulate.suite import Score, prism_flags

RUN = "transformers-stage_stall"


def _score(cfg):
    runs = faultruns.available()
    if RUN not in runs:
        pytest.skip(f"{RUN} is not shipped in this tree")
    s = faultruns.stream(RUN, runs[RUN])
    flags, _, proc = prism_flags(s, cfg)
    sc = Score()
    sc.add(s, np.asarray(flags, dtype=bool))
    return sc.summary()


def test_a_stall_on_a_noisy_recording_is_caught_with_the_ceilings():
    got = _score({})
    assert got["f1"] > 0.4 and got["fpr"] < 0.03, got
    old = _score({"point_ratio": 0, "pair_ratio": 0})  # the fallback without ceilings: nothing caught
    assert old["f1"] < got["f1"] - 0.3, (old, got)
