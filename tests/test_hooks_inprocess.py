"""In-process behaviour of the transformers hooks: failure isolation, uninstrumenting, version
gating, and a down or slow exporter (the engine finishes, memory stays bounded, drops are counted)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import prism_otel
from prism_eval import tiny_models
from prism_otel import _runtime
from prism_otel import semconv as sc
from prism_otel.instrumentation import STATUS
from prism_otel.instrumentation._hooks import GUARDS
from prism_otel.instrumentation.transformers import TransformersInstrumentor, _cb
from tests.engines import cb_workload

cbapi = pytest.importorskip("transformers.generation.continuous_batching.continuous_api")


@pytest.fixture(scope="module")
def model_dir():
    return tiny_models.build(tiny_models.default_dir("tiny"), "tiny")


def run_engine(tmp_path, model_dir, n=16, name="r"):
    out = tmp_path / f"{name}.json"
    cb_workload.run_cb(str(out), n, 1, model_dir, 0.0)
    rep = json.loads(out.read_text())
    return {r["id"]: r["generated"] for r in rep["requests"]}, rep


@pytest.fixture
def memory_provider():
    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    yield tp, exp
    prism_otel.stop()
    for g in GUARDS.values():
        g.reset()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, model_dir):
    assert _runtime.current() is None
    return run_engine(tmp_path_factory.mktemp("base"), model_dir)[0]


def test_raising_hook_changes_nothing_and_disables_itself(tmp_path, model_dir, baseline, memory_provider,
                                                          monkeypatch):
    tp, exp = memory_provider
    calls = {"n": 0}

    def boom(bp):
        calls["n"] += 1
        raise RuntimeError("feature extraction broke")

    monkeypatch.setattr(_cb, "step_features", boom)
    prism_otel.start(tracer_provider=tp, processors=[])
    outputs, _ = run_engine(tmp_path, model_dir)
    assert outputs == baseline
    name = "transformers.ContinuousBatchProcessor.prepare_next_batch"  # the hook that reads the features
    g = GUARDS[name]
    assert g.disabled and g.errors == g.max_errors
    assert calls["n"] == g.max_errors, "a disabled hook must stop calling our code"
    st = prism_otel.status()
    assert st["hook_errors"][name] == g.max_errors
    assert st["instrumentations"][name][0] == "disabled" and "feature extraction broke" in st["instrumentations"][name][1]


def test_uninstrument_restores_original_methods(model_dir, memory_provider):
    tp, _ = memory_provider
    cls = cbapi.ContinuousBatchProcessor
    originals = {m: cls.__dict__[m] for m in ("prepare_next_batch", "_generation_step", "update_batch")}
    prism_otel.start(tracer_provider=tp, processors=[])
    assert all(cls.__dict__[m] is not f for m, f in originals.items()), "not instrumented"
    prism_otel.stop()
    assert all(cls.__dict__[m] is f for m, f in originals.items())
    assert STATUS["transformers"][0] == "uninstrumented"


def test_unsupported_version_is_reported_and_skipped():
    inst = TransformersInstrumentor()
    cls = cbapi.ContinuousBatchProcessor
    before = cls.__dict__["update_batch"]
    inst.instrument(skip_dep_check=True, supported=">=99")
    try:
        assert STATUS["transformers"][0] == "skipped"
        assert "outside the supported range" in STATUS["transformers"][1]
        assert cls.__dict__["update_batch"] is before
    finally:
        inst.uninstrument()


class _SlowSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, delay):
        self.delay = delay
        self.calls = 0

    def Export(self, request, context):  # noqa: N802
        self.calls += 1
        time.sleep(self.delay)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.parametrize("mode", ["down", "slow"])
def test_exporter_down_or_slow(tmp_path, model_dir, baseline, monkeypatch, mode):
    server = None
    if mode == "slow":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        sink = _SlowSink(2.0)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    else:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there
    monkeypatch.setenv(sc.OTEL_EXPORTER_OTLP_ENDPOINT, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "32")
    try:
        threads_before = threading.active_count()
        st = prism_otel.start(processors=[])
        t0 = time.perf_counter()
        outputs, rep = run_engine(tmp_path, model_dir, n=16, name=mode)
        elapsed = time.perf_counter() - t0
        assert outputs == baseline
        # Exports never block the engine: a 10 s export deadline or a 2 s slow export would show here.
        assert rep["elapsed_s"] < 5.0, rep["elapsed_s"]
        st.pipeline.flush()
        deadline = time.monotonic() + 10
        while True:  # the companion's counters reach the engine through the ring's header
            dropped = prism_otel.status()["dropped"]
            if dropped.get("export_queue_full", 0) > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert dropped.get("export_queue_full", 0) > 0, dropped
        # bounded: the ring is a fixed-size file; the open requests and the exporter queue (64 spans)
        # live in the companion, which counts what they drop; nothing of ours runs in this process
        assert prism_otel.status()["mode"] == "companion"
        assert not [t.name for t in threading.enumerate() if t.name.startswith(("prism", "OtelBatch"))]
        assert mode == "slow" or threading.active_count() == threads_before  # (the slow sink's own threads)
        assert elapsed < 60
    finally:
        t = time.perf_counter()
        prism_otel.stop(timeout=2)
        assert time.perf_counter() - t < 30
        if server is not None:
            server.stop(grace=None)


def test_companion_killed_mid_run_changes_nothing(tmp_path, model_dir, baseline, monkeypatch):
    monkeypatch.setenv(sc.ENV_PIPELINE, "companion")
    monkeypatch.setenv(sc.OTEL_TRACES_EXPORTER, "none")
    monkeypatch.setenv(sc.ENV_COMPANION_RESTARTS, "0")  # reported once, not restarted
    st = prism_otel.start()
    try:
        assert prism_otel.status()["mode"] == "companion"
        pid = st.pipeline.pid
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # not our child and in a session of its own: an engine killing its process tree spares it
        assert int(fields[1]) != os.getpid() and int(fields[3]) != os.getsid(0)
        with open(f"/proc/{pid}/environ", "rb") as f:  # one math-library thread: cores are the engine's
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert all(env.get(name.encode()) == b"1" for name in sc.HELPER_THREAD_POOL_ENV)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # gone, or a zombie its new parent has not reaped yet
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)
        outputs, rep = run_engine(tmp_path, model_dir, n=16, name="killed")
        assert outputs == baseline
        st.pipeline.flush()
        assert prism_otel.status()["dropped"].get("companion_down", 0) > 0
    finally:
        t = time.perf_counter()
        prism_otel.stop(timeout=5)
        assert time.perf_counter() - t < 10


def test_dead_companion_is_restarted_and_loses_nothing(tmp_path, model_dir, baseline, monkeypatch):
    """A companion killed between two workloads: the hooks notice (about once per second of steps,
    from its heartbeat and its pid), start another one, and that one carries on from where the dead one
    stopped reading: every request of the second workload is exported."""
    from tests.otlp_sink import OTLPSink

    monkeypatch.setenv(sc.ENV_PIPELINE, "companion")
    with OTLPSink() as sink:
        monkeypatch.setenv(sc.OTEL_EXPORTER_OTLP_ENDPOINT, sink.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        monkeypatch.setenv(sc.ENV_DETECT, "0")
        st = prism_otel.start()
        try:
            run_engine(tmp_path, model_dir, n=4, name="first")
            first = st.pipeline.pid
            os.kill(first, signal.SIGKILL)
            time.sleep(3.5)  # its heartbeat goes stale
            outputs, rep = run_engine(tmp_path, model_dir, n=16, name="second")
            assert outputs == baseline
            assert st.pipeline.flush(10)
            second = st.pipeline.pid
            assert second and second != first and st.companion.launches == 2
            ids = {r["id"] for r in rep["requests"]}
            spans = sink.wait_for(lambda s: ids <= {x.attributes.get(sc.REQUEST_ID) for x in s}, timeout=20)
            assert ids <= {x.attributes.get(sc.REQUEST_ID) for x in spans}
        finally:
            prism_otel.stop(timeout=5)


def test_pipeline_mode_companion_by_default_in_process_where_it_must_be(monkeypatch, caplog):
    """The pipeline runs in a companion process, multi-rank runs included; a provider of the
    application's, an explicit inprocess or a companion that cannot start keep it here."""
    import sys

    monkeypatch.delenv(sc.ENV_PIPELINE, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(sc.OTEL_TRACES_EXPORTER, "none")

    def mode(**kw):
        prism_otel.start(instrument=False, **kw)
        try:
            return prism_otel.status()["mode"]
        finally:
            prism_otel.stop(timeout=5)

    assert mode() == "companion"
    assert mode(model_name="tiny") == "companion"
    assert mode(tracer_provider=TracerProvider()) == "inprocess"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert mode() == "companion"
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(sc.ENV_PIPELINE, "inprocess")
    assert mode() == "inprocess"
    monkeypatch.setenv(sc.ENV_PIPELINE, "sideways")
    with caplog.at_level("WARNING", logger="prism_otel.config"):
        assert mode() == "companion"
    assert "sideways" in caplog.text
    monkeypatch.setenv(sc.ENV_PIPELINE, "companion")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    fds = len(os.listdir("/proc/self/fd"))
    with caplog.at_level("WARNING", logger="prism_otel._runtime"):
        assert mode() == "inprocess"
    assert "could not start" in caplog.text
    assert len(os.listdir("/proc/self/fd")) == fds, "the pipes of a companion that never started are closed"


def test_every_hook_point_matches_the_installed_transformers():
    """On the tested releases (newest in .venv, oldest in .venv-tf-oldest) no hook point is skipped."""
    import importlib

    from prism_otel.instrumentation._patch import signature_change
    from prism_otel.instrumentation.transformers import HOOK_POINTS

    for hp in HOOK_POINTS:
        cls = getattr(importlib.import_module(hp.module), hp.cls_name)
        assert signature_change(getattr(cls, hp.method), hp.params) is None, hp.target
