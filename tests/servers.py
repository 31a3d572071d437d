"""Real servers the tests start on loopback ports: Prometheus, Alertmanager, and a small HTTP receiver.

Prometheus, Alertmanager and headless Chromium are Debian's packages (``prometheus``,
``prometheus-alertmanager``, ``chromium``), installed by ``make tools``, a prerequisite of ``make test``
(versions pinned in requirements/debian.txt). A test that needs one and does not find it fails with the command that installs it:
a skip would let a machine without them pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import pytest


def tool(name: str) -> str:
    """Path of an installed tool; fails the test with the install command."""
    p = shutil.which(name)
    if p:
        return p
    pytest.fail(f"{name} is not installed: run `make tools` (Debian packages pinned in requirements/debian.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: Optional[subprocess.Popen] = None) -> None:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s ({last})")


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Receiver:
    """An HTTP server on loopback that keeps every JSON body POSTed to it, by path."""

    def __init__(self) -> None:
        self.bodies: list[tuple] = []  # (path, body, monotonic time)
        self._lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with outer._lock:
                    outer.bodies.append((self.path, body, time.monotonic()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._t = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._t.start()

    def at(self, path: str) -> list:
        with self._lock:
            return [b for p, b, _ in self.bodies if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def _serving(workdir: str, name: str, argv: list[str]):
    """Run a Prometheus-family server (``argv`` plus its listen address on a free loopback port) until its
    ``/-/ready`` answers; yields its base URL, stops it after."""
    port = free_port()
    log = open(os.path.join(workdir, f"{name}.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv + [f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", proc=proc)
        yield url
    finally:
        _stop(proc)
        log.close()


@contextlib.contextmanager
def alertmanager(workdir: str, webhook_url: str, group_wait: str = "1s", group_interval: str = "1s"):
    """A real Alertmanager whose one route sends every notification (firing and resolved) to
    ``webhook_url``, one group per ``incident_id``. Yields its base URL."""
    exe = tool("prometheus-alertmanager")
    os.makedirs(workdir, exist_ok=True)
    cfg = os.path.join(workdir, "alertmanager.yml")
    with open(cfg, "w") as f:
        f.write(f"""route:
  receiver: hook
  group_by: ['incident_id']
  group_wait: {group_wait}
  group_interval: {group_interval}
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {webhook_url}
        send_resolved: true
""")
    with _serving(workdir, "alertmanager", [exe, f"--config.file={cfg}", f"--storage.path={workdir}/data",
                                             "--cluster.listen-address="]) as url:
        yield url


@contextlib.contextmanager
def prometheus(workdir: str, targets: list[str], interval: str = "1s", rule_files: list[str] = ()):
    """A real Prometheus scraping ``targets`` (host:port) every ``interval``. Yields its base URL."""
    exe = tool("prometheus")
    os.makedirs(workdir, exist_ok=True)
    cfg = os.path.join(workdir, "prometheus.yml")
    rules = "".join(f"  - {os.path.abspath(r)}\n" for r in rule_files)
    with open(cfg, "w") as f:
        f.write(f"""global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
{"rule_files:" + chr(10) + rules if rules else ""}scrape_configs:
  - job_name: prism
    static_configs:
      - targets: {json.dumps(list(targets))}
""")
    with _serving(workdir, "prometheus", [exe, f"--config.file={cfg}", f"--storage.tsdb.path={workdir}/data"]) as url:
        yield url
