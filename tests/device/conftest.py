"""Shared fixtures for the device tests: a clean DeepDive controller and a tiny real engine."""

from __future__ import annotations

import pytest

from prism_otel.device.deepdive import DEEPDIVE, GRAPH_REPLAY_TARGETS


@pytest.fixture(autouse=True)
def clean_deepdive():
    saved = (DEEPDIVE.enabled, DEEPDIVE.steps, DEEPDIVE.min_interval_ns, DEEPDIVE.rate, DEEPDIVE.annotate,
             DEEPDIVE.profiler_allowed)
    DEEPDIVE.reset()
    DEEPDIVE._last_ns = None
    DEEPDIVE.signal_flag = False
    yield DEEPDIVE
    DEEPDIVE.reset()
    (DEEPDIVE.enabled, DEEPDIVE.steps, DEEPDIVE.min_interval_ns, DEEPDIVE.rate, DEEPDIVE.annotate,
     DEEPDIVE.profiler_allowed) = saved
    DEEPDIVE._last_ns = None
    GRAPH_REPLAY_TARGETS.clear()


@pytest.fixture(scope="session")
def tiny_model_dir():
    from prism_eval import tiny_models

    return tiny_models.build(tiny_models.default_dir("tiny"), "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def spans_pipeline():
    """prism-otel started with an in-memory exporter and no default processors; yields (runtime, exporter)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import prism_otel

    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    holder = {}

    def start(processors=()):
        holder["rt"] = prism_otel.start(tracer_provider=tp, processors=list(processors))
        return holder["rt"]

    yield start, exp
    prism_otel.stop()


def step_spans(exp):
    return sorted((s for s in exp.get_finished_spans() if s.name == "prism.step"),
                  key=lambda s: s.attributes["prism.step.index"])


def children(exp, parent):
    return [s for s in exp.get_finished_spans() if s.parent is not None and s.parent.span_id == parent.context.span_id]
