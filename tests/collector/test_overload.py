"""Memory stays bounded under 10x overload: a collector process is offered ten times the spans per
second it can deliver (pre-encoded requests over gRPC and HTTP from several threads, resent at once
when refused). It answers the excess with RESOURCE_EXHAUSTED + RetryInfo / 429 + Retry-After, its
resident memory stays within a fixed bound above its warmed-up size, and it still serves afterwards.

What limits it here is a slow backend (each export takes 100 ms; the exporter blocks on overflow so the
pressure reaches the receivers): on two shared cores a Python sender cannot offer 10x of what the
collector processes when the backend is fast (about 10^5 spans/s, see bench/collector_throughput.py)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import psutil
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from tests.collector.harness import CollectorProcess, base_config, free_port, write_config
from tests.collector.spans_util import make_step, render, to_request

pytestmark = pytest.mark.slow
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RSS_BOUND_MB = 300


def _payloads(n: int, steps_per_request: int = 128):
    out = []
    for k in range(n):
        steps = [make_step(k * steps_per_request + i, instance=f"i-{k % 4}", batch=1 + i % 16)
                 for i in range(steps_per_request)]
        out.append(to_request(render(steps, {"service.instance.id": f"i-{k % 4}"})).SerializeToString())
    return out


class SlowBackend(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC backend with ``workers`` threads that takes ``delay`` seconds per export; ``counts``
    has how often each span id (hex) was delivered."""

    def __init__(self, delay: float, workers: int = 8) -> None:
        self.delay = delay
        self.spans = 0
        self.counts = {}
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):  # noqa: N802
        time.sleep(self.delay)
        with self.lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    self.spans += len(ss.spans)
                    for s in ss.spans:
                        self.counts[s.span_id.hex()] = self.counts.get(s.span_id.hex(), 0) + 1
        return ExportTraceServiceResponse()


class Load:
    def __init__(self, grpc_port: int, http_port: int, payloads, spans_per_payload: int) -> None:
        self.grpc_port, self.http_port = grpc_port, http_port
        self.payloads = payloads
        self.spans = spans_per_payload
        self.lock = threading.Lock()
        self.counts = {"ok": 0, "refused": 0, "other": 0, "retry_info": 0, "retry_after": 0}
        self.stop = threading.Event()

    def _add(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def grpc_worker(self, rate: float) -> None:
        ch = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        call = ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        self._loop(rate, lambda p: self._grpc_once(call, p))
        ch.close()

    def _grpc_once(self, call, payload) -> None:
        try:
            call(payload, timeout=10)
            self._add("ok")
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                self._add("refused")
                if any(k == "google.rpc.retryinfo-bin" for k, _ in exc.trailing_metadata() or ()):
                    self._add("retry_info")
            else:
                self._add("other")

    def http_worker(self, rate: float) -> None:
        s = requests.Session()
        url = f"http://127.0.0.1:{self.http_port}/v1/traces"

        def once(payload):
            try:
                r = s.post(url, data=payload, headers={"Content-Type": "application/x-protobuf"}, timeout=10)
            except requests.RequestException:
                self._add("other")
                return
            if r.status_code == 200:
                self._add("ok")
            elif r.status_code in (429, 503):
                self._add("refused")
                if r.headers.get("Retry-After"):
                    self._add("retry_after")
            else:
                self._add("other")

        self._loop(rate, once)

    def _loop(self, rate: float, once) -> None:
        """Open loop: send at ``rate`` requests/s whatever the answers (refusals are resent at once)."""
        i, t0 = 0, time.monotonic()
        while not self.stop.is_set():
            once(self.payloads[i % len(self.payloads)])
            i += 1
            if rate:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)


@pytest.mark.timeout(600)
def test_memory_bounded_under_10x_overload(tmp_path):
    backend = SlowBackend(0.1)
    gp, hp = free_port(), free_port()
    cfg = base_config(gp, hp, exporters={"otlp_grpc": {
        "endpoint": f"127.0.0.1:{backend.port}", "tls": {"insecure": True}, "compression": "none",
        "sending_queue": {"queue_size": 20, "num_consumers": 2, "block_on_overflow": True}}})
    col = CollectorProcess(write_config(str(tmp_path / "c.yaml"), cfg), str(tmp_path / "collector.log")).start()
    proc = psutil.Process(col.pid)
    payloads = _payloads(8)
    spans_per = 128 * 4
    idle_rss = proc.memory_info().rss / 2**20
    try:
        # Capacity: one closed-loop client for a few seconds (warms the collector up too).
        warm = Load(gp, hp, payloads, spans_per)
        t = threading.Thread(target=warm.grpc_worker, args=(0,))
        t.start()
        time.sleep(2.0)
        ok0 = warm.counts["ok"]
        t0 = time.monotonic()
        time.sleep(4.0)
        capacity = (warm.counts["ok"] - ok0) * spans_per / (time.monotonic() - t0)
        warm.stop.set()
        t.join()
        time.sleep(1.0)
        base_rss = proc.memory_info().rss / 2**20
        # Overload: 10x the capacity, offered open-loop by 4 gRPC and 2 HTTP senders.
        load = Load(gp, hp, payloads, spans_per)
        per_thread = 10 * capacity / spans_per / 6
        threads = [threading.Thread(target=load.grpc_worker, args=(per_thread,)) for _ in range(4)]
        threads += [threading.Thread(target=load.http_worker, args=(per_thread,)) for _ in range(2)]
        for th in threads:
            th.start()
        peak, t0 = base_rss, time.monotonic()
        while time.monotonic() - t0 < 10.0:
            peak = max(peak, proc.memory_info().rss / 2**20)
            time.sleep(0.1)
        load.stop.set()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - t0
        c = load.counts
        offered = (c["ok"] + c["refused"]) * spans_per / elapsed
        print(f"capacity {capacity:.0f} spans/s; offered {offered:.0f} spans/s ({offered / capacity:.1f}x); "
              f"accepted {c['ok'] * spans_per / elapsed:.0f} spans/s; refused {c['refused']} requests; "
              f"rss idle {idle_rss:.0f} MiB, loaded {base_rss:.0f} MiB, peak under 10x {peak:.0f} MiB")
        assert offered >= 10 * capacity * 0.9, "the senders did not reach 10x"
        assert c["refused"] > c["ok"] and c["other"] == 0
        assert c["retry_info"] > 0 and c["retry_after"] > 0
        assert peak - idle_rss < RSS_BOUND_MB, f"collector grew {peak - idle_rss:.0f} MiB over idle under overload"
        assert peak - base_rss < 64, f"collector grew {peak - base_rss:.0f} MiB from 1x to 10x load"
        # Still serving: a plain request goes through once the load is gone.
        time.sleep(2.0)
        after = Load(gp, hp, payloads, spans_per)
        after._grpc_once(grpc.insecure_channel(f"127.0.0.1:{gp}").unary_unary(
            EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString), payloads[0])
        assert after.counts["ok"] == 1
        assert col.proc.poll() is None
    finally:
        col.stop()
        backend.server.stop(None)
