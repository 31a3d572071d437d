"""DeepDive bursts on real tiny engines (transformers generate and continuous batching) and on a
plain torch loop: kernel-group spans, burst length, triggers (on demand, anomaly verdict, sampling,
signal, step list), the rate limit, and graph-replay detection with the profiler-window fallback."""

from __future__ import annotations

import os
import signal
import time

import torch

from prism_otel import semconv as sc
from prism_otel.device import deepdive, manual
from prism_otel.device.deepdive import DEEPDIVE, GRAPH_REPLAY_TARGETS
from prism_otel.device.processor import DeviceProcessor
from prism_otel.pipeline import replace_verdict
from tests.device.conftest import children, step_spans


def _generate(model, new=4, rows=2):
    ids = torch.randint(3, 250, (rows, 8), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)


def _no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_burst_in_generate(tiny_model, spans_pipeline):
    start, exp = spans_pipeline
    rt = start()
    assert deepdive.request(steps=3) == "armed"
    _generate(tiny_model, new=5)
    rt.pipeline.flush()
    steps = step_spans(exp)
    assert len(steps) == 5
    dd = [s for s in steps if s.attributes.get(sc.DEEPDIVE)]
    assert [s.attributes[sc.STEP_INDEX] for s in dd] == [1, 2, 3]  # exactly the burst, from the next step on
    for s in dd:
        a = s.attributes
        assert a[sc.DEEPDIVE_TRIGGER] == "on_demand" and a[sc.DEEPDIVE_METHOD] == "module_hooks"
        assert a[sc.DEVICE_TIMING] == "host"  # CPU: host events stand in for device events
        kids = [k for k in children(exp, s) if k.name.startswith(sc.KERNEL_SPAN_PREFIX)]
        groups = {k.attributes[sc.KERNEL_GROUP]: k.attributes[sc.DEVICE_TIME_MS] for k in kids}
        assert {"attention", "gemm", "norm", "activation", "embedding"} <= set(groups)
        assert abs(sum(groups.values()) - a[sc.DEVICE_TIME_MS]) < 0.01  # the groups partition the step
        assert groups["gemm"] > 0
    for s in steps[3:]:
        assert sc.DEEPDIVE not in s.attributes
        assert not [k for k in children(exp, s) if k.name.startswith(sc.KERNEL_SPAN_PREFIX)]
    assert _no_hooks(tiny_model) and not DEEPDIVE.active  # hooks removed after the burst


def test_burst_in_continuous_batching_has_sampling(tiny_model, spans_pipeline):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    start, exp = spans_pipeline
    rt = start()
    deepdive.request(steps=2)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=2)
    tiny_model.generate_batch([[1, 5, 6, 7], [1, 9, 9]], generation_config=gen,
                              continuous_batching_config=ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=64))
    rt.pipeline.flush()
    dd = [s for s in step_spans(exp) if s.attributes.get(sc.DEEPDIVE)]
    assert len(dd) == 2
    groups = {k.attributes[sc.KERNEL_GROUP] for k in children(exp, dd[0]) if k.name.startswith(sc.KERNEL_SPAN_PREFIX)}
    assert "sampling" in groups and "gemm" in groups  # logits processing + sampling after the model's forward
    assert _no_hooks(tiny_model)


def test_request_outcomes_and_rate_limit(tiny_model, spans_pipeline):
    start, _ = spans_pipeline
    start()
    DEEPDIVE.min_interval_ns = int(600e9)
    assert DEEPDIVE.request("sample", 1, steps=1) == "armed"
    assert DEEPDIVE.request("sample", 2) == "busy"  # armed, not run yet
    _generate(tiny_model, new=2)
    assert DEEPDIVE.request("sample", 3) == "rate_limited"
    assert DEEPDIVE.request("on_demand", 3, steps=1, force=True) == "armed"  # on demand ignores the limit
    _generate(tiny_model, new=2)
    DEEPDIVE._last_ns -= DEEPDIVE.min_interval_ns  # the interval has passed
    assert DEEPDIVE.request("anomaly", 4, steps=1) == "armed"
    DEEPDIVE.cancel()
    DEEPDIVE.enabled = False
    assert DEEPDIVE.request("anomaly", 5) == "disabled"
    assert DEEPDIVE.refused == {"busy": 1, "rate_limited": 1}


class _FlagStep:
    """A detector stand-in for this test: flags the step with the given index as anomalous."""

    name = "flag"

    def __init__(self, index):
        self.index = index

    def process(self, step):
        return replace_verdict(step, anomaly=step.index == self.index, score=1.0)

    def process_request(self, r):
        return r

    def shutdown(self):
        pass


def test_anomaly_verdict_triggers_a_linked_burst(tiny_model, spans_pipeline):
    start, exp = spans_pipeline
    DEEPDIVE.steps = 2
    rt = start([_FlagStep(2), DeviceProcessor(rate=0.0, on_host=True, health=False)])
    _generate(tiny_model, new=3)  # step 2 flagged; the pipeline sees it after the engine moved on
    rt.pipeline.flush()
    _generate(tiny_model, new=3)
    rt.pipeline.flush()
    steps = step_spans(exp)
    flagged = steps[1]
    assert flagged.attributes[sc.ANOMALY] and flagged.attributes[sc.DEEPDIVE_REQUEST] == "armed"
    dd = [s for s in steps if s.attributes.get(sc.DEEPDIVE)]
    assert len(dd) == 2
    for s in dd:
        assert s.attributes[sc.DEEPDIVE_TRIGGER] == "anomaly"
        assert s.attributes[sc.DEEPDIVE_TRIGGER_STEP] == 2  # linked back to the step that asked
        assert s.attributes[sc.STEP_INDEX] > 2


