"""Hot-path cost: what a hook pays to record, now (the shared-memory ring) vs before issue 23 (a deque
drained by a thread of the engine process) vs an OTel SDK span (issues 2 and 23).

    .venv/bin/python bench/hotpath.py [--rounds 9] [--n 20000]

All in one process, interleaved round by round (paired). Rows:

* one stage (two clock reads + one record): ``Recorder.stage`` now, into a shared-memory ring as the
  engine writes it; before, the old ``Recorder.stage`` (a tuple appended to a deque), loaded from the
  last commit before the rewrite (bench/_baseline.py); and ``tracer.start_span().end()`` through a
  real TracerProvider with a BatchSpanProcessor whose exporter discards;
* one vLLM-sized step (16 requests, 5 stages, 4 engine attributes): ``Recorder.step`` now vs the
  old tuple append. Before, the work did not end there: a thread of the engine process then
  drained, converted and pickled each record (the companion's forwarder) or built its spans (the
  in-process pipeline); bench/engine_cost.py measures that part.

Times are CPU time of this thread (``thread_time_ns``), so other jobs on the machine inflate them
less than wall time would; the ratios are per round, reported as median [min..max].
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from prism_otel.record import Reqs, StepFeatures, clock_ns  # noqa: E402
from prism_otel.recorder import Recorder  # noqa: E402
from prism_otel.ring import Ring  # noqa: E402


class _Discard(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


def _old_record_module():
    """prism_otel/record.py of the revision before the rewrite (stdlib only), under another name."""
    import _baseline

    path = os.path.join(_baseline.tree(), "prism_otel", "record.py")
    spec = importlib.util.spec_from_file_location("_prism_record_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n", type=int, default=20000)
    a = ap.parse_args()
    n = a.n
    old = _old_record_module()
    shm = Ring.create(65536, shared=True)
    rec = Recorder(65536, opener=lambda: shm)
    reader = rec.reader()
    rec_old = old.Recorder(1 << 16)
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(_Discard()))
    tracer = tp.get_tracer("bench")
    t = clock_ns()
    feat = StepFeatures("decode", 16, 0, 16, 1600, 120, 0.1)
    ids = tuple(f"cmpl-{i:032x}-0" for i in range(16))
    reqs = Reqs(ids, (1,) * 16)
    triples = tuple((r, 1, True) for r in ids)
    stages = tuple((s, t, t + 10) for s in ("schedule", "prepare", "forward", "sample", "update"))
    attrs = {"prism.step.timing_source": "runner", "prism.step.overlap": 0, "prism.batch.waiting": 0,
             "prism.step.outputs_ts": 1234.5}
    old_feat = old.StepFeatures("decode", 16, 0, 16, 1600, 120, 0.1)
    tt = time.thread_time_ns
    rows = {k: [] for k in ("stage_new", "stage_old", "sdk", "step_new", "step_old", "stage_queue", "stage_flush")}
    import prism_otel.recorder as recorder_mod
    for _ in range(a.rounds):
        c0 = tt()
        for _ in range(n):
            x = clock_ns()
            y = clock_ns()
            rec.stage(1, "forward", x, y)
        rows["stage_new"].append((tt() - c0) / n)
        reader.read()
        c0 = tt()
        for _ in range(n):
            x = clock_ns()
            y = clock_ns()
            rec_old.stage(1, "forward", x, y)
        rows["stage_old"].append((tt() - c0) / n)
        rec_old.drain(1 << 30)
        # the same record, the queue append alone (the batched write held back), then the write alone
        saved = recorder_mod._BATCH, recorder_mod._BATCH_NS, recorder_mod._QUEUE_MAX
        recorder_mod._BATCH, recorder_mod._BATCH_NS, recorder_mod._QUEUE_MAX = 1 << 30, 1 << 62, 1 << 30
        try:
            c0 = tt()
            for _ in range(n):
                x = clock_ns()
                y = clock_ns()
                rec.stage(1, "forward", x, y)
            rows["stage_queue"].append((tt() - c0) / n)
        finally:
            recorder_mod._BATCH, recorder_mod._BATCH_NS, recorder_mod._QUEUE_MAX = saved
        c0 = tt()
        rec.flush()
        rows["stage_flush"].append((tt() - c0) / n)
        reader.read()
        c0 = tt()
        for _ in range(n):
            tracer.start_span("forward").end()
        rows["sdk"].append((tt() - c0) / n)
        m = n // 4
        c0 = tt()
        for i in range(m):
            rec.step(i, t, t + 1000, feat, reqs, None, stages, attrs)
        rows["step_new"].append((tt() - c0) / m)
        reader.read()
        c0 = tt()
        for i in range(m):
            rec_old.emit((old.STEP, i, t, t + 1000, old_feat, triples, None, stages, attrs))
        rows["step_old"].append((tt() - c0) / m)
        rec_old.drain(1 << 30)
    tp.shutdown()
    shm.unlink()
    med = {k: statistics.median(v) for k, v in rows.items()}

    def ratio(a_, b_) -> str:
        r = [x / y for x, y in zip(rows[a_], rows[b_])]
        return f"{statistics.median(r):.3f} [{min(r):.3f}..{max(r):.3f}]"

    print(f"| operation (CPU ns, median of {a.rounds} paired rounds x {n}; {os.cpu_count()} CPUs) | ns | "
          f"ratio (per round) |")
    print("|---|---|---|")
    print(f"| stage, now: two clock reads + shared-memory ring record | {med['stage_new']:.0f} | "
          f"{ratio('stage_new', 'sdk')} of an SDK span |")
    print(f"| stage, before (8368bb0): two clock reads + deque append | {med['stage_old']:.0f} | "
          f"now/before {ratio('stage_new', 'stage_old')} |")
    print(f"| of now: the hook's queue append alone (two clock reads included) | {med['stage_queue']:.0f} | "
          f"/before {ratio('stage_queue', 'stage_old')} |")
    print(f"| of now: the batched ring write, per record (on the same thread, at a flush) | "
          f"{med['stage_flush']:.0f} | |")
    print(f"| OTel SDK: tracer.start_span().end() | {med['sdk']:.0f} | 1 |")
    print(f"| vLLM-sized step record, now (16 requests, 5 stages, 4 attributes) | {med['step_new']:.0f} | "
          f"now/before {ratio('step_new', 'step_old')} |")
    print(f"| vLLM-sized step record, before: tuple append (its conversion came later, in the engine "
          f"process: bench/engine_cost.py) | {med['step_old']:.0f} | |")


if __name__ == "__main__":
    main()
