"""GPU faults against a real engine on a GPU: effect of each injector, and detection scores.

    python bench/gpu_faults.py            # on the GPU machine: one call (see docs/benchmarks.md)
    python bench/gpu_faults.py --smoke    # the same code path on a CPU, tiny model, CPU faults (no numbers)

Runs the library scenario ``gpu-faults-1b`` through ``prism-otel simulate``'s own runner: a ~1.2B
random-weight Llama (prism_eval.tiny_models "1b", bf16) served by transformers continuous batching
on CUDA, under prism-otel (``prism-otel run``), fed by a tidal open-loop workload through the engine
API; after a fault-free warm-up, ``gpu_sm_contention`` (a competing process of bf16 GEMMs on the
same GPU: also the stand-in for locking the GPU clock low, which is not allowed on a shared GPU),
``pcie_saturation`` (pinned host<->device copies both ways) and ``gpu_mem_churn`` (random-size
device allocations written and freed back to the driver), each for a while with normal load around.

Prints two tables: per fault, steps in the window, median step latency in and out, the effect
(latency over same-shape steps outside faults), and per-fault detection scores for prism
(``prism-otel detect`` trained on the warm-up) and the baselines a user would otherwise use
(static p99 threshold, rolling z-score, LatencyPrism's rule); then the root cause per fault
(bench/fault_rootcause.py on the same run: gpu_sm_contention and gpu_mem_churn stand for
device.contention, pcie_saturation for interconnect; NVML evidence needs nvidia-ml-py, else the GPU
signals are "unavailable" and only the device time is evidence). Writes gpu_faults.json, rootcause.json
and the run's steps.csv, labels.csv, train.csv and meta.json to $OUT when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from prism_eval.simulate import scenario  # noqa: E402


def smoke_scenario() -> scenario.Scenario:
    sc = scenario.load("gpu-faults-1b").to_dict()
    sc["engine"] = {"kind": "transformers", "model": "tiny", "threads": 1}
    sc["workload"] = {"arrival": "tidal", "rate": 6, "tide": 0.5, "period_s": 10}
    sc.update(warmup_s=8, duration_s=16, drain_s=20)
    sc["faults"] = [{"fault": "cpu_throttle", "at_s": 3, "for_s": 4},
                    {"fault": "cpu_contention", "at_s": 10, "for_s": 4}]
    return scenario.Scenario.from_dict(sc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, CPU faults: checks the code path only")
    ap.add_argument("--keep", default=None, help="keep the run in this directory")
    a = ap.parse_args()
    if a.smoke:
        sc = smoke_scenario()
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_faults: no CUDA device (use --smoke on a CPU)")
        print(f"# device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
        sc = scenario.load("gpu-faults-1b")
    out = a.keep or os.path.join(tempfile.mkdtemp(prefix="prism-gpu-faults-"), "run")
    t = time.time()
    meta = scenario.run(sc, out, log=lambda m: print(m, flush=True))
    print(f"# run: {time.time() - t:.0f} s, {meta['steps']['scored']} scored steps, versions {meta['versions']}",
          flush=True)
    from simulate_real import score

    scores = score(out)
    dets = ["prism", "static_threshold", "zscore", "latencyprism_rule"]
    head = (f"{'fault':18s} {'steps':>6s} {'p50 in ms':>9s} {'p50 out':>8s} {'effect':>7s} | "
            + " ".join(f"{d[:12]:>12s}" for d in dets) + "   (F1; prism P/R/FPR/lag)")
    lines = [head, "-" * len(head)]
    for fault in [f["fault"] for f in sc.to_dict()["faults"]] + ["all"]:
        e = meta["effects"].get(fault, {})
        f1s = " ".join(f"{scores[d][fault]['f1']:12.3f}" if d in scores and fault in scores[d] else f"{'n/a':>12s}"
                       for d in dets)
        p = scores.get("prism", {}).get(fault)
        extra = f"   {p['precision']:.3f}/{p['recall']:.3f}/{p['fpr']:.4f}/{p['lag_batches']}" if p else ""
        if "ratio" in e:
            lines.append(f"{fault:18s} {e['steps_in']:6d} {e['median_us_in'] / 1e3:9.2f} "
                         f"{e['median_us_out'] / 1e3:8.2f} "
                         f"{e['ratio']:6.2f}x | {f1s}{extra}")
        else:
            lines.append(f"{fault:18s} {'':6s} {'':9s} {'':8s} {'':7s} | {f1s}{extra}")
    lines.append("effect: median step latency over same-shape steps outside the faults; F1 per fault on the steps "
                 "each episode owns (window + half the gaps around it)")
    print("\n".join(lines), flush=True)
    # root cause on the same run (bench/fault_rootcause.py's table): per fault, the cause it stands for,
    # top-1 accuracy on the flagged in-window steps, and what the false positives say
    import subprocess

    rc_json = os.path.join(out, "rootcause.json")
    rc = subprocess.run([sys.executable, os.path.join(HERE, "fault_rootcause.py"), out, "--json", rc_json],
                        capture_output=True, text=True)
    print(rc.stdout, rc.stderr[-2000:], flush=True)
    lines += [""] + rc.stdout.splitlines()
    dest = os.environ.get("OUT")
    if dest:
        with open(os.path.join(dest, "gpu_faults.json"), "w") as f:
            json.dump({"effects": meta["effects"], "recovery": meta["recovery"], "scores": scores,
                       "windows": meta["windows"], "versions": meta["versions"], "machine": meta["machine"],
                       "steps": meta["steps"], "table": lines}, f, indent=1, default=str)
        for n in ("steps.csv", "labels.csv", "train.csv", "meta.json", "rootcause.json"):
            if os.path.exists(os.path.join(out, n)):
                shutil.copy(os.path.join(out, n), dest)


if __name__ == "__main__":
    main()
