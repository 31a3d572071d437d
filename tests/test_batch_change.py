"""What changed since the previous step (record.BatchChange), from the request ids of consecutive steps,
and garbage-collection pauses joined to the steps they overlap (StepRecord.signals)."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider

from prism_otel import semconv as sc
from prism_otel.pipeline import ChangeTracker, Pipeline
from prism_otel.record import BatchChange, StepFeatures, clock_ns, to_epoch_ns
from prism_otel.recorder import Recorder
from prism_otel.signals import GcPauses


def test_change_tracker_counts_joins_leaves_and_quiet_steps():
    t = ChangeTracker()
    assert t.change((("a", 10, 0), ("b", 7, 0))) == BatchChange(2, 0, 17, 0, 0)
    assert t.change((("a", 1, 1), ("b", 1, 1))) == BatchChange(0, 0, 0, 2, 1)
    assert t.change((("a", 1, 1), ("b", 1, 1))) == BatchChange(0, 0, 0, 2, 2)
    assert t.change((("b", 1, 1), ("c", 30, 0), ("d", 5, 1))) == BatchChange(2, 1, 35, 2, 0)
    assert t.change(()) == BatchChange(0, 3, 0, 3, 0)


def test_gc_pauses_overlap_only_their_steps():
    g = GcPauses()
    g.add(100, 200, 0)
    g.add(1_000, 1_500, 2)
    assert g.overlap(0, 99) == {}
    assert g.overlap(150, 1_200) == {sc.SIGNAL_GC_MS: round((50 + 200) / 1e6, 4), sc.SIGNAL_GC_COUNT: 2}
    assert g.overlap(1_400, 3_000)[sc.SIGNAL_GC_COUNT] == 1


def test_pipeline_builds_change_and_gc_signal_into_the_step():
    rec = Recorder(1024)
    seen = []
    p = Pipeline(rec, TracerProvider(), "i", on_step=seen.append)
    t = clock_ns()
    feat = StepFeatures("decode", 2, 0, 2, 20, 10)
    rec.step(1, t, t + 5_000_000, feat, (("a", 1, True), ("b", 1, True)))
    rec.gc_pause(t + 6_000_000, t + 7_000_000, 2, 10)
    rec.step(2, t + 5_500_000, t + 9_000_000, feat, (("b", 1, True), ("c", 4, False)))
    p.process_pending()
    assert [s.change for s in seen] == [BatchChange(2, 0, 2, 0, 0), BatchChange(1, 1, 4, 2, 0)]
    assert seen[0].signals == {}
    assert seen[1].signals == {sc.SIGNAL_GC_MS: 1.0, sc.SIGNAL_GC_COUNT: 1}
    assert seen[1].start_ns == to_epoch_ns(t + 5_500_000)
