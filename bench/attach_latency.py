"""Attach latency and the stall attaching causes, on a running transformers CB engine (tiny model).

    .venv/bin/python bench/attach_latency.py [--rounds 10] [--gdb-rounds 3] [--restart-rounds 2]

The engine (tests/attach/cb_server.py) serves greedy requests without tracing and clocks every
engine iteration itself (start of ``prepare_next_batch``, CLOCK_MONOTONIC). A real OTLP gRPC server
in this process records when the first ``prism.step`` span arrives. Per round:

* attach -> handshake: ``prism_otel.attach.attach()`` returning (the target reported ``running``);
* attach -> first step span received over OTLP (``OTEL_BSP_SCHEDULE_DELAY=100``: the export
  batching delay counts in it);
* stall: the longest engine step period from 0.2 s before the attach until 1 s after it, over the
  median period of the 2 s before (1.0 = no visible stall); the same for detach.

Compared in the same run with what a user would otherwise do:

* **gdb injection** of the same stub (``PyGILState_Ensure``/``PyRun_SimpleString`` on the thread gdb
  stops, the pyrasite recipe): gdb stops every thread while it reads the symbols of torch & co.
* **restart under ``prism-otel run``**: launch -> first step span (imports and model load included;
  a real server would also drop its in-flight requests and warm its caches again).

Round 1 is cold (the target imports the OTel SDK, grpc and prism-otel); the table reports it apart
from the warm rounds (median [min-max]). The machine has 2 shared cores: run it alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from prism_otel import semconv as sc  # noqa: E402

SERVER = os.path.join(ROOT, "tests", "attach", "cb_server.py")
PYINJECTOR = None
GDB_TIMEOUT = 90


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts step spans and remembers when each export request with one arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.step_arrivals = []  # perf_counter_ns of each request that carried a step span

    def Export(self, request, context):  # noqa: N802
        now = time.perf_counter_ns()
        n = sum(1 for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
                if s.name == sc.STEP_SPAN)
        if n:
            with self.lock:
                self.step_arrivals.append(now)
        return trace_service_pb2.ExportTraceServiceResponse()

    def first_after(self, t_ns: int, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                hits = [t for t in self.step_arrivals if t >= t_ns]
            if hits:
                return min(hits)
            time.sleep(0.002)
        return None


def base_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_")) and k != "PYTHONPATH"}


class Engine:
    def __init__(self, prefix=(), env=None) -> None:
        self.dir = tempfile.mkdtemp(prefix="attach-bench-")
        self.t_launch = time.perf_counter_ns()
        self.proc = subprocess.Popen([*prefix, sys.executable, SERVER, self.dir], env=env or base_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)
        while not os.path.exists(os.path.join(self.dir, "ready")):
            if self.proc.poll() is not None:
                raise SystemExit("engine exited")
            time.sleep(0.05)
        self.pid = self.proc.pid

    def steps(self) -> list:
        with open(os.path.join(self.dir, "steps.bin"), "rb") as f:
            b = f.read()
        return list(struct.unpack(f"<{len(b) // 8}q", b[:len(b) // 8 * 8]))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def stall(engine: Engine, t_start: int, t_end: int) -> tuple:
    """(longest step period in [start - 0.2 s, end + 0.5 s], median period in the 2 s before), ms."""
    time.sleep(0.8)  # the engine flushes its step clock every 0.2 s
    ts = engine.steps()
    gaps = [(b, b - a) for a, b in zip(ts, ts[1:])]
    before = [g for t, g in gaps if t_start - 2_200_000_000 <= t < t_start - 200_000_000]
    around = [g for t, g in gaps if t_start - 200_000_000 <= t <= t_end + 500_000_000]
    if not before or not around:
        return float("nan"), float("nan")
    return max(around) / 1e6, statistics.median(before) / 1e6


def gdb_inject(pid: int, stub_path: str) -> None:
    code = f"exec(open('{stub_path}').read())".replace('"', '\\"')
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (int)PyGILState_Ensure()",
                    "-ex", f'call (int)PyRun_SimpleString("{code}")', "-ex", "call (void)PyGILState_Release($1)"],
                   capture_output=True, timeout=GDB_TIMEOUT, check=True)


def fmt(xs, unit="", digits=0):
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    med = statistics.median(xs)
    f = f"{{:.{digits}f}}"
    return f"{f.format(med)}{unit} [{f.format(min(xs))}-{f.format(max(xs))}]" if len(xs) > 1 else f.format(med) + unit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--gdb-rounds", type=int, default=3)
    ap.add_argument("--restart-rounds", type=int, default=2)
    a = ap.parse_args()

    global PYINJECTOR
    from prism_otel import attach as at
    from prism_otel.attach import _inject

    PYINJECTOR = _inject.Request._pyinjector

    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    otel = {sc.OTEL_EXPORTER_OTLP_ENDPOINT: f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100", sc.ENV_DETECT: "0"}
    rows = {}

    eng = Engine()
    keys = ("handshake", "first_span", "longest", "normal", "ratio", "d_longest", "d_ratio", "steady")
    try:
        time.sleep(3)  # steady state

        def record(into: dict, t0: int, t1: int, first, st, dst, steady=(float("nan"), 1.0)) -> None:
            vals = {"steady": steady[0], "handshake": (t1 - t0) / 1e6,
                    "first_span": ((first - t0) / 1e6) if first else float("nan"), "longest": st[0], "normal": st[1], "ratio": st[0] / st[1], "d_longest": dst[0],
                    "d_ratio": dst[0] / dst[1]}
            for k in keys:
                into.setdefault(k, []).append(vals[k])

        def one_round(into: dict, probe: bool, timeout: float = 60) -> None:
            t0 = time.perf_counter_ns()
            at.attach(eng.pid, env=dict(otel), probe=probe, timeout=timeout)
            t1 = time.perf_counter_ns()
            first = sink.first_after(t0)
            st = stall(eng, t0, t1)
            ts0 = time.perf_counter_ns()  # attached, 1 s+ after the attach: the steady traced state
            time.sleep(0.06)
            steady = stall(eng, ts0, time.perf_counter_ns())
            orig = _inject.Request._pyinjector
            _inject.Request._pyinjector = PYINJECTOR  # detach the same way every time
            try:
                td0 = time.perf_counter_ns()
                at.detach(eng.pid)
                td1 = time.perf_counter_ns()
            finally:
                _inject.Request._pyinjector = orig
            record(into, t0, t1, first, st, stall(eng, td0, td1), steady)
            time.sleep(0.5)

        cold, warm, control = {}, {}, {}
        for i in range(a.rounds):
            one_round(cold if i == 0 else warm, probe=(i == 0))
            # control: the same measurement around a moment when nothing is done to the engine
            t0 = time.perf_counter_ns()
            time.sleep(0.06)
            st = stall(eng, t0, time.perf_counter_ns())
            t0 = time.perf_counter_ns()
            time.sleep(0.06)
            record(control, t0, t0, None, st, stall(eng, t0, time.perf_counter_ns()))
        for k in ("handshake", "first_span", "steady"):
            control.pop(k)
        rows["no attach (control, same windows)"] = control
        rows["pyinjector + shim (cold, round 1)"] = cold
        rows[f"pyinjector + shim (warm, {a.rounds - 1} rounds)"] = warm
        if a.gdb_rounds and shutil.which("gdb"):
            g = {}
            _inject.Request._pyinjector = lambda self: gdb_inject(self.t.pid, self.stub_path)
            try:
                hung = 0
                for _ in range(a.gdb_rounds):
                    try:
                        one_round(g, probe=False, timeout=300)
                    except (subprocess.TimeoutExpired, at.AttachFailed):
                        hung += 1  # gdb killed: the engine is restarted so the next round is comparable
                        eng.stop()
                        eng = Engine()
                        time.sleep(3)
            finally:
                _inject.Request._pyinjector = PYINJECTOR
            rows[f"gdb, same stub ({a.gdb_rounds - hung}/{a.gdb_rounds} ok, {hung} hung)"] = g
    finally:
        eng.stop()

    if a.restart_rounds:
        rr = {"first_span": []}
        prism = os.path.join(os.path.dirname(sys.executable), "prism-otel")
        for _ in range(a.restart_rounds):
            env = base_env()
            env.update(otel)
            t0 = time.perf_counter_ns()
            e = Engine(prefix=(prism, "run", "--"), env=env)
            first = sink.first_after(t0, timeout=120)
            rr["first_span"].append(((first or 0) - e.t_launch) / 1e6 if first else float("nan"))
            e.stop()
        rows[f"restart under prism-otel run ({a.restart_rounds} rounds)"] = rr
    server.stop(None)

    print(f"{'method':40} {'attach->handshake':>20} {'attach->1st span':>20} {'normal step':>12} "
          f"{'longest step (x normal)':>30} {'attached, later':>18} {'detach: longest (x)':>26}")
    for name, r in rows.items():
        lg, dl = (f"{fmt(r[a], ' ms', 1)} ({fmt(r[b], 'x', 1)})" if a in r else "-"
                  for a, b in (("longest", "ratio"), ("d_longest", "d_ratio")))
        print(f"{name:40} {fmt(r.get('handshake', []), ' ms'):>20} {fmt(r.get('first_span', []), ' ms'):>20} "
              f"{fmt(r.get('normal', []), ' ms', 1):>12} {lg:>30} {fmt(r.get('steady', []), ' ms', 1):>18} {dl:>26}")
    print("longest step: the longest engine step period from 0.2 s before the attach (detach) began until 0.5 s"
          " after it returned; normal: median period over the 2 s before; median [min-max] over rounds;"
          " attached, later: the same longest-step measure over a window 1 s+ after the attach (traced, no attach"
          " going on), to be read against the control; restart: launch -> first step span")


if __name__ == "__main__":
    main()
