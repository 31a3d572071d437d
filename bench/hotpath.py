"""Hot-path cost of recording one stage vs starting and ending an OTel SDK span (issue 2).

    .venv/bin/python bench/hotpath.py

Both sides run in the same process, interleaved, 9 rounds; the SDK span goes through a real
TracerProvider with a BatchSpanProcessor whose exporter discards (what a user would otherwise
write: `with tracer.start_as_current_span(...)` around the stage). Prints medians and the ratio.
"""

from __future__ import annotations

import statistics
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from prism_otel.record import Recorder, clock_ns


class _Discard(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


def main() -> None:
    n = 20000
    rec = Recorder(1 << 16)
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(_Discard()))
    tracer = tp.get_tracer("bench")
    ours, sdk, ctxmgr = [], [], []
    for _ in range(9):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            a = clock_ns()
            b = clock_ns()
            rec.stage(1, "forward", a, b)
        ours.append((time.perf_counter_ns() - t0) / n)
        rec.drain(1 << 30)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            tracer.start_span("forward").end()
        sdk.append((time.perf_counter_ns() - t0) / n)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            with tracer.start_as_current_span("forward"):
                pass
        ctxmgr.append((time.perf_counter_ns() - t0) / n)
    tp.shutdown()
    o, s, c = statistics.median(ours), statistics.median(sdk), statistics.median(ctxmgr)
    print("| operation (median of 9 rounds x 20000) | ns per stage | ratio to SDK span |")
    print("|---|---|---|")
    print(f"| prism-otel: two clock reads + ring append | {o:.0f} | {o / s:.4f} |")
    print(f"| OTel SDK: tracer.start_span().end() | {s:.0f} | 1 |")
    print(f"| OTel SDK: with start_as_current_span() | {c:.0f} | {c / s:.2f} |")
    print(f"\nratio (target <= 0.05): {o / s:.4f}; spread ours {min(ours):.0f}..{max(ours):.0f} ns, "
          f"SDK {min(sdk):.0f}..{max(sdk):.0f} ns")


if __name__ == "__main__":
    main()
