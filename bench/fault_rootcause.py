"""Root-cause accuracy per fault of a recorded run (prism's detector run as `prism-otel detect --train`).

    python bench/fault_rootcause.py RUN_DIR [RUN_DIR ...] [--json OUT.json] [--slow 1.5]

RUN_DIR holds steps.csv (with the signal_<name> columns the pipeline recorded), train.csv, labels.csv
and meta.json (what `prism-otel simulate` writes; what bench/gpu_faults.py copies to $OUT), or is a
shipped fault run (prism_eval/simulate/corpus_data/faults/<engine>-<fault>, compressed). Runs
processors.anomaly.AnomalyProcessor exactly as prism_eval/detect_cli.detect does (background off,
trained on train.csv, steps judged in order) and keeps each verdict's root cause. Per fault (the
steps each episode owns, as runscore.score_run): the cause the fault stands for, flagged in-window
steps, top-1 accuracy (flagged in-window steps whose main root cause is that cause / flagged
in-window steps), the false positives of its segment and the share of them that say unknown or
workload. When the engine ran with in-process detection, the root causes on its own spans
(online_root_cause) are scored the same way on its own flags.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.environ.get("PRISM_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from prism_eval.simulate import dataset, rcscore, runscore, stepcsv
from prism_otel import semconv as sc
from processors.anomaly import AnomalyProcessor


def offline(run, slow=None):
    """flags and root causes of prism's detector; with ``slow`` (a ratio) also the root cause that
    processors.rootcause would give every step at least ``slow`` x its expectation, flagged or not (the
    root cause alone, apart from the detector's recall)."""
    from processors import rootcause

    proc = AnomalyProcessor({"background": False, "alert_file": "none", "alert_log": False})
    _, raw, steps, _ = stepcsv.read(os.path.join(run, "steps.csv"))
    tpath = os.path.join(run, "train.csv")
    if os.path.exists(tpath):
        proc.train([s for s in stepcsv.read(tpath)[2] if s is not None])
    flags, roots, sflags, sroots, contribs = [], [], [], [], []
    for s in steps:
        out = proc.process(s) if s is not None else None
        v = out.verdict if out is not None else None
        ok = v is not None and v.expected_ms is not None
        flags.append(int(ok and v.anomaly))
        roots.append(v.root_cause if ok and v.anomaly else None)
        contribs.append(out.attributes.get(sc.EVIDENCE_CONTRIBUTING) if ok and v.anomaly else None)
        if slow:
            big = ok and s.duration_ms >= slow * v.expected_ms
            sflags.append(int(big))
            if big:
                key = proc._keys.get(s.instance)  # per instance; its model group holds the stage norms
                st = rootcause._state(proc).norms.get(s.instance)
                sroots.append(v.root_cause if v.anomaly else
                              rootcause.explain(s, v.expected_ms, st,
                                                getattr(getattr(key, "group", None), "norms", None)).root)
            else:
                sroots.append(None)
    proc.shutdown()
    return raw, flags, roots, sflags, sroots, contribs


def contributing(flags, contribs, labels, windows):
    """How often a contributing cause is named: on flagged fault steps (and how often it is the fault's own
    cause, the main one having missed it) and on false positives."""
    from prism_eval.simulate.catalog import expected_cause

    owner = runscore.segments(labels, windows) if windows else [""] * len(labels)
    want = {w["fault"]: expected_cause(w["fault"], w.get("params")) for w in windows}
    tp = tp_named = tp_fault = fp = fp_named = 0
    for i, lb in enumerate(labels):
        if str(lb.get("scored", "1")) in ("0", "0.0") or not flags[i]:
            continue
        if int(lb["anomaly"]):
            tp += 1
            tp_named += contribs[i] is not None
            tp_fault += contribs[i] is not None and contribs[i] == want.get(lb.get("fault") or owner[i])
        else:
            fp += 1
            fp_named += contribs[i] is not None
    return {"flagged_in_window": tp, "named": tp_named, "named_the_fault": tp_fault,
            "false_positives": fp, "fp_named": fp_named}


def materialize(run):
    """A shipped run (corpus_data/faults/<name>: *.csv.gz) as a plain run directory in a temp dir."""
    import gzip
    import shutil
    import tempfile

    if os.path.exists(os.path.join(run, "steps.csv")):
        return run
    d = os.path.join(tempfile.mkdtemp(prefix="prism-rc-"), os.path.basename(os.path.normpath(run)))
    os.makedirs(d)
    for n in ("steps.csv", "train.csv", "labels.csv"):
        with gzip.open(os.path.join(run, n + ".gz"), "rb") as src, open(os.path.join(d, n), "wb") as dst:
            shutil.copyfileobj(src, dst)
    shutil.copy(os.path.join(run, "meta.json"), d)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--slow", type=float, default=None, metavar="RATIO",
                    help="also score the root cause on every step at least RATIO x its expectation (flagged or not)")
    a = ap.parse_args()
    doc = {}
    print(rcscore.HEADER)
    for run in a.runs:
        run = materialize(run)
        raw, flags, roots, sflags, sroots, contribs = offline(run, a.slow)
        labels = runscore._int_rows(dataset.read_csv(os.path.join(run, "labels.csv")))
        meta = json.load(open(os.path.join(run, "meta.json")))
        name = os.path.basename(os.path.normpath(run))
        res = rcscore.score(flags, roots, labels, meta["windows"])
        doc[name] = {"offline": res, "contributing": contributing(flags, contribs, labels, meta["windows"])}
        print("\n".join(rcscore.render(name, res)))
        print(f"  contributing cause named: {doc[name]['contributing']}")
        if a.slow:
            res = rcscore.score(sflags, sroots, labels, meta["windows"])
            doc[name][f"slow{a.slow:g}"] = res
            print("\n".join(rcscore.render(f"{name} (>= {a.slow:g}x)", res)))
        if raw and "online_root_cause" in raw[0] and any(r.get("online_anomaly", "") != "" for r in raw):
            of = [int(r.get("online_anomaly") or 0) for r in raw]
            orr = [r.get("online_root_cause") or None for r in raw]
            res = rcscore.score(of, orr, labels, meta["windows"])
            doc[name]["online"] = res
            print("\n".join(rcscore.render(name + " (online)", res)))
    if a.json:
        json.dump(doc, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
