"""Issue 16, finding 1: one well-formed span whose prism attributes have the wrong types (``prism.step``
with ``prism.kv_cache.usage = "abc"``) must not stop a pipeline. It is left out of the processors,
counted, and forwarded as received; its 99 neighbours are processed and delivered; a persistent queue
settles the record instead of replaying it at every start."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel import semconv as sc
from tests.collector.harness import CollectorProcess, CountingSink, base_config, free_port, service, write_config
from tests.collector.spans_util import make_step, render, to_request

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def poisoned_request(first: int = 0, instance: str = "i-0", key: str = sc.KV_CACHE_USAGE, value="abc"):
    """25 steps x (step + 3 stages) = 100 spans; the 8th step span gets ``key`` = ``value``."""
    req = to_request(render([make_step(first + i, instance=instance) for i in range(25)],
                            {"service.instance.id": instance}))
    steps = [s for s in req.resource_spans[0].scope_spans[0].spans if s.name == sc.STEP_SPAN]
    kv = next((kv for kv in steps[7].attributes if kv.key == key), None)
    if kv is None:
        kv = steps[7].attributes.add()
        kv.key = key
    kv.value.Clear()
    if isinstance(value, str):
        kv.value.string_value = value
    elif isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, list):
        for v in value:
            kv.value.array_value.values.add().double_value = v
    return req


def good_request(first: int, instance: str = "i-1"):
    return to_request(render([make_step(first, instance=instance)], {"service.instance.id": instance}))


def ids_of(req):
    return [s.span_id.hex() for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


def export(port: int, req, timeout: float = 10.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        return call(req.SerializeToString(), timeout=timeout)


def _exporter(sink_port: int, persistent: bool) -> dict:
    x = {"endpoint": f"127.0.0.1:{sink_port}", "tls": {"insecure": True}, "timeout": "2s",
         "retry_on_failure": {"initial_interval": "100ms", "max_interval": "500ms", "max_elapsed_time": 0}}
    if persistent:
        x["sending_queue"] = {"storage": "file_storage", "queue_size": 50}
    return x


@pytest.mark.parametrize("key,value", [(sc.KV_CACHE_USAGE, "abc"), (sc.BATCH_SIZE, "seven"),
                                       (sc.DEVICE_TIME_MS, [1.0, 2.0]), (sc.STEP_INDEX, True),
                                       (sc.ANOMALY, "yes")])
def test_in_memory_pipeline_delivers_all_100_and_counts_the_bad_span(key, value):
    sink = CountingSink().start()
    cfg = base_config(processors={"prism_anomaly": {}, "prism_fleet": {}},
                      exporters={"otlp_grpc": _exporter(sink.port, persistent=False)})
    req = poisoned_request(key=key, value=value)
    try:
        with service(cfg) as svc:
            resp = export(svc.receivers["otlp"].grpc_port, req)
            assert not resp.HasField("partial_success")
            got = sink.wait_for(ids_of(req), timeout=30)
            assert set(ids_of(req)) <= set(got)
            t = svc.telemetry
            assert t.get(sc.COLLECTOR_PROCESSOR_ERRORS, processor="assembly", reason="bad_attribute") == 1
            assert t.get(sc.COLLECTOR_EXPORTED_SPANS) == 100
    finally:
        sink.stop()


@pytest.mark.timeout(240)
def test_persistent_pipeline_settles_the_record_and_keeps_serving_across_restarts(tmp_path):
    sink = CountingSink().start()
    gp, hp = free_port(), free_port()
    cfg = base_config(gp, hp, exporters={"otlp_grpc": _exporter(sink.port, persistent=True)},
                      extensions={"file_storage": {"directory": str(tmp_path / "q"), "create_directory": True}})
    path = write_config(str(tmp_path / "c.yaml"), cfg)
    log = str(tmp_path / "collector.log")
    col = CollectorProcess(path, log).start()
    try:
        bad = poisoned_request()
        export(gp, bad)
        sent = ids_of(bad)
        for k in range(60):  # more than the queue holds: with the record stuck, these got 429
            req = good_request(1000 + k)
            export(gp, req)
            sent += ids_of(req)
        got = sink.wait_for(sent, timeout=60)
        assert set(sent) <= set(got), f"{len(set(sent) - set(got))} spans not delivered"
        col.kill()  # SIGKILL, then a restart on the same queue: nothing must come back
        col = CollectorProcess(path, log).start()
        req = good_request(5000)
        export(gp, req)
        got = sink.wait_for(ids_of(req), timeout=60)
        assert set(ids_of(req)) <= set(got)
        assert all(got[i] == 1 for i in ids_of(bad)), "the poisoned request was replayed"
    finally:
        col.stop()
        sink.stop()


def test_a_request_the_processors_fail_on_is_settled_not_replayed(tmp_path):
    """Defence in depth: should a request still make the processors raise as a whole (a bug), the
    persistent pipeline counts its spans as dropped and settles the record; it is not replayed at the
    next start, and the next request goes through."""
    import time

    from prism_otel.collector.component import ComponentID, Settings
    from prism_otel.collector.exporters.base import QueuedExporter, SendingQueueConfig
    from prism_otel.collector.pipeline import Pipeline
    from prism_otel.collector.telemetry import Telemetry
    from processors.assembler import StepAssembler

    class Exploding(StepAssembler):
        def process(self, req, source=None):
            if any(s.name == "boom" for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans):
                raise RuntimeError("a bug")
            return super().process(req, source)

    class Collect(QueuedExporter):
        queue = SendingQueueConfig(num_consumers=1)

        def __init__(self, settings):
            super().__init__(settings)
            self.got = []

        def send(self, item):
            self.got.extend(ids_of(item.request))

    def run(reqs):
        tel = Telemetry()
        exp = Collect(Settings(ComponentID("collect"), tel))
        exp.start(None)
        p = Pipeline("traces", Exploding(), [(exp, True)], tel, storage_dir=str(tmp_path / "q"))
        p.start()
        for req in reqs:
            p.consume(req, req.SerializeToString(), len(ids_of(req)))
        deadline = time.monotonic() + 20
        while p.wal.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        pending = p.wal.pending
        p.stop()
        exp.shutdown(drain=False)
        p.close()
        return tel, exp.got, pending

    bad = good_request(0)
    bad.resource_spans[0].scope_spans[0].spans[0].name = "boom"
    good = good_request(1)
    tel, got, pending = run([bad, good])
    assert pending == 0 and got == ids_of(good)
    assert tel.get(sc.METRIC_DROPPED, reason="pipeline_error") == len(ids_of(bad))
    tel, got, pending = run([])
    assert got == [] and tel.get(sc.COLLECTOR_REPLAYED_RECORDS) == 0
