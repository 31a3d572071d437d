"""Soak: a collector process under mixed load for a bounded time, then every span id reconciled.

    .venv/bin/python bench/soak.py [--seconds 90] [--stores log,sqlite]

For each store of the persistent queue (``log``: the collector's; ``sqlite``: the alternative of
bench/_sqlite_queue.py), in the same run, one collector process (persistent queue, bearer auth,
prism_anomaly + prism_fleet, ``service::memory::limit_mib: 256``) gets, all at once:

* good traffic: 2 gRPC and 1 HTTP senders (authenticated), 25-step requests (100 spans) from 8
  engine instances, each request resent on a refusal after the server's retry hint until it is
  acknowledged or the run ends; 1 in 20 carries a step with ``prism.kv_cache.usage = "abc"``;
* malformed traffic: garbage and truncated protobuf, a span with a bad id among good ones, JSON
  nested too deep, wrong content types; unauthenticated requests;
* slow clients: 50 HTTP connections trickling their head and 50 half-open gRPC calls, none with
  credentials, reopened whenever the server closes them;
* the backend (a real OTLP/gRPC server counting every delivery by span id) stops at 25% of the run and
  comes back at 45%; the collector is SIGKILLed at 60% and restarted on its queue.

Then the senders stop, the collector drains and is stopped with SIGTERM, and every span id sent is
reconciled: acknowledged (the client got OK), delivered (the backend has it), refused (never
acknowledged: the client was told to retry and the run ended, or was told the span was rejected),
counted as dropped by the collector (its counters, read at SIGTERM and just before the SIGKILL),
unaccounted (acknowledged but neither delivered nor counted: must be 0), duplicates (deliveries
beyond the first), peak RSS of the collector, and the latency of authenticated HTTP requests while
the slow clients are connected.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import grpc  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from prism_otel import semconv as sc  # noqa: E402

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TOKEN = "soak-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- backend --------------------------------------------------------------------------------------------
class Backend(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.port = free_port()
        self.counts = {}
        self.lock = threading.Lock()
        self.server = None

    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(1.0).wait(3)
            self.server = None

    def Export(self, request, context):  # noqa: N802
        with self.lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.counts[s.span_id] = self.counts.get(s.span_id, 0) + 1
        return ExportTraceServiceResponse()


# -- payloads -------------------------------------------------------------------------------------------
def _attr(span, key, value) -> None:
    kv = span.attributes.add()
    kv.key = key
    if isinstance(value, str):
        kv.value.string_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    else:
        kv.value.int_value = value


def good_request(rng: random.Random, instance: str, first: int, poison: bool):
    """25 engine steps (a step span + 3 stage children each), fresh random ids."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    _attr(rs.resource, sc.RES_SERVICE_INSTANCE_ID, instance)
    _attr(rs.resource, sc.RES_SERVICE_NAME, "soak")
    ss = rs.scope_spans.add()
    t = 1_700_000_000_000_000_000 + first * 20_000_000
    for i in range(25):
        b = rng.randint(1, 32)
        dur = int((2.0 + 0.3 * b) * rng.uniform(0.97, 1.03) * 1e6)
        tid, sid = rng.randbytes(16), rng.randbytes(8)
        step = ss.spans.add(name=sc.STEP_SPAN, trace_id=tid, span_id=sid, start_time_unix_nano=t,
                            end_time_unix_nano=t + dur)
        for key, v in ((sc.STEP_INDEX, first + i), (sc.STEP_PHASE, "decode"), (sc.BATCH_SIZE, b),
                       (sc.BATCH_DECODE_TOKENS, b), (sc.BATCH_CONTEXT_TOKENS, b * 300), (sc.STEP_CHILDREN, 3)):
            _attr(step, key, v)
        if poison and i == 7:
            _attr(step, sc.KV_CACHE_USAGE, "abc")
        edges = (t, t + 100_000, t + dur - 150_000, t + dur)
        for k, stage in enumerate(("schedule", "forward", "sample")):
            ss.spans.add(name=f"prism.stage.{stage}", trace_id=tid, span_id=rng.randbytes(8), parent_span_id=sid,
                         start_time_unix_nano=edges[k], end_time_unix_nano=edges[k + 1])
        t += 20_000_000
    return req


