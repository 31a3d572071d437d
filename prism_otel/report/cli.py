"""``prism-otel report DIR|FILE... [-o report.html]``."""

from __future__ import annotations

import sys
from typing import Optional


def register(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report (plots, incidents) of what prism-otel wrote",
                       description="Build one HTML page (it opens offline) from prism-out/ or OTLP/JSON span files: "
                                   "step latency against expected per phase with incidents shaded, stage shares, "
                                   "the incident table, TTFT/TPOT percentiles and throughput, the detector's state.")
    p.add_argument("inputs", nargs="+", metavar="DIR|FILE", help="prism-out/ (or any directory of *.jsonl), or files")
    p.add_argument("-o", "--output", default="prism-report.html", metavar="REPORT.html")


def dispatch(args) -> Optional[int]:
    if args.cmd != "report":
        return None
    from prism_otel.report import NoData, write_report

    try:
        data = write_report(args.inputs, args.output)
    except (OSError, NoData) as exc:
        print(f"prism-otel report: {exc}", file=sys.stderr)
        return 2
    judged = sum(p["judged"] for p in data["phases"].values())
    print(f"prism-otel report: {args.output}: {data['steps']} steps ({judged} judged), {data['requests']} requests, "
          f"{len(data['incidents'])} incidents"
          + (f"; {data['skipped_n']} unreadable lines skipped" if data["skipped_n"] else ""))
    return 0
