"""``prism-otel corpus``: record the real-data corpus the detector is judged on (docs/detection.md).

    prism-otel corpus list                          # the corpora, and which are recorded
    prism-otel corpus build NAME [--out DIR] [--segment-s S]
    prism-otel corpus build all                     # every one, into the shipped location (make corpus)
    prism-otel corpus build faults[:ENGINE[:FAULT]]  # the real-fault runs (prism_eval.simulate.faultruns)
"""

from __future__ import annotations

import os
import shutil
import sys


def register(sub) -> None:
    p = sub.add_parser("corpus", help="record real-engine step streams for the detector's evaluation",
                       description="Record a corpus: a real engine under prism-otel through a grid of workload "
                       "configurations (no faults), written as steps.csv.gz + segments.jsonl + meta.json.")
    p.add_argument("action", choices=("list", "build"))
    p.add_argument("name", nargs="?", help="a corpus name (see `list`), or `all`")
    p.add_argument("--out", help="output directory (default: the shipped corpus_data/NAME)")
    p.add_argument("--segment-s", type=float, default=10.0, help="seconds per workload configuration (10)")


def dispatch(args):
    if getattr(args, "cmd", None) != "corpus":
        return None
    from prism_eval.simulate import corpus as cp
    from prism_eval.simulate import faultruns as fr

    if args.action == "list":
        have = cp.available()
        for name, (kind, size, _) in cp.CORPORA.items():
            print(f"{name:28s} {kind:20s} {size:6s} {'recorded' if name in have else '-'}")
        have = fr.available()
        for e in fr.ENGINES:
            for f in fr.FAULTS:
                print(f"faults:{e}:{f:20s} {'recorded' if f'{e}-{f}' in have else '-'}")
        return 0
    if args.name and args.name.startswith("faults"):
        return _faults(args.name, fr)
    names = [n for n in cp.CORPORA if cp.recordable_here(n)] if args.name == "all" else [args.name]
    if not args.name or any(n not in cp.CORPORA for n in names):
        print(f"prism-otel corpus: give a name ({', '.join(cp.CORPORA)}) or all", file=sys.stderr)
        return 2
    if args.out and len(names) > 1:
        print("prism-otel corpus: --out takes one corpus", file=sys.stderr)
        return 2
    for name in names:
        final = args.out or os.path.join(cp.DATA_DIR, name)
        work = final + ".recording"
        shutil.rmtree(work, ignore_errors=True)
        try:
            meta = cp.build(name, work, args.segment_s, log=lambda m: print(m, file=sys.stderr, flush=True))
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"prism-otel corpus: {name}: {exc}", file=sys.stderr)
            return 1
        os.makedirs(final, exist_ok=True)
        for f in ("steps.csv.gz", "segments.jsonl", "meta.json"):
            shutil.copy(os.path.join(work, f), os.path.join(final, f))
        shutil.rmtree(work, ignore_errors=True)
        print(f"corpus {name}: {meta['steps']} steps in {meta['segments']} configurations -> {final}")
    return 0


def _faults(spec: str, fr) -> int:
    parts = spec.split(":")
    engines = [parts[1]] if len(parts) > 1 else list(fr.ENGINES)
    faults = [parts[2]] if len(parts) > 2 else list(fr.FAULTS)
    if any(e not in fr.ENGINES for e in engines) or any(f not in fr.FAULTS for f in faults):
        print(f"prism-otel corpus: faults[:ENGINE[:FAULT]] with ENGINE in {fr.ENGINES}, FAULT in {fr.FAULTS}",
              file=sys.stderr)
        return 2
    for e in engines:
        for f in faults:
            out = os.path.join(fr.FAULT_DIR, f"{e}-{f}")
            try:
                meta = fr.record(e, f, out, log=lambda m: print(m, file=sys.stderr, flush=True))
            except Exception as exc:  # noqa: BLE001 - one failed run does not stop the others
                print(f"prism-otel corpus: faults {e} {f}: {exc!r}", file=sys.stderr)
                continue
            eff = meta["effects"].get(f, {}).get("ratio")
            print(f"faults {e} {f}: effect {eff}x, {meta['steps']['scored']} steps -> {out}")
    return 0
