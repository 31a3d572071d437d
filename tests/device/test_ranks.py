"""Multi-rank steps (issue 9) on CPU: the join logic on its own, then real gloo processes running a
tensor-parallel MLP under prism-otel, joined on rank 0, with a straggler rank named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from prism_otel import semconv as sc
from prism_otel.device.ranks import join_ranks
from prism_otel.record import StepRecord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rec(rank, start, end, groups=None, device=None):
    return StepRecord(instance=f"r{rank}", index=7, start_ns=start, end_ns=end, phase="decode", batch_size=8,
                      prefill_tokens=0, decode_tokens=8, kernel_groups=groups or {}, device_ns=device,
                      attributes={sc.RANK: rank})


def test_join_names_the_rank_that_computes_while_the_others_wait():
    ms = 1_000_000
    recs = [_rec(1, 0, 40 * ms, {"gemm": 8 * ms, "norm": 2 * ms, "collective": 30 * ms}, 40 * ms),
            _rec(0, 1 * ms, 41 * ms, {"gemm": 9 * ms, "norm": 2 * ms, "collective": 29 * ms}, 40 * ms),
            _rec(2, 0, 42 * ms, {"gemm": 36 * ms, "norm": 2 * ms, "collective": 2 * ms}, 40 * ms)]
    j = join_ranks(recs, 4, missing=[3])
    a = j.attributes
    assert a[sc.RANK_SLOWEST] == 2 and a[sc.RANK_SLOWEST_GROUP] == "gemm"
    assert a[sc.RANK_COUNT] == 3 and a[sc.RANK_WORLD_SIZE] == 4 and a[sc.RANK_MISSING] == [3]
    assert a[sc.RANK_SKEW_MS] == pytest.approx(38 - 10)
    assert (j.start_ns, j.end_ns, j.device_ns) == (0, 42 * ms, 40 * ms)
    assert [r.attributes[sc.RANK] for r in j.ranks] == [0, 1, 2]
    assert j.ranks[2].attributes[sc.RANK_COLLECTIVE_MS] == 2 and j.ranks[2].attributes[sc.RANK_COMPUTE_MS] == 38
    assert j.kernel_groups == recs[2].kernel_groups  # the logical step's groups: the critical rank's
    assert j.instance == "r0" and sc.RANK not in a


def test_join_without_collective_timing_falls_back_to_duration():
    j = join_ranks([_rec(0, 0, 10), _rec(1, 0, 30), _rec(2, 5, 20)], 3)
    assert j.attributes[sc.RANK_SLOWEST] == 1 and sc.RANK_SLOWEST_GROUP not in j.attributes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path, world, *args):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    env["PYTHONPATH"] = ROOT
    procs, outs = [], []
    for r in range(world):
        out = tmp_path / f"rank{r}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.device.tp_worker", str(r), str(world), str(port),
                                       str(out), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


def _tree(spans):
    steps = sorted((s for s in spans if s["name"] == sc.STEP_SPAN), key=lambda s: s["attributes"][sc.STEP_INDEX])
    kids = {}
    for s in spans:
        kids.setdefault(s["parent"], []).append(s)
    return steps, kids


@pytest.mark.timeout(600)
def test_gloo_ranks_joined_and_straggler_named(tmp_path):
    world, steps = 3, 5
    res = _run_ranks(tmp_path, world, "--straggler", "2", "--steps", str(steps), "--deepdive", str(steps))
    leader = res[0]
    assert leader["joined"] == steps and leader["incomplete"] == 0
    for r in res[1:]:  # the other ranks rendered nothing themselves: their steps went to rank 0
        assert not [s for s in r["spans"] if s["name"] == sc.STEP_SPAN]
        assert r["sent"] == steps
    logical, kids = _tree(leader["spans"])
    assert len(logical) == steps  # one prism.step per logical step
    for st in logical:
        a = st["attributes"]
        assert a[sc.RANK_COUNT] == world and a[sc.RANK_SLOWEST] == 2 and a[sc.RANK_SLOWEST_GROUP] == "gemm"
        ranks = sorted((k for k in kids[st["span_id"]] if k["name"].startswith(sc.RANK_SPAN_PREFIX)),
                       key=lambda k: k["name"])
        assert [k["name"] for k in ranks] == [f"prism.rank.{i}" for i in range(world)]
        coll = {}
        for k in ranks:
            ka = k["attributes"]
            groups = {g["attributes"][sc.KERNEL_GROUP]: g["attributes"][sc.DEVICE_TIME_MS] for g in kids[k["span_id"]]}
            assert groups["collective"] > 0 and ka[sc.RANK_COLLECTIVE_MS] == pytest.approx(groups["collective"])
            coll[ka[sc.RANK]] = ka[sc.RANK_COLLECTIVE_MS]
            assert {"gemm", "norm", "activation"} <= set(groups)
        # the straggler spins 2 x 30 ms in its gemm; the others wait that long in the all-reduce
        assert coll[2] < min(coll[0], coll[1]) and min(coll[0], coll[1]) > 40
        assert a[sc.RANK_SKEW_MS] > 40


@pytest.mark.timeout(600)
def test_gloo_ranks_sentinel_only(tmp_path):
    """Without DeepDive the ranks still join into one step each (no collective timing, no group)."""
    res = _run_ranks(tmp_path, 2, "--steps", "3")
    logical, kids = _tree(res[0]["spans"])
    assert len(logical) == 3
    for st in logical:
        assert st["attributes"][sc.RANK_COUNT] == 2
        assert len([k for k in kids[st["span_id"]] if k["name"].startswith(sc.RANK_SPAN_PREFIX)]) == 2
