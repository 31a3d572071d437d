"""The real-data corpus: step streams recorded by prism-otel from real engines on this machine.

Each corpus is one engine (transformers continuous batching in-process, ``transformers serve``, the vLLM
CPU server) and one model size, run under ``prism-otel run`` through a grid of workload configurations
in a row (:mod:`prism_eval.simulate.segments`): concurrency 1, 4, 16 and 64 crossed with four mixes of
prompt and output lengths, each held once closed-loop and once with tidal open-loop arrivals. No fault
is injected while recording: every step is normal, the natural hiccups included.

On disk (``<dir>/<engine>-<size>/``): ``steps.csv.gz`` (the ``prism-otel detect`` columns, stage
durations, ``workload``: the configuration the step belongs to, and what changed since the previous
step as the hooks knew it, where they did: ``stepcsv.CHANGE_COLUMNS``), ``segments.jsonl`` (each
configuration's wall-clock bounds, requests, throughput) and ``meta.json`` (versions, machine, grid).
``prism-otel corpus build`` records one; ``make corpus`` records every one shipped in
``prism_eval/simulate/corpus_data`` (docs/detection.md).

The evaluation protocol is :mod:`prism_eval.simulate.holdout`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import time
from typing import Optional

from prism_eval.simulate import dataset
from prism_eval.simulate.segments import Segment
from prism_eval.simulate.stepcsv import CHANGE_COLUMNS
from prism_eval.simulate.workload import Lengths

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_data")
CONCURRENCY = (1, 4, 16, 64)
MIXES = {
    "short": (Lengths(median=24, sigma=0.5, min=4, max=200), Lengths(median=16, sigma=0.5, min=2, max=64)),
    "longprompt": (Lengths(median=256, sigma=0.4, min=64, max=400), Lengths(median=16, sigma=0.5, min=2, max=64)),
    "longout": (Lengths(median=24, sigma=0.5, min=4, max=200), Lengths(median=96, sigma=0.4, min=24, max=160)),
    "mixed": (Lengths(median=64, sigma=0.9, min=4, max=400), Lengths(median=32, sigma=0.9, min=2, max=160)),
}
# what each recorded corpus is: (engine kind, model size, engine options). Two options shape the machine
# the engine runs on, not the engine: ``cpus`` pins the engine (and every process it starts) to those
# cores; ``neighbour_cpus`` keeps a busy process on each of those cores for the whole recording.
CORPORA = {
    "transformers-tiny": ("transformers", "tiny", {"threads": 1}),
    "transformers-small": ("transformers", "small", {"threads": 1}),
    "transformers_serve-small": ("transformers_serve", "small", {"threads": 1}),
    "vllm-small": ("vllm", "small", {"threads": 1, "max_num_seqs": 64}),
    # the same engine and model as transformers-small on another machine load: a neighbour keeps one of the
    # two cores busy (one machine's noise must not be the whole training signal)
    "transformers-small-neighbour": ("transformers", "small", {"threads": 1, "neighbour_cpus": [1]}),
    # recorded on a lent GPU machine (bench/device/gpu_corpus.sh): a ~1.2 B random-weight Llama in bf16
    "transformers-gpu-1b": ("transformers", "1b", {"threads": 2, "device": "cuda", "dtype": "bfloat16",
                                                   "cb": {"num_blocks": 4096, "page_size": 32,
                                                          "max_batch_tokens": 1024}}),
    # the same with CUDA graphs (transformers >= 5.17 on CUDA): the step's host work replayed as one graph,
    # so steps are bound by the device rather than by Python launching kernels
    "transformers-gpu-1b-graphs": ("transformers", "1b", {"threads": 2, "device": "cuda", "dtype": "bfloat16",
                                                          "cb": {"num_blocks": 4096, "page_size": 32,
                                                                 "max_batch_tokens": 1024, "use_cuda_graph": True}}),
}
LOAD_OPTIONS = ("cpus", "neighbour_cpus")


def recordable_here(name: str) -> bool:
    """Whether this machine can record corpus ``name``: a GPU corpus needs a lent GPU machine
    (bench/device/gpu_corpus.sh); until one is recorded it is simply not shipped."""
    device = CORPORA[name][2].get("device", "cpu")
    if device == "cpu":
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def grid(segment_s: float = 10.0, seed: int = 0) -> list[Segment]:
    """The workload configurations of a corpus, in the order they run: every (concurrency, mix) pair, in
    a fixed shuffled order, closed-loop then tidal at 70% of the closed loop's throughput."""
    import random

    pairs = [(c, m) for c in CONCURRENCY for m in MIXES]
    random.Random(seed).shuffle(pairs)
    out = []
    for i, (c, m) in enumerate(pairs):
        p, o = MIXES[m]
        base = f"c{c}-{m}"
        out.append(Segment(f"{base}-closed", "closed", c, p, o, segment_s, seed=seed * 100 + 2 * i + 1))
        out.append(Segment(f"{base}-tidal", "tidal", c, p, o, segment_s, seed=seed * 100 + 2 * i + 2))
    return out


