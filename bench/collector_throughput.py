"""Collector throughput: spans per second per core through receive → assemble → detect → export,
against the bare protobuf decode + encode of the same payload (the floor Python can reach).

    .venv/bin/python bench/collector_throughput.py [--rounds 5] [--requests 60]

Payload: OTLP requests of 512 spans (128 engine steps: a ``prism.step`` span and 3 stage children
each) from 4 engine instances, rendered by prism-otel's own span materializer and encoded by the
OTel exporters' encoder. Rows, each measured in every round, interleaved, in CPU seconds of the
process doing the work (so "per core"):

* floor: ``ParseFromString`` + ``SerializeToString`` of each request, nothing else;
* in-process, no processors: decode → StepAssembler (steps rebuilt from spans) → encode;
* in-process: decode → StepAssembler (prism_anomaly + prism_fleet, warmed up: models fitted) → tag →
  encode, on one thread (what the collector's pipeline thread does, without sockets);
* collector: a ``prism-otel collector`` process, OTLP/gRPC receiver → the same processors →
  ``otlp_grpc`` exporter to a backend in another process; CPU of the collector process; and the
  same with ``sending_queue.storage`` (the on-disk queue).

In-process rows count the CPU of the thread doing the work (the detector's model refits run on a
thread of its own and are not in them); the collector rows count the whole collector process (gRPC,
exporter threads and refits included).

Reports spans/s per core per row and its ratio to the floor of the same round (median over rounds,
min–max in brackets). The machine's 2 cores are shared with other jobs: absolute rates move, ratios
much less.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from prism_otel.record import StepRecord  # noqa: E402
from prism_otel.spans import SpanMaterializer  # noqa: E402

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
STEPS_PER_REQUEST = 128
SPANS_PER_REQUEST = STEPS_PER_REQUEST * 4


# -- payload ----------------------------------------------------------------------------------------
def _steps(instance: str, start: int, n: int, rng: random.Random):
    t = 1_700_000_000_000_000_000 + start * 20_000_000
    for i in range(start, start + n):
        b = rng.randint(1, 32)
        dur = int((2.0 + 0.3 * b) * rng.uniform(0.97, 1.03) * 1e6)
        t0, t1 = t, t + dur
        yield StepRecord(instance=instance, index=i, start_ns=t0, end_ns=t1, phase="decode", batch_size=b,
                         prefill_tokens=0, decode_tokens=b, context_tokens=b * rng.randint(100, 900),
                         max_context_tokens=900, request_ids=tuple(f"r{i}-{j}" for j in range(min(b, 8))),
                         stages={"schedule": (t0, t0 + 100_000), "forward": (t0 + 100_000, t1 - 150_000),
                                 "sample": (t1 - 150_000, t1)})
        t += 20_000_000


def payloads(n_requests: int, start: int = 0, seed: int = 0):
    """n_requests encoded requests, cycling over 4 instances, each with its own resource."""
    rng = random.Random(seed)
    out = []
    for k in range(n_requests):
        inst = f"engine-{k % 4}"
        exp = InMemorySpanExporter()
        tp = TracerProvider(resource=Resource.create({"service.instance.id": inst, "service.name": "llm",
                                                      "prism.engine.framework": "transformers"}))
        tp.add_span_processor(SimpleSpanProcessor(exp))
        m = SpanMaterializer(tp)
        first = start + (k // 4) * STEPS_PER_REQUEST
        for s in _steps(inst, first, STEPS_PER_REQUEST, rng):
            m.step(s)
        out.append(encode_spans(exp.get_finished_spans()).SerializeToString())
    return out


# -- rows -------------------------------------------------------------------------------------------
def floor_rate(reqs) -> float:
    t0 = time.thread_time()
    for raw in reqs:
        r = ExportTraceServiceRequest()
        r.ParseFromString(raw)
        r.SerializeToString()
    return len(reqs) * SPANS_PER_REQUEST / (time.thread_time() - t0)


def make_assembler(detect: bool = True):
    from processors.anomaly import AnomalyProcessor
    from processors.assembler import StepAssembler
    from processors.fleet import FleetProcessor

    procs = [AnomalyProcessor({"alert_log": False}), FleetProcessor()] if detect else []
    return StepAssembler(procs, wait_s=1.0)


def inprocess_rate(assembler, reqs) -> float:
    t0 = time.thread_time()
    n = 0
    for raw in reqs:
        r = ExportTraceServiceRequest()
        r.ParseFromString(raw)
        for out, src in assembler.process(r, 0):
            out.SerializeToString()
            n += sum(src.values())
    return n / (time.thread_time() - t0)


# -- the backend for the collector rows (another process) ----------------------------------------------
def _sink_main(port_q, counter) -> None:
    def export(raw, context):
        r = ExportTraceServiceRequest()
        r.ParseFromString(raw)
        with counter.get_lock():
            counter.value += sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
        return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None,
                                                       response_serializer=ExportTraceServiceResponse.SerializeToString)}),))
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    def __init__(self, tmp: str, sink_port: int, persistent: bool) -> None:
        self.port = _free_port()
        exporter = {"endpoint": f"127.0.0.1:{sink_port}", "tls": {"insecure": True}, "compression": "none",
                    "sending_queue": {"num_consumers": 2, "queue_size": 200}}
        cfg = {"receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.port}"}}}},
               "processors": {"prism_anomaly": {"alert_log": False}, "prism_fleet": {}},
               "exporters": {"otlp_grpc": exporter},
               "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["prism_anomaly", "prism_fleet"],
                                                    "exporters": ["otlp_grpc"]}}}}
        if persistent:
            exporter["sending_queue"]["storage"] = "file_storage"
            cfg["extensions"] = {"file_storage": {"directory": os.path.join(tmp, "q"), "create_directory": True}}
            cfg["service"]["extensions"] = ["file_storage"]
        path = os.path.join(tmp, f"c{int(persistent)}.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        self.proc = subprocess.Popen([sys.executable, "-m", "prism_otel.collector", "--config", path],
                                     stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, f"c{int(persistent)}.log"), "w"),
                                     cwd=ROOT)
        while b"ready" not in self.proc.stdout.readline():
            if self.proc.poll() is not None:
                raise SystemExit("collector did not start")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.call = self.channel.unary_unary(EXPORT, request_serializer=None,
                                             response_deserializer=ExportTraceServiceResponse.FromString)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def send(self, reqs, in_flight: int = 4) -> None:
        """Closed loop, ``in_flight`` requests outstanding; a refused request is sent again."""
        pending = list(reqs)
        active = []
        while pending or active:
            while pending and len(active) < in_flight:
                raw = pending.pop(0)
                active.append((raw, self.call.future(raw, timeout=60)))
            raw, f = active.pop(0)
            try:
                f.result()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                time.sleep(0.01)
                pending.insert(0, raw)

    def stop(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def collector_rate(col: Collector, counter, reqs) -> float:
    want = counter.value + len(reqs) * SPANS_PER_REQUEST
    c0 = col.cpu()
    col.send(reqs)
    deadline = time.monotonic() + 120
    while counter.value < want and time.monotonic() < deadline:
        time.sleep(0.005)
    if counter.value < want:
        raise SystemExit(f"backend got {counter.value} of {want} spans")
    return len(reqs) * SPANS_PER_REQUEST / (col.cpu() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=60, help="requests of 512 spans per row per round")
    a = ap.parse_args()
    # Span ids are random per payloads() call; the on-disk queue skips ids it already delivered, so every
    # pass sends fresh payloads.
    warm = [payloads(40, 0, seed=1), payloads(40, 5000, seed=1)]  # 1280 steps per instance each: models fit
    rounds = [payloads(a.requests, 10_000 + r * a.requests * STEPS_PER_REQUEST, seed=2 + r) for r in range(a.rounds)]
    ctx = mp.get_context("spawn")
    port_q, counter = ctx.Queue(), ctx.Value("q", 0)
    sink = ctx.Process(target=_sink_main, args=(port_q, counter), daemon=True)
    sink.start()
    sink_port = port_q.get(timeout=60)
    tmp = tempfile.mkdtemp(prefix="prism-bench-")
    assembler = make_assembler()
    bare = make_assembler(detect=False)
    cols = {"collector (memory queue)": Collector(tmp, sink_port, False),
            "collector (on-disk queue)": Collector(tmp, sink_port, True)}
    try:
        # Warm up: every detector sees >1000 steps per instance and fits its models (background threads).
        inprocess_rate(assembler, warm[0])
        for col in cols.values():
            collector_rate(col, counter, warm[0])
        time.sleep(15.0)
        inprocess_rate(assembler, warm[1])
        for col in cols.values():
            collector_rate(col, counter, warm[1])
        ASM = "in-process: decode, assemble, encode (no processors)"
        rows = {"floor: protobuf decode + encode": [], ASM: [], "in-process: decode, assemble, detect, tag, encode": []}
        rows.update({k: [] for k in cols})
        for reqs in rounds:
            fl = floor_rate(reqs)
            rows["floor: protobuf decode + encode"].append((fl, 1.0))
            ba = inprocess_rate(bare, reqs)
            rows[ASM].append((ba, ba / fl))
            ip = inprocess_rate(assembler, reqs)
            rows["in-process: decode, assemble, detect, tag, encode"].append((ip, ip / fl))
            for name, col in cols.items():
                cr = collector_rate(col, counter, reqs)
                rows[name].append((cr, cr / fl))
    finally:
        for col in cols.values():
            col.stop()
        sink.terminate()
    print(f"| path ({a.rounds} rounds x {a.requests} requests x {SPANS_PER_REQUEST} spans) "
          "| spans/s per core (median) | CPU µs per step (4 spans) | ratio to floor, median [min-max] |")
    print("|---|---|---|---|")
    for name, vals in rows.items():
        rates = [v for v, _ in vals]
        ratios = [q for _, q in vals]
        med = statistics.median(rates)
        print(f"| {name} | {med:,.0f} | {4e6 / med:.1f} | {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}-{max(ratios):.3f}] |")


if __name__ == "__main__":
    main()