def span_ids(req):
    return [s.span_id for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


# -- the collector process --------------------------------------------------------------------------
class Collector:
    def __init__(self, store: str, workdir: str, backend_port: int) -> None:
        self.store = store
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log = os.path.join(workdir, "collector.log")
        cfg = {
            "extensions": {"file_storage": {"directory": os.path.join(workdir, "queue"), "create_directory": True},
                           "bearertokenauth": {"token": TOKEN}},
            "receivers": {"otlp": {"protocols": {
                "grpc": {"endpoint": f"127.0.0.1:{self.grpc_port}", "auth": {"authenticator": "bearertokenauth"}},
                "http": {"endpoint": f"127.0.0.1:{self.http_port}", "auth": {"authenticator": "bearertokenauth"}}}}},
            "processors": {"prism_anomaly": {}, "prism_fleet": {}},
            "exporters": {"otlp_grpc": {
                "endpoint": f"127.0.0.1:{backend_port}", "tls": {"insecure": True}, "timeout": "5s",
                "sending_queue": {"storage": "file_storage", "queue_size": 2000},
                "retry_on_failure": {"initial_interval": "200ms", "max_interval": "2s", "max_elapsed_time": 0}}},
            "service": {"extensions": ["file_storage", "bearertokenauth"], "memory": {"limit_mib": 256},
                        "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["prism_anomaly", "prism_fleet"],
                                                 "exporters": ["otlp_grpc"]}}}}
        self.config = os.path.join(workdir, "collector.yaml")
        with open(self.config, "w") as fh:
            yaml.safe_dump(cfg, fh)
        self.proc = None
        self.peak_rss = 0.0
        self.counters = []  # counter snapshots of each process that ran

    def start(self) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_soak_collector.py"), "--store", self.store,
                                      "--config", self.config], stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"collector did not start: {open(self.log, 'rb').read()[-2000:].decode()}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def sample_rss(self) -> None:
        try:
            self.peak_rss = max(self.peak_rss, psutil.Process(self.proc.pid).memory_info().rss / 2**20)
        except (psutil.Error, AttributeError):
            pass

    def _last_counters(self) -> dict:
        last = None
        with open(self.log, errors="replace") as fh:
            for line in fh:
                if "counters: {" in line:
                    last = line
        return json.loads(last[last.index("counters: ") + 10:]) if last else {}

    def sigkill(self) -> None:
        before = self._last_counters()
        self.proc.send_signal(signal.SIGUSR1)  # what it counted so far, then the crash
        deadline = time.monotonic() + 5
        while self._last_counters() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        self.counters.append(self._last_counters())
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.counters.append(self._last_counters())

    def counted(self, name: str) -> int:
        return sum(v for snap in self.counters for k, v in snap.items() if k.split("{")[0] == name)


# -- load -----------------------------------------------------------------------------------------------
class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = set()
        self.acked = set()
        self.rejected = set()  # the client was told (partial success)
        self.latency = []  # authenticated HTTP requests while slow clients are connected
        self.refusals = 0
        self.refusals_without_hint = 0


