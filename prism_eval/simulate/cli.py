"""``prism-otel simulate``: run a real engine under prism-otel, inject labelled faults, write the stream.

    prism-otel simulate --list                      # the faults, one line each on what they stand for
    prism-otel simulate --scenarios                 # the scenario library
    prism-otel simulate --scenario NAME|FILE --out DIR
    prism-otel simulate --engine transformers|transformers_serve|vllm --model DIR|SIZE \\
        --fault NAME --duration SECONDS --out DIR [--warmup S] [--set KEY=VALUE ...] [--rate R]

Exit codes: 0 done; 1 the run failed (engine error, no steps); 2 bad input (unknown fault or
parameter, bad scenario file, output directory not empty); 3 a fault refused its target.
"""

from __future__ import annotations

import json
import os
import sys

RC_OK, RC_FAILED, RC_BAD_INPUT, RC_REFUSED = 0, 1, 2, 3


def register(sub) -> None:
    p = sub.add_parser("simulate", help="inject labelled faults into a real engine running under prism-otel",
                       description="Run an engine under prism-otel with an open-loop workload, inject faults on a "
                       "schedule, and write the labelled step stream (steps.csv, labels.csv, train.csv, raw OTLP "
                       "JSON, meta.json with each injector's measured effect).")
    p.add_argument("--list", action="store_true", help="list the faults and what real failure each stands for")
    p.add_argument("--scenarios", action="store_true", help="list the scenario library")
    p.add_argument("--scenario", help="a scenario YAML file, or the name of one in the library")
    p.add_argument("--engine", choices=("transformers", "transformers_serve", "vllm"), help="quick form: the engine")
    p.add_argument("--model", default="small", help="model directory, or a tiny-model size (tiny, small, 1b)")
    p.add_argument("--fault", help="quick form: the fault to inject (two episodes; one if --duration < 30)")
    p.add_argument("--duration", type=float, default=60.0, help="quick form: seconds of the scored part")
    p.add_argument("--warmup", type=float, default=30.0, help="quick form: fault-free seconds before it")
    p.add_argument("--rate", type=float, default=None, help="quick form: mean requests per second")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="quick form: a fault parameter (repeatable; see --list)")
    p.add_argument("--out", help="output directory (must not exist, or be empty)")
    p.add_argument("--json", action="store_true", help="print meta.json's summary as JSON")


def _list() -> int:
    from prism_eval.simulate.catalog import all_faults

    for name, cls in all_faults().items():
        params = ", ".join(f"{k}={v}" for k, v in cls.defaults.items())
        gpu = " [GPU]" if cls.gpu else ""
        print(f"{name:18s}{gpu} {cls.summary}  (root cause: {cls.cause_for()}; params: {params})")
    return RC_OK


def _parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _summary(meta: dict, out: str) -> str:
    lines = [f"simulate: {meta['scenario']['name']}: {meta['steps']['scored']} scored steps "
             f"({meta['steps']['anomalous']} in fault windows), {meta['steps']['train']} warm-up steps -> {out}"]
    lines.append(f"  {'fault':18s} {'steps in':>8s} {'p50 in ms':>10s} {'p50 out ms':>10s} {'raw x':>7s} "
                 f"{'effect x':>8s}")
    for name, e in meta["effects"].items():
        if "ratio" not in e:
            lines.append(f"  {name:18s} {e['steps_in']:8d}  (not enough steps to measure)")
            continue
        lines.append(f"  {name:18s} {e['steps_in']:8d} {e['median_us_in'] / 1e3:10.2f} "
                     f"{e['median_us_out'] / 1e3:10.2f} "
                     f"{e['raw_ratio']:7.2f} {e['ratio']:8.2f}")
    lines.append("  effect x: median step latency over what steps of the same shape cost outside the faults")
    return "\n".join(lines)


def dispatch(args):
    if getattr(args, "cmd", None) != "simulate":
        return None
    from prism_eval.simulate import scenario
    from prism_eval.simulate.catalog import all_faults
    from prism_eval.simulate.faults import Refused

    if args.list:
        return _list()
    if args.scenarios:
        for n in scenario.library():
            sc = scenario.load(n)
            print(f"{n:28s} {sc.engine['kind']:18s} {sc.description}")
        return RC_OK
    try:
        if args.scenario:
            sc = scenario.load(args.scenario)
        elif args.fault and args.engine:
            if args.fault not in all_faults():
                raise ValueError(f"unknown fault {args.fault!r}; `prism-otel simulate --list` shows them")
            params = {}
            for item in args.set:
                k, sep, v = item.partition("=")
                if not sep:
                    raise ValueError(f"--set {item!r}: expected KEY=VALUE")
                params[k] = _parse_value(v)
            sc = scenario.quick(args.engine, args.model, args.fault, args.duration, args.warmup, params, args.rate)
        else:
            raise ValueError("give --scenario, or --engine with --fault (or --list / --scenarios)")
        if not args.out:
            raise ValueError("--out DIR is required")
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ValueError(f"--out {args.out}: exists and is not an empty directory")
    except (ValueError, FileNotFoundError) as exc:
        print(f"prism-otel simulate: {exc}", file=sys.stderr)
        return RC_BAD_INPUT
    try:
        meta = scenario.run(sc, args.out, log=scenario.main_log)
    except Refused as exc:
        print(f"prism-otel simulate: refused: {exc}", file=sys.stderr)
        return RC_REFUSED
    except (RuntimeError, TimeoutError, FileNotFoundError, OSError) as exc:
        print(f"prism-otel simulate: {exc}", file=sys.stderr)
        return RC_FAILED
    if args.json:
        print(json.dumps({k: meta[k] for k in ("steps", "effects", "recovery", "windows")}, indent=1, default=str))
    else:
        print(_summary(meta, args.out))
    return RC_OK
