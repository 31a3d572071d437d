"""``prism-otel detect`` and ``prism-otel eval``: the in-process detector, offline.

``detect`` runs :class:`processors.anomaly.AnomalyProcessor` over a ``steps.csv`` in row order,
online as it would run live (each step judged before the next is seen; refits happen at the same
points of the stream, inline so results are reproducible). ``--train`` first fits a baseline on
known-normal steps, so the first rows are judged. The output repeats every input row, in order,
and adds ``expected_us,score,anomaly,test`` (``test``: on an anomalous row, the test that flagged it:
``point``, ``window`` or ``shift``); rows that cannot be judged (unreadable, NaN, negative, a
clock that went backwards, warm-up before a model exists) get empty ``expected_us``/``score`` and
``anomaly`` 0, and are counted on stderr.

``eval`` scores prism and the baselines a user would otherwise reach for: first, the headline, on the
real-data corpus with held-out workloads (:mod:`prism_eval.simulate.holdout`, the corpora recorded with
``prism-otel corpus``), then on the synthetic suite (:mod:`prism_eval.simulate.suite`), and on real
fault runs with ``--runs DIR``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

OUT_COLUMNS = ("expected_us", "score", "anomaly", "test")


def register(sub) -> None:
    d = sub.add_parser("detect", help="judge a steps.csv with the prism detector (offline, online order)",
                       description="Judge every step of STEPS.csv in order with the in-process detector.")
    d.add_argument("--input", required=True, metavar="STEPS.csv")
    d.add_argument("--output", required=True, metavar="VERDICTS.csv")
    d.add_argument("--train", metavar="NORMAL.csv", help="fit a baseline on these normal steps first")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="detector config override (see processors/README.md); repeatable")
    e = sub.add_parser("eval", help="score prism and baseline detectors on the labelled suite",
                       description="Precision, recall, F1, FPR and lag of each detector on labelled streams.")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--size", choices=("full", "small"), default="full", help="synthetic suite size (default full)")
    e.add_argument("--seed", type=int, default=None, help="suite seed (default: the fixed published one)")
    e.add_argument("--runs", metavar="DIR", help="also score real runs: DIR/**/steps.csv + labels.csv [+ train.csv]")
    e.add_argument("--no-synthetic", action="store_true", help="score only the --runs streams")
    e.add_argument("--detectors", default=None, help="comma list (default: prism and every baseline)")
    e.add_argument("--corpus", metavar="DIR", default=None,
                   help="recorded corpora (default: the shipped ones; `prism-otel corpus list`)")
    e.add_argument("--no-corpus", action="store_true", help="skip the real-data corpus")
    e.add_argument("--only-corpus", metavar="NAME", default=None, help="score only this corpus (comma list); `faults`: only the recorded fault runs")
    e.add_argument("--quick", action="store_true",
                   help="the quick held-out check: one corpus per engine and machine, flat windows, prism and "
                        "gbdt_median3 (what the test suite holds to docs/benchmarks.md)")


def dispatch(args) -> Optional[int]:
    if args.cmd == "detect":
        return detect(args.input, args.output, args.train, args.set)
    if args.cmd == "eval":
        return eval_command(args)
    return None


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise ValueError(f"--set {p!r}: expected KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


def detect(input_path: str, output_path: str, train_path: Optional[str] = None, sets: Sequence[str] = ()) -> int:
    from prism_eval.simulate import stepcsv
    from processors.anomaly import AnomalyProcessor

    try:
        cfg = {"background": False, "alert_file": "none", "alert_log": False}
        cfg.update(_overrides(list(sets)))
        proc = AnomalyProcessor(cfg)
        header, raw, steps, bad = stepcsv.read(input_path)
        trained = {}
        if train_path:
            _, _, tsteps, tbad = stepcsv.read(train_path)
            trained = proc.train([s for s in tsteps if s is not None])
            if not trained:
                print(f"prism-otel detect: {train_path}: too few normal steps to fit a baseline; "
                      "judging online from scratch", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"prism-otel detect: {exc}", file=sys.stderr)
        return 2
    replaced = [c for c in OUT_COLUMNS if c in header]
    cols = [c for c in header if c not in OUT_COLUMNS] + list(OUT_COLUMNS)
    judged = flagged = 0
    with open(output_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row, step in zip(raw, steps):
            exp = score = test = ""
            anom = 0
            if step is not None:
                v = proc.process(step).verdict
                if v is not None and v.expected_ms is not None:
                    judged += 1
                    exp = f"{v.expected_ms * 1000.0:.3f}"
                    score = f"{v.score:.4f}"
                    anom = int(v.anomaly)
                    test = v.test or ""
                    flagged += anom
            out: dict[str, Any] = dict(row)
            out.update(expected_us=exp, score=score, anomaly=anom, test=test)
            w.writerow([out.get(c, "") for c in cols])
    proc.shutdown()
    for reason, n in proc.bad.items():
        bad[reason] = bad.get(reason, 0) + n
    msg = f"prism-otel detect: {len(raw)} rows, {judged} judged, {flagged} anomalous"
    if trained:
        seen = proc.train_seen
        msg += ", baseline from " + ", ".join(
            f"{seen.get(ph, n)} {ph}" + (f" ({n} most recent fitted)" if seen.get(ph, n) != n else "")
            for ph, n in sorted(trained.items())) + " normal steps"
    if bad:
        msg += "; skipped " + ", ".join(f"{n} {r}" for r, n in sorted(bad.items()))
    if replaced:
        msg += f"; input columns {', '.join(replaced)} replaced"
    print(msg, file=sys.stderr)
    return 0


def eval_command(args) -> int:
    from prism_eval.simulate import corpus, faultruns, holdout, suite

    dets = [d.strip() for d in args.detectors.split(",")] if args.detectors else None
    headline = None
    if args.quick:
        try:
            found = corpus.available(args.corpus)
            if args.only_corpus:
                found = {n: p for n, p in found.items() if n in args.only_corpus.split(",")}
            found = holdout.quick_corpora(found)
            if not found:
                raise ValueError(f"no recorded corpus under {args.corpus or corpus.DATA_DIR}")
            res = holdout.evaluate(found, dets or ["prism", "gbdt_median3"], shapes=("flat",))
        except (OSError, ValueError) as exc:
            print(f"prism-otel eval: {exc}", file=sys.stderr)
            return 2
        _emit(args, {"corpus": res})
        return 0
    if not args.no_corpus and not (args.no_synthetic and args.runs):  # --no-synthetic --runs: those alone
        try:
            found = corpus.available(args.corpus)
            want = [n.strip() for n in args.only_corpus.split(",")] if args.only_corpus else None
            if want:
                found = {n: p for n, p in found.items() if n in want}
            runs = faultruns.available(os.path.join(args.corpus, "faults") if args.corpus else None)
            if want == ["faults"]:
                if not runs:
                    raise ValueError("no recorded fault runs (`prism-otel corpus build faults` records them)")
                headline = {"engines": {}, "overall": {}, "faults": faultruns.evaluate(runs, dets)}
            else:
                if not found:
                    raise ValueError(f"no recorded corpus under {args.corpus or corpus.DATA_DIR} "
                                     "(`prism-otel corpus build NAME` records one; --no-corpus skips it)")
                headline = holdout.evaluate(found, dets)
                if runs and (not want or "faults" in want):
                    headline["faults"] = faultruns.evaluate(runs, dets)
        except (OSError, ValueError) as exc:
            print(f"prism-otel eval: {exc}", file=sys.stderr)
            return 2
        if args.no_synthetic and not args.runs:
            _emit(args, {"corpus": headline})
            return 0
    try:
        streams = []
        if not args.no_synthetic:
            streams += suite.suite(args.size, suite.DEFAULT_SEED if args.seed is None else args.seed)
        if args.runs:
            streams += suite.load_runs(args.runs)
        if not streams:
            raise ValueError("nothing to score (--no-synthetic without --runs, or no runs found)")
        result = suite.run(streams, dets)
    except (OSError, ValueError) as exc:
        print(f"prism-otel eval: {exc}", file=sys.stderr)
        return 2
    _emit(args, {"corpus": headline, "suite": result})
    return 0


def _emit(args, doc: dict) -> None:
    from prism_eval.simulate import faultruns, holdout, suite

    if args.json:
        json.dump({k: v for k, v in doc.items() if v is not None}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if doc.get("corpus") is not None:
        print(holdout.render(doc["corpus"]))
        if doc["corpus"].get("faults"):
            print()
            print(faultruns.render(doc["corpus"]["faults"]))
    if doc.get("suite") is not None:
        if doc.get("corpus") is not None:
            print()
        print("synthetic suite and --runs streams (a world we built: a unit test, not a claim)")
        print(suite.render(doc["suite"]))


def main(argv: Optional[list[str]] = None) -> int:  # python -m prism_eval.detect_cli
    parser = argparse.ArgumentParser(prog="prism-otel")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register(sub)
    return dispatch(parser.parse_args(argv)) or 0


if __name__ == "__main__":
    sys.exit(main())