class Senders:
    def __init__(self, col: Collector, ledger: Ledger, seed: int) -> None:
        self.col, self.ledger = col, ledger
        self.stop = threading.Event()  # no new requests
        self.give_up = threading.Event()  # stop retrying
        self.seed = seed
        self.threads = []

    def start(self) -> None:
        for i in range(2):
            self.threads.append(threading.Thread(target=self._good, args=("grpc", i), daemon=True))
        self.threads.append(threading.Thread(target=self._good, args=("http", 2), daemon=True))
        self.threads.append(threading.Thread(target=self._malformed, daemon=True))
        for t in self.threads:
            t.start()

    def _good(self, transport: str, k: int) -> None:
        rng = random.Random(self.seed * 100 + k)
        n = 0
        session = requests.Session()
        while not self.stop.is_set():
            inst = f"engine-{k}-{n % 3}"
            req = good_request(rng, inst, n * 25, poison=n % 20 == 7)
            ids = span_ids(req)
            with self.ledger.lock:
                self.ledger.sent.update(ids)
            payload = req.SerializeToString()
            while not self.give_up.is_set():
                hint = self._send_grpc(payload) if transport == "grpc" else self._send_http(session, payload)
                if hint is None:
                    with self.ledger.lock:
                        self.ledger.acked.update(ids)
                    break
                time.sleep(hint)
            n += 1
            time.sleep(0.05)

    def _send_grpc(self, payload: bytes):
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.col.grpc_port}") as ch:
                ch.unary_unary(EXPORT, request_serializer=None,
                               response_deserializer=ExportTraceServiceResponse.FromString)(
                    payload, timeout=10, metadata=AUTH)
            return None
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                delay = None
                for key, value in exc.trailing_metadata() or ():
                    if key == "google.rpc.retryinfo-bin":
                        from google.rpc.error_details_pb2 import RetryInfo

                        d = RetryInfo.FromString(value).retry_delay
                        delay = d.seconds + d.nanos / 1e9
                with self.ledger.lock:
                    self.ledger.refusals += 1
                    if delay is None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.ledger.refusals_without_hint += 1
                return delay if delay is not None else 0.5  # UNAVAILABLE without a hint: the collector is down
            return 0.5

    def _send_http(self, session, payload: bytes):
        hdr = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {TOKEN}"}
        t0 = time.monotonic()
        try:
            r = session.post(f"http://127.0.0.1:{self.col.http_port}/v1/traces", data=payload, headers=hdr, timeout=10)
        except requests.RequestException:
            return 0.5
        with self.ledger.lock:
            self.ledger.latency.append(time.monotonic() - t0)
        if r.status_code == 200:
            return None
        if r.status_code in (429, 503):
            with self.ledger.lock:
                self.ledger.refusals += 1
                if "Retry-After" not in r.headers:
                    self.ledger.refusals_without_hint += 1
            return float(r.headers.get("Retry-After", 1))
        return 0.5

    def _malformed(self) -> None:
        rng = random.Random(self.seed)
        url = f"http://127.0.0.1:{self.col.http_port}/v1/traces"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        while not self.stop.wait(0.2):
            kind = rng.randrange(6)
            try:
                if kind == 0:
                    requests.post(url, data=rng.randbytes(200), headers=dict(auth, **{
                        "Content-Type": "application/x-protobuf"}), timeout=5)
                elif kind == 1:
                    good = good_request(rng, "engine-m", 0, False).SerializeToString()
                    requests.post(url, data=good[: len(good) // 2], headers=dict(auth, **{
                        "Content-Type": "application/x-protobuf"}), timeout=5)
                elif kind == 2:  # a bad id among good spans: the rest is kept, the client told
                    req = good_request(rng, "engine-m", 0, False)
                    bad = req.resource_spans[0].scope_spans[0].spans[1]
                    bad.span_id = b"\x01\x02"
                    ids = span_ids(req)
                    with grpc.insecure_channel(f"127.0.0.1:{self.col.grpc_port}") as ch:
                        resp = ch.unary_unary(EXPORT, request_serializer=None,
                                              response_deserializer=ExportTraceServiceResponse.FromString)(
                            req.SerializeToString(), timeout=10, metadata=AUTH)
                    with self.ledger.lock:
                        self.ledger.sent.update(i for i in ids if len(i) == 8)
                        if resp.partial_success.rejected_spans == 1:
                            self.ledger.acked.update(i for i in ids if len(i) == 8)
                elif kind == 3:
                    deep = '{"resourceSpans":[{"resource":{"attributes":[{"key":"k","value":' + (
                        '{"kvlistValue":{"values":[{"key":"k","value":' * 300) + '{"stringValue":"x"}' + (
                        "}]}}" * 300) + "}]}}]}"
                    requests.post(url, data=deep, headers=dict(auth, **{"Content-Type": "application/json"}), timeout=5)
                elif kind == 4:
                    requests.post(url, data=b"hello", headers=dict(auth, **{"Content-Type": "text/plain"}), timeout=5)
                else:
                    requests.post(url, data=b"x", headers={"Content-Type": "application/x-protobuf"}, timeout=5)
            except (requests.RequestException, grpc.RpcError):
                pass

    def join(self) -> None:
        for t in self.threads:
            t.join(60)


class SlowClients:
    """50 trickling HTTP heads and 50 half-open gRPC calls, none with credentials, reopened when closed."""

    def __init__(self, col: Collector) -> None:
        self.col = col
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _never(self):
        self.stop.wait(600)
        return
        yield  # unreachable

    def _run(self) -> None:
        socks, calls, channels = [], [], []
        while not self.stop.is_set():
            socks = [s for s in socks if s.fileno() != -1]
            try:
                while len(socks) < 50:
                    s = socket.create_connection(("127.0.0.1", self.col.http_port), timeout=2)
                    s.sendall(b"P")
                    socks.append(s)
                if not channels:
                    channels = [grpc.insecure_channel(f"127.0.0.1:{self.col.grpc_port}") for _ in range(2)]
                calls = [c for c in calls if not c.done()]
                while len(calls) < 50:
                    m = channels[len(calls) % 2].stream_unary(EXPORT, request_serializer=None,
                                                              response_deserializer=ExportTraceServiceResponse.FromString)
                    calls.append(m.future(self._never(), timeout=600))
            except OSError:
                pass  # the collector is down (SIGKILL phase)
            for s in list(socks):
                try:
                    s.sendall(b"O")
                except OSError:
                    s.close()
                    socks.remove(s)
            self.stop.wait(1.0)
        for s in socks:
            s.close()
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()


