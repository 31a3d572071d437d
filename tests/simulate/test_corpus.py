"""The real-data corpus: recorded from a real engine, held-out scoring with injected slowdowns, and the
shipped corpora `prism-otel eval` reports as its headline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prism_eval.simulate import corpus, holdout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shipped_corpora_are_there_and_well_formed():
    have = corpus.available()
    # every CPU corpus is shipped (`make corpus` records them again); the GPU corpus is recorded on a lent
    # GPU machine (bench/device/gpu_corpus.sh), picked up from its directory with no code change, and held
    # to the same form once it is there
    cpu = {n for n, (_, _, opts) in corpus.CORPORA.items() if opts.get("device", "cpu") == "cpu"}
    assert cpu <= set(have), "every corpus this machine records is shipped"
    for name, path in have.items():
        meta = json.load(open(os.path.join(path, "meta.json")))
        assert meta["name"] == name and meta["segments"] == len(corpus.grid())
        rows = corpus.read_steps(os.path.join(path, "steps.csv.gz"))
        assert len(rows) == meta["steps"] > 2000
        seen = {r["workload"] for r in rows}
        # every workload configuration produced steps, both arrival modes of every pair
        assert len(seen) >= 0.9 * meta["segments"], (name, len(seen))
        assert {r["phase"] for r in rows} >= {"decode"}


def test_holdout_protocol_holds_out_whole_workload_pairs_and_injects_onto_real_steps():
    path = corpus.available()["transformers-small"]
    steps, work = holdout.load(path)
    train, ss = holdout.streams("transformers-small", path)
    groups = {corpus.group_of(w) for w in work}
    held = {g for g in groups if holdout.held_out(g)}
    assert len(held) == len(groups) // 2  # a checkerboard over the 4 x 4 grid
    for s in ss:
        test_groups = {corpus.group_of(w) for w in s.meta["workloads"]}
        assert test_groups == held  # no training configuration is judged, every held-out one is
        assert len(train) + len(s.steps) == len(steps)
        lab = np.asarray(s.labels)
        assert 0.01 < (lab == 1).mean() < 0.5 and s.meta["injected"]
        # the labelled steps are the real held-out steps, made slower by their multiplier
        real = [x for x, w in zip(steps, work) if holdout.held_out(corpus.group_of(w))]
        for i in np.flatnonzero(lab == 1)[:50]:
            got = (s.steps[i].end_ns - s.steps[i].start_ns) / (real[i].end_ns - real[i].start_ns)
            assert got == pytest.approx(1.0 + s.slowdown[i], rel=1e-3)
        for i in np.flatnonzero(lab == 0)[:50]:
            assert s.steps[i].end_ns - s.steps[i].start_ns == real[i].end_ns - real[i].start_ns


def test_eval_scores_a_shipped_corpus_with_every_shape_and_the_worst_workload():
    r = subprocess.run([sys.executable, "-m", "prism_otel.cli", "eval", "--json", "--no-synthetic", "--only-corpus",
                        "transformers-small", "--detectors", "prism,static_threshold"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["corpus"]
    e = res["engines"]["transformers-small"]["detectors"]
    for n in ("prism", "static_threshold"):
        m = e[n]
        assert set(m["by_shape"]) == {"flat", "ramp", "burst"}
        assert m["worst_workload"] and 0 <= m["fpr"] <= m["worst_workload_fpr"] <= 1
    p, s = e["prism"], e["static_threshold"]
    # the detector must beat a static threshold on real steps by far, and catch most flat slowdowns
    assert p["f1"] > s["f1"] + 0.3
    assert p["by_shape"]["flat"]["recall"] > 0.6 and p["fpr"] < 0.05


@pytest.mark.slow
def test_build_records_every_configuration_from_a_real_engine(tmp_path):
    """A short corpus (1 s per configuration) from a real transformers engine with a tiny model."""
    meta = corpus.build("transformers-tiny", str(tmp_path / "c"), segment_s=1.0, log=lambda *_: None)
    assert meta["segments"] == len(corpus.grid()) and meta["steps"] > 100
    rows = corpus.read_steps(str(tmp_path / "c" / "steps.csv.gz"))
    assert len(rows) == meta["steps"]
    names = {s.name for s in corpus.grid()}
    assert {r["workload"] for r in rows} <= names and len({r["workload"] for r in rows}) >= 0.8 * len(names)
    # larger concurrency gives larger batches: the recording is of the workload asked for
    by = {}
    for r in rows:
        if r["phase"] == "decode":
            by.setdefault(int(r["workload"].split("-")[0][1:]), []).append(float(r["batch_size"]))
    assert np.median(by[64]) > np.median(by[1])


def test_recorded_fault_runs_are_scored_cold_and_trained_with_recovery_set_aside():
    from prism_eval.simulate import faultruns

    runs = faultruns.available()
    assert {f"{e}-{f}" for e in faultruns.ENGINES for f in faultruns.FAULTS} <= set(runs)
    name = "transformers-cpu_throttle"  # (the runs re-recorded with evidence: gc_storm's recall fell to 0.17)
    res = faultruns.evaluate({name: runs[name]}, ["prism", "zscore"])[name]
    rc = res["root_cause"]["cpu_throttle"]  # and the root cause on the flagged in-window steps
    assert rc["expected"] == "cpu.throttled" and rc["flagged"] > 20 and rc["top1"] >= 0.9, rc
    assert res["effect"] >= 1.2 and res["anomalous"] > 20
    assert res["set_aside"] <= 0.2 * res["steps"]  # at most 20% of the steps are recovery
    p = res["detectors"]["prism"]
    assert set(p) == {"train", "cold"}  # prism is scored both ways, a baseline needs its warm-up
    assert set(res["detectors"]["zscore"]) == {"train"}
    for mode in ("train", "cold"):
        assert 0 <= p[mode]["fpr"] <= 1 and p[mode]["recall"] > 0.5, (mode, p[mode])