def machine_kind(meta: dict) -> str:
    """``gpu`` when a corpus's meta.json says it was recorded on an accelerator (a ``device`` or ``gpu``
    entry, a CUDA torch), else ``cpu``."""
    mach = meta.get("machine") or {}
    vers = meta.get("versions") or {}
    if meta.get("device") or mach.get("gpu") or mach.get("device") or meta.get("options", {}).get("device") in (
            "cuda", "gpu") or "cu" in str(vers.get("torch", "")).split("+")[-1]:
        return "gpu"
    return "cpu"


def group_of(workload: str) -> str:
    """The (concurrency, mix) pair of a configuration name: both arrival modes of a pair are held out
    together, so a held-out pair is new in every respect but its engine."""
    return workload.rsplit("-", 1)[0]


def build(name: str, out_dir: str, segment_s: float = 10.0, log=print) -> dict:
    """Record corpus ``name`` (a key of :data:`CORPORA`) into ``out_dir``; returns its meta document."""
    from prism_eval.simulate.engines import ENGINES
    from prism_eval.simulate.scenario import _machine, _resolve_model, _versions

    kind, size, options = CORPORA[name]
    os.makedirs(os.path.join(out_dir, "otlp"), exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    segs = grid(segment_s)
    eng = ENGINES[kind](_resolve_model(size, options.get("dtype")), out_dir,
                        {k: v for k, v in options.items() if k not in LOAD_OPTIONS})
    log(f"corpus {name}: {len(segs)} workload configurations x {segment_s:g} s on {kind} ({size})")
    t0 = time.time()
    mine = os.sched_getaffinity(0)
    neighbours = [_busy(c) for c in options.get("neighbour_cpus", ())]
    load0 = os.getloadavg()
    try:
        if options.get("cpus"):
            os.sched_setaffinity(0, set(options["cpus"]))  # the engine and its children inherit it
        eng.start_segments([s.to_dict() for s in segs])
        os.sched_setaffinity(0, mine)
        eng.wait_ready()
        eng.finish(timeout=len(segs) * (segment_s + 120))
    finally:
        os.sched_setaffinity(0, mine)
        eng.close()
        for p in neighbours:
            p.kill()
            p.wait()
    seg_path = os.path.join(out_dir, "segments.jsonl")
    records = [json.loads(ln) for ln in open(seg_path)] if os.path.exists(seg_path) else []
    if len(records) != len(segs):
        raise RuntimeError(f"corpus {name}: {len(records)} of {len(segs)} segments ran (see {out_dir}/engine.log)")
    rows = dataset.steps_from_spans(dataset.read_spans(dataset.otlp_files(os.path.join(out_dir, "otlp"))))
    rows = assign(rows, records)
    write_steps(os.path.join(out_dir, "steps.csv.gz"), rows)
    meta = {"name": name, "engine": kind, "model": size, "options": options, "segment_s": segment_s,
            "segments": len(records), "steps": len(rows), "seconds": round(time.time() - t0, 1),
            "versions": _versions(kind), "machine": dict(_machine(), loadavg_before=list(load0))}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _busy(cpu: int):
    """A neighbour: a process that keeps core ``cpu`` busy until it is killed."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))


def assign(rows: list[dict], records: list[dict]) -> list[dict]:
    """Each step gets the configuration whose bounds hold its start (steps outside every segment, the
    engine's warm-up, are dropped)."""
    out = []
    j = 0
    recs = sorted(records, key=lambda r: r["t_start_ns"])
    for r in sorted(rows, key=lambda r: r["start_ns"]):
        while j < len(recs) and r["start_ns"] > recs[j]["t_end_ns"]:
            j += 1
        if j < len(recs) and recs[j]["t_start_ns"] <= r["start_ns"] <= recs[j]["t_end_ns"]:
            out.append(dict(r, workload=recs[j]["name"]))
    return out


_KEEP = dataset.STEP_COLUMNS + ("workload",) + CHANGE_COLUMNS


def write_steps(path: str, rows: list[dict]) -> None:
    stage_cols = sorted({k for r in rows for k in r if k.startswith("stage_")})
    cols = list(_KEEP) + stage_cols
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same steps give the same bytes
        f.write(buf.getvalue().encode())


def read_steps(path: str) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def available(directory: Optional[str] = None) -> dict[str, str]:
    """Recorded corpora under ``directory`` (default: the shipped ones): name -> path."""
    d = directory or DATA_DIR
    if not os.path.isdir(d):
        return {}
    return {n: os.path.join(d, n) for n in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, n, "steps.csv.gz"))}
