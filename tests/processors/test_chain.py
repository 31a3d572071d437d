"""The one processor chain: its rule for None and for errors, and that the in-process pipeline and the
collector's assembler both run it (a step taken out: no span in-process; in the collector, the span
is still forwarded, tagged with the verdict the step had when it left)."""

from __future__ import annotations

from prism_otel.pipeline import Pipeline, replace_verdict
from prism_otel.record import RequestRecord
from processors.assembler import StepAssembler
from processors.base import Processor, StepProcessor
from processors.chain import ProcessorChain
from tests.collector.spans_util import make_step, render, to_request


class Flag(StepProcessor):
    name = "flag"

    def __init__(self):
        self.seen = []

    def process(self, step):
        self.seen.append(step.index)
        return replace_verdict(step, anomaly=True, score=2.0)


class TakeOdd(StepProcessor):
    """Takes odd steps out of the chain (as a rank forwarding to its leader does)."""

    name = "take_odd"

    def process(self, step):
        return None if step.index % 2 else step


class Boom(StepProcessor):
    name = "boom"

    def process(self, step):
        raise RuntimeError("bug")

    def process_request(self, request):
        raise RuntimeError("bug")


class NoneForRequests(StepProcessor):
    def process_request(self, request):
        return None


def test_none_takes_the_step_out_and_errors_are_counted():
    after = Flag()
    failures = []
    chain = ProcessorChain([Flag(), Boom(), TakeOdd(), after], on_error=lambda p, n, e: failures.append((p.name, n)))
    assert all(isinstance(p, Processor) for p in chain)
    assert chain.step(make_step(1)) is None  # taken out: the processor after TakeOdd never sees it
    kept = chain.step(make_step(2))
    assert kept.verdict.anomaly and after.seen == [2]
    out, stayed = chain.steps([make_step(i) for i in range(4)])
    assert stayed == [True, False, True, False]
    assert all(s.verdict.anomaly for s in out)  # a step that left keeps the verdict it had
    assert failures == [("boom", 1), ("boom", 1), ("boom", 1), ("boom", 1), ("boom", 1), ("boom", 1)]
    assert chain.errors == 6


def test_a_request_processor_returning_none_leaves_the_request_as_it_was():
    rec = RequestRecord(instance="i", request_id="r1", arrival_ns=1, end_ns=2)
    chain = ProcessorChain([NoneForRequests(), Boom()])
    assert chain.request(rec) is rec and chain.errors == 1
    assert chain.wants_requests and not ProcessorChain([Flag()]).wants_requests


def test_pipeline_and_assembler_run_the_same_chain():
    from prism_otel.recorder import Recorder

    p = Pipeline(Recorder(1024), None, "i", [TakeOdd(), Boom()], sink=object())
    a = StepAssembler([TakeOdd(), Boom()], wait_s=0.0)
    assert type(p.chain) is ProcessorChain and type(a.chain) is ProcessorChain
    # the collector forwards every step span, the one taken out of the chain too
    outs = a.process(to_request(render([make_step(i) for i in range(4)])))
    outs += a.flush()
    names = [s.name for req, _ in outs for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert names.count("prism.step") == 4
    assert a.chain.errors == 2  # Boom saw the two steps that stayed
