"""What incidents and metrics add per step, on the pipeline thread (the companion's, or the engine's
in-process), against what that thread already spends per step building the step's spans.

For 20,000 synthetic decode steps with stages and verdicts (2% anomalous), thread CPU time per step of:
  * span materialisation (SpanMaterializer.step into an SDK provider with a no-op exporter): the
    existing per-step cost, the alternative this is compared with;
  * IncidentProcessor.process (no sinks: the rules alone);
  * StepMetrics.process with an SDK MeterProvider and an in-memory reader (the OTLP and Prometheus
    readers cost the same per update; they collect on their own schedule);
reported as the median of 5 runs with min-max, and as a share of the step time at 3 ms a step.

    python bench/reporting_cost.py
"""

import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N = 20000


def steps():
    from prism_otel.record import StepRecord, Verdict

    rng = random.Random(0)
    t = 10**18
    out = []
    for i in range(N):
        d = int(3e6 * rng.uniform(0.8, 1.3))
        a = rng.random() < 0.02
        out.append(StepRecord(instance="h:1", index=i, start_ns=t, end_ns=t + d, phase="decode", batch_size=8,
                              prefill_tokens=0, decode_tokens=8, context_tokens=800 + i % 500,
                              stages={"schedule": (t, t + 300_000), "forward": (t + 300_000, t + d - 200_000),
                                      "update": (t + d - 200_000, t + d)},
                              verdict=Verdict(expected_ms=3.0, score=1.2 if a else 0.2, anomaly=a,
                                              root_cause="stage.update" if a else None)))
        t += d + 100_000
    return out


def cpu_per_step(fn, data) -> float:
    t0 = time.thread_time_ns()
    for s in data:
        fn(s)
    return (time.thread_time_ns() - t0) / len(data) / 1e3


def main() -> int:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from prism_otel.metrics import StepMetrics
    from prism_otel.spans import SpanMaterializer
    from processors.incidents import IncidentProcessor

    class Null(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    data = steps()
    res = {"spans (existing)": [], "incidents": [], "metrics": []}
    for _ in range(5):
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(Null()))
        mat = SpanMaterializer(tp)
        res["spans (existing)"].append(cpu_per_step(lambda s: mat.step(s), data))
        inc = IncidentProcessor({}, sinks=[])
        res["incidents"].append(cpu_per_step(inc.process, data))
        m = StepMetrics(MeterProvider(metric_readers=[InMemoryMetricReader()]), provider_name="bench")
        res["metrics"].append(cpu_per_step(m.process, data))
    print("per-step CPU on the pipeline thread (thread_time), 20,000 decode steps, median of 5 (min-max);")
    print("machine shared with other helpers' test runs while measured")
    print(f"{'what':<20}{'us/step':>10}{'min-max':>16}{'% of a 3 ms step':>18}{'x spans':>10}")
    base = statistics.median(res["spans (existing)"])
    for k, v in res.items():
        med = statistics.median(v)
        print(f"{k:<20}{med:>10.1f}{f'{min(v):.1f}-{max(v):.1f}':>16}{100 * med / 3000:>17.2f}%{med / base:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
