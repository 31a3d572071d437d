"""What the root cause says on a run with no fault, split by whether a neighbour was really there.

    python bench/healthy_rootcause.py record --engine transformers --out DIR [--duration 90] [--python PY]
    python bench/healthy_rootcause.py score DIR [DIR ...] [--json OUT.json]

``record`` runs ``prism-otel simulate`` with no fault (the quick form's workload, a 30 s warm-up) and,
beside it, samples every 50 ms how much CPU the machine's *other* processes used: all CPUs' busy time
(``/proc/stat``) minus the CPU time of the simulation's own process tree (engine, its workers, the
companion, the load driver) and this sampler's. That is the ground truth a no-fault run lacks on a
shared machine: whether an uninvited neighbour was on the CPUs during a step. It lands in
``DIR/neighbours.csv``.

``score`` judges the run as ``bench/fault_rootcause.py`` does (prism's detector trained on the warm-up,
steps in order; and the verdicts the pipeline put on the spans while recording, "online") and splits
every flagged step (all false positives: nothing was injected) by the neighbours' CPU over the step
(with 50 ms either side, the sampler's resolution): *quiet* below 0.1 of a core, *busy* at 0.5 or more
(in between: *some*). On quiet steps a resource named is a defect (the target: unknown or workload on
>= 95%); on busy steps ``cpu.contention`` is what happened. Where neighbours never leave (a shared
machine), a second split is relative to the run's own level: *surge* when the neighbours' CPU over the
step is at least 0.3 of a core above its median over all steps of the run, *steady* otherwise.
"""
import argparse
import bisect
import collections
import json
import os
import subprocess
import sys
import time

ROOT = os.environ.get("PRISM_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

HZ = os.sysconf("SC_CLK_TCK")
QUIET, BUSY = 0.1, 0.5  # neighbours' CPU over the step, in cores
SURGE = 0.3  # cores above the run's median level


def _busy_ms() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6]) * 1000.0 / HZ


def _tree(root: int) -> list:
    kids = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids[ppid].append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _cpu_ms(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12])) * 1000.0 / HZ
    except (OSError, ValueError, IndexError):
        return -1.0


def record(a) -> None:
    os.makedirs(a.out, exist_ok=False)
    scen = os.path.join(a.out, "healthy.yaml")
    with open(scen, "w") as f:
        f.write(f"name: healthy-{a.engine}\ndescription: no fault (false-positive honesty of the root cause)\n"
                f"engine: {{kind: {a.engine}, model: small}}\nworkload: {{}}\nwarmup_s: 30\n"
                f"duration_s: {a.duration:g}\nfaults: []\n")
    run = os.path.join(a.out, "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([a.python, "-m", "prism_otel.cli", "simulate", "--scenario", scen, "--out", run],
                         env=env, stdout=open(os.path.join(a.out, "simulate.log"), "w"), stderr=subprocess.STDOUT)
    me = os.getpid()
    seen: dict = {}  # pid -> last cpu ms (processes of the tree, alive or gone)
    tree_ms = 0.0
    rows = []
    tree, t_tree = [p.pid], 0.0
    while p.poll() is None:
        now = time.time()
        if now - t_tree > 1.0:  # the tree changes rarely (the engine's workers start once)
            tree, t_tree = _tree(p.pid), now
        for pid in tree + [me]:
            c = _cpu_ms(pid)
            if c >= 0:
                tree_ms += c - seen.get(pid, c)
                seen[pid] = c
        rows.append((time.time_ns(), _busy_ms(), tree_ms))
        time.sleep(0.05)
    with open(os.path.join(a.out, "neighbours.csv"), "w") as f:
        f.write("t_ns,busy_ms,ours_ms\n")
        for r in rows:
            f.write(f"{r[0]},{r[1]:.1f},{r[2]:.1f}\n")
    print(f"recorded {run} (exit {p.returncode}), {len(rows)} neighbour samples")


def _neighbours(path: str):
    t, other = [], []
    with open(path) as f:
        next(f)
        for ln in f:
            a, b, c = ln.split(",")
            t.append(int(a))
            other.append(float(b) - float(c))
    return t, other


def _cores(t, other, start_ns, end_ns, pad_ns=50_000_000):
    i = max(0, bisect.bisect_right(t, start_ns - pad_ns) - 1)
    j = min(len(t) - 1, bisect.bisect_left(t, end_ns + pad_ns))
    if j <= i:
        return 0.0
    return max(0.0, (other[j] - other[i]) / ((t[j] - t[i]) / 1e6))


def score(a) -> None:
    import fault_rootcause as fr

    from prism_eval.simulate import rcscore

    doc = {}
    print(f"{'run':<22} {'verdicts':<8} {'neighbours':<10} {'flagged':>7} {'honest':>7}  causes")
    for d in a.dirs:
        run = os.path.join(d, "run")
        t, other = _neighbours(os.path.join(d, "neighbours.csv"))
        raw, flags, roots, *_ = fr.offline(run)
        per = {"offline": (flags, roots)}
        if raw and "online_root_cause" in raw[0]:
            per["online"] = ([int(r.get("online_anomaly") or 0) for r in raw],
                             [r.get("online_root_cause") or None for r in raw])
        name = os.path.basename(os.path.normpath(d))
        doc[name] = {}
        for how, (fl, rt) in per.items():
            cls = {k: collections.Counter() for k in ("quiet", "some", "busy", "steady", "surge")}
            cores = [_cores(t, other, int(r["start_ns"]), int(r["start_ns"]) + int(float(r["duration_us"]) * 1000))
                     for r in raw]
            level = sorted(cores)[len(cores) // 2] if cores else 0.0
            for c, f_, root in zip(cores, fl, rt):
                if not f_:
                    continue
                cls["quiet" if c < QUIET else "busy" if c >= BUSY else "some"][root or "none"] += 1
                cls["surge" if c >= level + SURGE else "steady"][root or "none"] += 1
            doc[name][how + "_level"] = level
            doc[name][how] = {}
            for k, cnt in cls.items():
                n = sum(cnt.values())
                hon = sum(cnt[c] for c in rcscore.HONEST) / n if n else None
                doc[name][how][k] = {"flagged": n, "honest": hon, "causes": dict(cnt.most_common())}
                hs = "-" if hon is None else f"{hon:.2f}"
                causes = ", ".join(f"{c} {v}" for c, v in cnt.most_common(4))
                print(f"{name:<22} {how:<8} {k:<10} {n:>7} {hs:>7}  {causes}")
    if a.json:
        json.dump(doc, open(a.json, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    r.add_argument("--out", required=True)
    r.add_argument("--duration", type=float, default=90.0)
    r.add_argument("--python", default=sys.executable, help="the interpreter whose environment has the engine")
    s = sub.add_parser("score")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--json")
    a = ap.parse_args()
    record(a) if a.cmd == "record" else score(a)


if __name__ == "__main__":
    main()
