"""Test harness for the collector: free ports, an in-process service, a collector subprocess, clients
that send real OTLP with the official OTel exporters, a strict sink, and a local Phoenix."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Optional

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: str, cfg: dict) -> str:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path


def base_config(grpc_port: int = 0, http_port: int = 0, processors: Optional[dict] = None,
                exporters: Optional[dict] = None, extensions: Optional[dict] = None) -> dict:
    processors = {"prism_fleet": {}} if processors is None else processors
    exporters = exporters or {"debug": {}}
    cfg = {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{grpc_port}"},
                                             "http": {"endpoint": f"127.0.0.1:{http_port}"}}}},
        "processors": processors,
        "exporters": exporters,
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": list(processors),
                                             "exporters": list(exporters)}}},
    }
    if extensions:
        cfg["extensions"] = extensions
        cfg["service"]["extensions"] = list(extensions)
    return cfg


@contextlib.contextmanager
def service(cfg: dict):
    from prism_otel.collector.config import from_dict
    from prism_otel.collector.service import Service

    svc = Service(from_dict(cfg))
    svc.start()
    try:
        yield svc
    finally:
        svc.shutdown()


class CollectorProcess:
    """``python -m prism_otel.collector --config PATH`` as a child; ``start`` waits for 'ready'."""

    def __init__(self, config_path: str, log_path: str, env: Optional[dict] = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = dict(os.environ, **(env or {}))
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> CollectorProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PY, "-m", "prism_otel.collector", "--config", self.config_path],
                                     stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=self.env)
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if b"ready" in line or self.proc.poll() is not None:
                break
        if b"ready" not in line:
            self.kill()
            raise RuntimeError(f"collector did not start: {open(self.log_path, 'rb').read()[-3000:].decode()}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        return self.proc.returncode


def read_counters(log_path: str) -> dict[str, int]:
    """The last counters a collector process logged (at shutdown, or on SIGUSR1), summed by name.

    Keys are ``name`` (summed over labels) and ``name{labels}`` as logged."""
    import json

    last = None
    with open(log_path, errors="replace") as fh:
        for line in fh:
            if "counters: {" in line:
                last = line
    if last is None:
        return {}
    raw = json.loads(last[last.index("counters: ") + len("counters: "):])
    out: dict[str, int] = dict(raw)
    for key, v in raw.items():
        name = key.split("{", 1)[0]
        if name != key:
            out[name] = out.get(name, 0) + v
    return out


# -- clients: the official OTel exporters ---------------------------------------------------------
def client_provider(protocol: str, port: int, instance: str, batch: bool = True, **res):
    """A TracerProvider exporting with the official OTLP exporter; returns (provider, sent-span recorder)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=30)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=30)
    attrs = {"service.instance.id": instance, "service.name": "prism-test"}
    attrs.update(res)
    tp = TracerProvider(resource=Resource.create(attrs))
    sent = InMemorySpanExporter()
    tp.add_span_processor(SimpleSpanProcessor(sent))
    if batch:
        tp.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=200000, schedule_delay_millis=50,
                                                 max_export_batch_size=256))
    else:
        tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, sent


def send_steps(tp, steps: Iterable) -> None:
    from prism_otel.spans import SpanMaterializer

    m = SpanMaterializer(tp)
    for s in steps:
        m.step(s)


def span_ids(spans) -> list[str]:
    return [format(s.context.span_id, "016x") for s in spans]


# -- a strict backend: counts every delivery --------------------------------------------------------
class CountingSink:
    """A real OTLP/gRPC backend (tests/otlp_sink.py) that can be stopped and restarted on its port,
    keeping every span id it ever received with the number of times it got it."""

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.counts: dict[str, int] = {}
        self.attrs: dict[str, dict] = {}
        self._sink = None
        self._lock = threading.Lock()

    def start(self) -> CountingSink:
        from tests.otlp_sink import OTLPSink

        self._sink = OTLPSink(self.port)
        self._sink.__enter__()
        return self

    def stop(self, grace: float = 2.0) -> None:
        """A backend restart: in-flight calls are allowed to finish."""
        if self._sink is not None:
            self._harvest()
            self._sink._server.stop(grace).wait(grace + 1)
            self._harvest()
            self._sink = None

    def _harvest(self) -> None:
        from tests.otlp_sink import attrs_of

        sink = self._sink
        if sink is None:
            return
        with sink._lock:  # take the requests and empty the list at once: a request must not slip between
            reqs, sink.requests = sink.requests, []
        with self._lock:
            for req in reqs:
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            sid = s.span_id.hex()
                            self.counts[sid] = self.counts.get(sid, 0) + 1
                            self.attrs[sid] = attrs_of(s.attributes)

    def snapshot(self) -> dict[str, int]:
        self._harvest()
        with self._lock:
            return dict(self.counts)

    def wait_for(self, ids: Iterable[str], timeout: float = 60.0) -> dict[str, int]:
        want = set(ids)
        deadline = time.monotonic() + timeout
        got = self.snapshot()
        while not want <= set(got) and time.monotonic() < deadline:
            time.sleep(0.2)
            got = self.snapshot()
        return got


# -- Phoenix --------------------------------------------------------------------------------------
PHOENIX_BIN = os.path.join(ROOT, ".venv-phoenix", "bin", "phoenix")


class Phoenix:
    """``phoenix serve`` on loopback, in its own venv (Makefile: .venv-phoenix), with its own SQLite dir."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 180.0) -> Phoenix:
        import requests

        env = dict(os.environ, PHOENIX_HOST="127.0.0.1", PHOENIX_PORT=str(self.http_port),
                   PHOENIX_GRPC_PORT=str(self.grpc_port), PHOENIX_WORKING_DIR=self.workdir,
                   PHOENIX_TELEMETRY_ENABLED="false")
        for k in [k for k in env if k.startswith("OTEL_")]:
            env.pop(k)
        log = open(os.path.join(self.workdir, "phoenix.log"), "ab")
        self.proc = subprocess.Popen([PHOENIX_BIN, "serve"], stdout=log, stderr=log, env=env, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("phoenix exited: " + open(os.path.join(self.workdir, "phoenix.log")).read()[-2000:])
            try:
                if requests.get(self.base + "/healthz", timeout=1).status_code == 200 and self._grpc_up():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("phoenix did not come up")

    def _grpc_up(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.grpc_port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def spans(self, project: str = "default") -> list[dict]:
        import requests

        out, cursor = [], None
        while True:
            params = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            r = requests.get(f"{self.base}/v1/projects/{project}/spans", params=params, timeout=30)
            if r.status_code == 404:
                return out
            r.raise_for_status()
            body = r.json()
            out.extend(body["data"])
            cursor = body.get("next_cursor")
            if not cursor:
                return out

    def wait_for(self, ids: Iterable[str], timeout: float = 90.0) -> list[dict]:
        want = set(ids)
        deadline = time.monotonic() + timeout
        spans = self.spans()
        while not want <= {s["context"]["span_id"] for s in spans} and time.monotonic() < deadline:
            time.sleep(1.0)
            spans = self.spans()
        return spans