def test_anomaly_on_host_is_ignored_by_default(tiny_model, spans_pipeline):
    start, exp = spans_pipeline
    rt = start([_FlagStep(1), DeviceProcessor(rate=0.0, health=False)])
    _generate(tiny_model, new=3)
    _generate(tiny_model, new=3)
    rt.pipeline.flush()
    assert not [s for s in step_spans(exp) if s.attributes.get(sc.DEEPDIVE)]
    assert sc.DEEPDIVE_REQUEST not in step_spans(exp)[0].attributes


def test_sampling_rate_and_its_limit(tiny_model, spans_pipeline):
    start, exp = spans_pipeline
    DEEPDIVE.steps = 1
    DEEPDIVE.min_interval_ns = int(600e9)
    rt = start([DeviceProcessor(rate=1.0, on_host=True, health=False, seed=1)])
    for _ in range(3):
        _generate(tiny_model, new=3)
        rt.pipeline.flush()
    dd = [s for s in step_spans(exp) if s.attributes.get(sc.DEEPDIVE)]
    assert len(dd) == 1 and dd[0].attributes[sc.DEEPDIVE_TRIGGER] == "sample"  # one burst, then rate-limited
    assert DEEPDIVE.refused.get("rate_limited", 0) >= 3


def test_signal_and_step_list_ask_for_bursts(tiny_model, spans_pipeline, monkeypatch):
    start, exp = spans_pipeline
    monkeypatch.setenv(sc.ENV_DEEPDIVE_AT_STEP, "2")
    DEEPDIVE.steps = 1
    old = signal.getsignal(signal.SIGUSR2)
    try:
        assert DEEPDIVE.install_signal("USR2")
        rt = start([DeviceProcessor(rate=0.0, health=False)])
        _generate(tiny_model, new=4)
        rt.pipeline.flush()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert DEEPDIVE.signal_flag
        _generate(tiny_model, new=4)
        rt.pipeline.flush()
        _generate(tiny_model, new=2)
        rt.pipeline.flush()
    finally:
        signal.signal(signal.SIGUSR2, old)
    steps = step_spans(exp)
    assert steps[1].attributes[sc.DEEPDIVE_REQUEST] == "armed"  # step 2 listed
    dd = [s for s in steps if s.attributes.get(sc.DEEPDIVE)]
    assert len(dd) == 2 and all(s.attributes[sc.DEEPDIVE_TRIGGER] == "on_demand" for s in dd)
    assert dd[0].attributes[sc.DEEPDIVE_TRIGGER_STEP] == 2


class _Replay:
    """Replays precomputed work without calling any module: what a captured device graph does."""

    def __init__(self, model):
        self.w = [p.detach().clone() for p in model.parameters() if p.dim() == 2]

    def replay(self, x):
        for w in self.w:
            x = torch.tanh(x @ w.T[: x.shape[-1], : x.shape[-1]])
        return x


class _GraphModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.b = torch.nn.Linear(16, 16)
        self.graph = None

    def forward(self, x):
        if self.graph is not None:
            return self.graph.replay(x)
        return self.b(torch.relu(self.norm(self.a(x))))


def test_graph_replay_detected_and_profiler_fallback(spans_pipeline):
    start, exp = spans_pipeline
    GRAPH_REPLAY_TARGETS.append((_Replay, "replay"))
    rt = start()
    m = _GraphModel()
    x = torch.randn(4, 16)
    deepdive.request(steps=4)
    with manual.step(m, batch_size=4, decode_tokens=4):
        m(x)  # eager: hooks fire
    m.graph = _Replay(m)
    for _ in range(3):
        with manual.step(m, batch_size=4, decode_tokens=4):
            m(x)  # replay: no module hook fires
    rt.pipeline.flush()
    steps = step_spans(exp)
    assert len(steps) == 4
    a = [s.attributes for s in steps]
    assert a[0][sc.DEEPDIVE_METHOD] == "module_hooks" and sc.DEVICE_GRAPH_REPLAY not in a[0]
    assert a[1][sc.DEVICE_GRAPH_REPLAY] is True and a[1][sc.DEEPDIVE_METHOD] == "none"
    assert a[1][sc.DEVICE_TIME_MS] > 0  # the step-level time is kept
    # the rest of the burst ran as a profiler window (a CPU trace has no device kernels to name)
    for x_ in a[2:]:
        assert x_[sc.DEVICE_GRAPH_REPLAY] is True and x_[sc.DEEPDIVE_METHOD] == "none"
    assert not DEEPDIVE.active and _Replay.replay.__name__ == "replay"  # patch removed
    from prism_otel.device.profiler import profiler_busy

    assert not profiler_busy()  # the window was stopped with the burst


def test_engine_errors_never_escape(tiny_model, spans_pipeline, monkeypatch):
    """A failure inside DeepDive's start ends the burst quietly; the step is timed plainly."""
    start, exp = spans_pipeline
    rt = start()

    def boom(self, dd):
        raise RuntimeError("hook install failed")

    monkeypatch.setattr(deepdive._Session, "install", boom)
    deepdive.request(steps=2)
    _generate(tiny_model, new=3)
    rt.pipeline.flush()
    steps = step_spans(exp)
    assert len(steps) == 3 and not any(s.attributes.get(sc.DEEPDIVE) for s in steps)
    assert not DEEPDIVE.active
