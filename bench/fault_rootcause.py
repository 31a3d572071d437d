"""Top-1 root cause of prism's offline detector (the same run as `prism-otel detect --train`) per fault.

    python bench/fault_rootcause.py RUN_DIR [EXPECTED=stage:forward] [OUT.json]

RUN_DIR holds steps.csv, train.csv, labels.csv, meta.json (what bench/gpu_faults.py copies to $OUT).
Runs processors.anomaly.AnomalyProcessor exactly as prism_otel/detect_cli.detect does (background off,
trained on train.csv, steps judged in order) and keeps each verdict's root_cause; checks the anomaly
flags against verdicts.csv when present. Per fault (steps each episode owns, as runscore.score_run):
flagged in-window steps, the root causes named on them, and top-1 accuracy = flagged in-window steps
whose root cause is EXPECTED / flagged in-window steps (a step with no root cause counts as a miss).
"""
import collections, csv, json, os, sys
sys.path.insert(0, os.environ.get("PRISM_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from processors.anomaly import AnomalyProcessor
from prism_otel.simulate import dataset, runscore, stepcsv

run = sys.argv[1]
expected = sys.argv[2] if len(sys.argv) > 2 else "stage:forward"
proc = AnomalyProcessor({"background": False, "alert_file": "none", "alert_log": False})
_, raw, steps, _ = stepcsv.read(os.path.join(run, "steps.csv"))
_, _, tsteps, _ = stepcsv.read(os.path.join(run, "train.csv"))
proc.train([s for s in tsteps if s is not None])
flags, roots = [], []
for s in steps:
    v = proc.process(s).verdict if s is not None else None
    ok = v is not None and v.expected_ms is not None
    flags.append(int(ok and v.anomaly))
    roots.append(v.root_cause if ok and v.anomaly else None)
proc.shutdown()
vpath = os.path.join(run, "verdicts.csv")
if os.path.exists(vpath):
    with open(vpath, newline="") as f:
        ref = [int(float(r["anomaly"] or 0)) for r in csv.DictReader(f)]
    same = sum(a == b for a, b in zip(ref, flags))
    print(f"# flags agree with verdicts.csv on {same}/{len(ref)} rows")
labels = runscore._int_rows(dataset.read_csv(os.path.join(run, "labels.csv")))
meta = json.load(open(os.path.join(run, "meta.json")))
owner = runscore.segments(labels, meta["windows"])
out = {}
print(f"{'fault':18s} {'anom':>5s} {'flagged':>8s} {'w/ cause':>8s} {'top1':>6s}  causes on flagged in-window steps (expected {expected})")
for fault in list(dict.fromkeys(w["fault"] for w in meta["windows"])) + ["all"]:
    idx = [i for i, o in enumerate(owner) if (fault == "all" or o == fault) and labels[i]["anomaly"]]
    fl = [i for i in idx if flags[i]]
    c = collections.Counter(roots[i] or "none" for i in fl)
    top1 = c.get(expected, 0) / len(fl) if fl else float("nan")
    named = sum(v for k, v in c.items() if k != "none")
    fp = [i for i, o in enumerate(owner) if (fault == "all" or o == fault) and not labels[i]["anomaly"] and flags[i]]
    cfp = collections.Counter(roots[i] or "none" for i in fp)
    out[fault] = dict(anomalous=len(idx), flagged=len(fl), causes=dict(c), top1=top1, fp_causes=dict(cfp))
    print(f"{fault:18s} {len(idx):5d} {len(fl):8d} {named:8d} {top1:6.3f}  {dict(c.most_common())}   (false positives: {dict(cfp.most_common())})")
if len(sys.argv) > 3:
    json.dump(out, open(sys.argv[3], "w"), indent=1)