# -- one run ----------------------------------------------------------------------------------------------
def soak(store: str, seconds: float, seed: int) -> dict:
    work = tempfile.mkdtemp(prefix=f"soak-{store}-")
    backend = Backend()
    backend.start()
    col = Collector(store, work, backend.port)
    col.start()
    ledger = Ledger()
    load = Senders(col, ledger, seed)
    slow = SlowClients(col)
    load.start()
    slow.start()
    t0 = time.monotonic()
    events = [(0.25, "backend down", backend.stop), (0.45, "backend up", backend.start),
              (0.60, "collector SIGKILL", col.sigkill)]
    while time.monotonic() - t0 < seconds:
        col.sample_rss()
        if events and time.monotonic() - t0 >= events[0][0] * seconds:
            _, what, fn = events.pop(0)
            print(f"  [{store}] {time.monotonic() - t0:5.1f}s {what}", flush=True)
            fn()
            if what == "collector SIGKILL":
                time.sleep(2.0)
                col.start()
                print(f"  [{store}] {time.monotonic() - t0:5.1f}s collector restarted on its queue", flush=True)
        time.sleep(0.1)
    load.stop.set()
    slow.stop.set()
    settle = time.monotonic()
    while time.monotonic() - settle < 30 and any(t.is_alive() for t in load.threads):
        col.sample_rss()
        time.sleep(0.2)
    load.give_up.set()
    load.join()
    deadline = time.monotonic() + 180  # drain: everything acknowledged reaches the backend
    while time.monotonic() < deadline:
        col.sample_rss()
        with backend.lock:
            missing = len(ledger.acked - set(backend.counts))
        if not missing:
            break
        time.sleep(0.5)
    col.sigterm()
    backend.stop()
    slow.thread.join(10)
    delivered = set(backend.counts)
    sent, acked = ledger.sent, ledger.acked
    dropped = col.counted(sc.COLLECTOR_EXPORT_FAILED_SPANS) + col.counted(sc.METRIC_DROPPED)
    lost = len(acked - delivered)
    lat = sorted(ledger.latency)
    return {"store": store, "sent": len(sent), "acked": len(acked), "delivered": len(delivered & sent),
            "refused": len(sent - acked), "dropped": dropped, "unaccounted": max(0, lost - dropped),
            "duplicates": sum(v - 1 for v in backend.counts.values()), "peak_rss": col.peak_rss,
            "spans_s": len(delivered & sent) / seconds, "refusals": ledger.refusals,
            "no_hint": ledger.refusals_without_hint,
            "http_p99": lat[int(len(lat) * 0.99)] if lat else float("nan"), "http_max": lat[-1] if lat else float("nan"),
            "corrupt": col.counted(sc.COLLECTOR_CORRUPT_RECORDS), "evicted": col.counted(sc.COLLECTOR_INSTANCES_EVICTED),
            "malformed": col.counted(sc.COLLECTOR_MALFORMED_REQUESTS),
            "unauth": col.counted(sc.COLLECTOR_UNAUTHENTICATED),
            "bad_spans": col.counted(sc.COLLECTOR_PROCESSOR_ERRORS)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--stores", default="log,sqlite")
    ap.add_argument("--seed", type=int, default=16)
    a = ap.parse_args()
    rows = [soak(s, a.seconds, a.seed) for s in a.stores.split(",")]
    print(f"\nsoak: {a.seconds:.0f} s of mixed load per store (seed {a.seed}); memory budget 256 MiB")
    print("| store | sent | acknowledged | delivered | refused to the client (retry hint / rejected) | counted as "
          "dropped | unaccounted | duplicates | peak RSS MiB | delivered spans/s | authenticated HTTP p99 / max s "
          "with 100 slow clients |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['store']} | {r['sent']:,} | {r['acked']:,} | {r['delivered']:,} | {r['refused']:,} | "
              f"{r['dropped']:,} | {r['unaccounted']:,} | {r['duplicates']:,} | {r['peak_rss']:.0f} | "
              f"{r['spans_s']:,.0f} | {r['http_p99']:.3f} / {r['http_max']:.3f} |")
    for r in rows:
        print(f"{r['store']}: {r['refusals']} refusals ({r['no_hint']} without a retry hint), {r['malformed']} malformed "
              f"requests, {r['unauth']} unauthenticated, {r['bad_spans']} bad spans forwarded unjudged, "
              f"{r['corrupt']} corrupt queue records, {r['evicted']} instances evicted")
    return 0 if all(r["unaccounted"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
