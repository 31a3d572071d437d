"""Pipeline-thread cost per step: records -> StepRecord -> spans -> batch processor (issue 2).

    .venv/bin/python bench/pipeline_cost.py [--batch 16] [--steps 2000]

Feeds identical decode-step records (batch of N requests, 3 stages, links both ways) through the
real Pipeline with a BatchSpanProcessor whose exporter discards, and compares against the same
spans started and ended through the SDK tracer (what building spans the usual way costs).
CPU time of the processing thread, median of 5 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, set_span_in_context

from prism_otel import semconv as sc
from prism_otel.pipeline import Pipeline
from prism_otel.record import STEP, StepFeatures, clock_ns
from prism_otel.recorder import Recorder


class _Discard(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


def feed(rec: Recorder, n: int, b: int) -> None:
    reqs = tuple((f"r{i}", 1, True) for i in range(b))
    for k in range(n):
        t = clock_ns()
        rec.emit((STEP, k, t, t + 1000, StepFeatures("decode", b, 0, b, 100 * b, 100, 0.1), reqs, None,
                  (("schedule", t, t + 10), ("forward", t + 10, t + 900), ("update", t + 900, t + 1000))))


def sdk_way(tracer, n: int, b: int, req_ctx) -> None:
    root = Context()
    for k in range(n):
        t = time.time_ns()
        s = tracer.start_span(sc.STEP_SPAN, context=root, start_time=t, links=[Link(c) for c in req_ctx],
                              attributes={sc.STEP_INDEX: k, sc.STEP_PHASE: "decode", sc.BATCH_SIZE: b})
        ctx = set_span_in_context(s, root)
        for name in ("schedule", "forward", "update"):
            tracer.start_span(sc.stage_span_name(name), context=ctx, start_time=t).end(end_time=t + 10)
        s.end(end_time=t + 1000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args()
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=1 << 16))
    rec = Recorder(1 << 17)
    p = Pipeline(rec, tp, "bench", [])
    for i in range(a.batch):
        rec.request(f"r{i}", "arrive", clock_ns(), {"prompt_tokens": 10})
    p.process_pending()
    ctxs = [p._open[f"r{i}"].span.get_span_context() for i in range(a.batch)]
    tracer = tp.get_tracer("bench")
    ours, sdk = [], []
    for _ in range(5):
        feed(rec, a.steps, a.batch)
        t0 = time.thread_time_ns()
        p.process_pending()
        ours.append((time.thread_time_ns() - t0) / a.steps / 1e3)
        t0 = time.thread_time_ns()
        sdk_way(tracer, a.steps, a.batch, ctxs)
        sdk.append((time.thread_time_ns() - t0) / a.steps / 1e3)
    tp.shutdown()
    o, s = statistics.median(ours), statistics.median(sdk)
    print(f"| per step, batch {a.batch}, 3 stages (median of 5 x {a.steps}) | CPU us | ratio |")
    print("|---|---|---|")
    print(f"| prism-otel pipeline: StepRecord + request bookkeeping + 4 finished spans | {o:.1f} | {o / s:.2f} |")
    print(f"| the same 4 spans through the SDK tracer (start_span/end), nothing else | {s:.1f} | 1 |")


if __name__ == "__main__":
    main()
