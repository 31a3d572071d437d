"""Fixtures for the attach tests: a running CB engine with no tracing, a real OTLP gRPC sink, and
the ``prism-otel`` command run as a separate process (the way a user runs it)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, distribution

import pytest

from prism_otel import semconv as sc
from tests.otlp_sink import OTLPSink

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = os.path.join(ROOT, "tests", "attach", "cb_server.py")
PRISM = os.path.join(os.path.dirname(sys.executable), "prism-otel")
SYSTEM_PY = "/usr/bin/python3"  # the same minor version as the venv's (3.11): its wheels load there


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


def _runtime_dists(root: str = "prism-otel") -> list:
    """prism-otel and every distribution it needs at run time (no extras), from this environment."""
    from packaging.requirements import Requirement

    seen, out, todo = set(), [], [root]
    while todo:
        try:
            d = distribution(todo.pop())
        except PackageNotFoundError:
            continue
        name = d.metadata["Name"].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        out.append(d)
        for r in d.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return out


_SITE = None


def readable_site() -> str:
    """A directory every user can read that holds prism-otel and what it needs, copied from this venv
    (what `pip install --target DIR prism-otel` gives an operator): a checkout in root's 0700 home is
    not readable by another user's process, nor by an attacher that runs as another user."""
    global _SITE
    if _SITE is not None:
        return _SITE
    d = tempfile.mkdtemp(prefix="prism-readable-site-")
    atexit.register(shutil.rmtree, d, True)
    for dist in _runtime_dists():
        for f in dist.files or ():
            src = str(dist.locate_file(f))
            if ".." in str(f) or not os.path.isfile(src) or "__pycache__" in str(f):
                continue  # an editable install's files live in the checkout (copied below)
            dst = os.path.join(d, str(f))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    for pkg in ("prism_otel", "receivers", "processors", "prism_eval"):
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(d, pkg), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for base, _dirs, files in os.walk(d):
        os.chmod(base, 0o755)
        for f in files:
            os.chmod(os.path.join(base, f), 0o644)
    os.chmod(d, 0o755)
    _SITE = d
    return d


def prism(*args, env=None, timeout=120, user=None) -> subprocess.CompletedProcess:
    """`prism-otel ARGS` as its own process; as ``user`` (another uid, no capabilities) it runs the system
    Python on :func:`readable_site`, since that user cannot read this checkout or its venv."""
    env = dict(env if env is not None else clean_env())
    env.setdefault("PYTHONPATH", ROOT)  # the command runs this checkout, not whatever an editable install points at
    cmd = [PRISM, *map(str, args)]
    if user is not None:
        env["PYTHONPATH"] = readable_site()
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all", SYSTEM_PY,
               "-m", "prism_otel.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd="/tmp")


class Server:
    """tests/attach/cb_server.py in its own process; reads what it wrote."""

    def __init__(self, out_dir, env=None, concurrency=4) -> None:
        self.dir = str(out_dir)
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        env = dict(env if env is not None else clean_env())
        env.pop(sc.ENV_ATTACH_DIR, None)
        env.setdefault("PYTHONPATH", ROOT)  # the engine imports this checkout when attached
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
