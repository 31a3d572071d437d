"""Fixtures for the attach tests: a running CB engine with no tracing, a real OTLP gRPC sink, and
the ``prism-otel`` command run as a separate process (the way a user runs it)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from prism_otel import semconv as sc
from tests.otlp_sink import OTLPSink

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = os.path.join(ROOT, "tests", "attach", "cb_server.py")
PRISM = os.path.join(os.path.dirname(sys.executable), "prism-otel")


def clean_env(**extra) -> dict:
    """Our environment without OTEL_* / PRISM_OTEL_* variables (but the attach dir) and PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith((sc.OTEL_ENV_PREFIX, sc.ENV_PREFIX)) or k == sc.ENV_ATTACH_DIR}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def sink_env(sink: OTLPSink, **extra) -> dict:
    return clean_env(**{sc.OTEL_EXPORTER_OTLP_ENDPOINT: sink.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                        "OTEL_BSP_SCHEDULE_DELAY": "100", sc.ENV_DETECT: "0"}, **extra)


def prism(*args, env=None, timeout=120, user=None) -> subprocess.CompletedProcess:
    cmd = [PRISM, *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all", *cmd]
    return subprocess.run(cmd, env=env if env is not None else clean_env(), capture_output=True, text=True,
                          timeout=timeout, cwd="/tmp")


class Server:
    """tests/attach/cb_server.py in its own process; reads what it wrote."""

    def __init__(self, out_dir, env=None, concurrency=4) -> None:
        self.dir = str(out_dir)
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        env = dict(env if env is not None else clean_env())
        env.pop(sc.ENV_ATTACH_DIR, None)
        self.proc = subprocess.Popen([sys.executable, SERVER, self.dir, "--concurrency", str(concurrency)],
                                     env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 180
        while not os.path.exists(os.path.join(self.dir, "ready")):
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    def stderr(self) -> str:
        self.log.flush()
        with open(os.path.join(self.dir, "server.log")) as f:
            return f.read()[-4000:]

    def results(self) -> list:
        with open(os.path.join(self.dir, "results.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def wait_results(self, n: int, timeout: float = 60) -> list:
        deadline = time.monotonic() + timeout
        while True:
            r = self.results()
            if len(r) >= n:
                return r
            assert self.alive(), self.stderr()
            assert time.monotonic() < deadline, f"only {len(r)} results"
            time.sleep(0.05)

    def steps_ns(self) -> list:
        with open(os.path.join(self.dir, "steps.bin"), "rb") as f:
            b = f.read()
        return list(struct.unpack(f"<{len(b) // 8}q", b[:len(b) // 8 * 8]))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1])

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()


def outputs_by_prompt(results) -> dict:
    d = defaultdict(set)
    for r in results:
        d[r["prompt"]].add(tuple(r["tokens"]))
    return d


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def make(name="server", **kw):
        d = tmp_path / name
        d.mkdir()
        s = Server(d, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def sink():
    with OTLPSink() as s:
        yield s


@pytest.fixture(autouse=True)
def _attach_dir(tmp_path, monkeypatch):
    # every test gets its own attach work dir (the shim is rebuilt there: ~0.2 s)
    d = tmp_path / "attach-dir"
    monkeypatch.setenv(sc.ENV_ATTACH_DIR, str(d))
    yield str(d)
