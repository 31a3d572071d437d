"""A fleet in one collector: 64 engine instances, the default config, every step judged?

    .venv/bin/python bench/collector_fleet.py [--instances 64] [--learn 300] [--steps 1000] [--rounds 3]

Each instance replays its own stretch of a real recording (the shipped ``vllm-small`` corpus: vLLM
CPU steps with their five stages, so 6 spans a step), with its own ``service.instance.id`` and the
same service, framework and model as the others (a fleet of replicas). It sends ``--learn`` steps to
learn from, then ``--steps`` more, in OTLP requests of 85 steps (510 spans: the SDK batch processor sends up to 512), the instances interleaved the way
a fleet's exports arrive. Everything is encoded before the clock starts.

Rows, every round (fresh collectors each round, order rotating):

* floor: protobuf decode + encode of the same requests in this process (the least Python can do);
* collector, pass-through: ``prism-otel collector`` with no processor (receive, queue, export);
* collector, default ``prism_anomaly: {}``: assembly, detection, tagging.

For the collector rows: engine steps per collector CPU-second over the whole stream (learning
included: a collector cannot skip it) and over the judged part alone (after the learning requests
are through), how many steps came back judged (``prism.latency.expected_ms`` on the step span) of
those after each instance's first model, and the collector's ``instances_evicted`` counters. CPU is
the collector process's (gRPC, exporter threads and fits included); the backend is another process.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import collector_throughput as ct  # noqa: E402  (bench/: the throughput bench's client)
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

from prism_eval.simulate import corpus  # noqa: E402
from prism_eval.simulate.stepcsv import parse_row  # noqa: E402
from prism_otel import semconv as sc  # noqa: E402
from prism_otel.spans import SpanMaterializer  # noqa: E402

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
STEPS_PER_REQUEST = 85  # 510 spans: the OTel SDK batch processor sends up to 512 a request
CORPUS = "vllm-small"


# -- payload --------------------------------------------------------------------------------------------
def fleet_requests(n_inst: int, learn: int, steps: int):
    """(learning requests, judged requests, steps per phase): every instance's steps from its own
    stretch of the corpus, STEPS_PER_REQUEST a request, the instances interleaved."""
    rows = corpus.read_steps(os.path.join(corpus.available()[CORPUS], "steps.csv.gz"))
    per = learn + steps
    stride = max(1, (len(rows) - per) // max(1, n_inst - 1))
    out = {}
    for k in range(n_inst):
        inst = f"vllm-{k:03d}"
        exp = InMemorySpanExporter()
        tp = TracerProvider(resource=Resource.create({
            sc.RES_SERVICE_INSTANCE_ID: inst, sc.RES_SERVICE_NAME: "vllm", sc.RES_FRAMEWORK: "vllm",
            sc.GEN_AI_REQUEST_MODEL: "tiny-llama"}))
        tp.add_span_processor(SimpleSpanProcessor(exp))
        m = SpanMaterializer(tp)
        reqs = []
        base = (k * stride) % max(1, len(rows) - per)
        t_shift = None
        for j in range(per):
            rec, _ = parse_row(rows[(base + j) % len(rows)], j)
            if rec is None:
                continue
            if t_shift is None:
                t_shift = 1_800_000_000_000_000_000 - rec.start_ns
            rec = rec.__class__(**{**rec.__dict__, "instance": inst, "index": j,
                                   "start_ns": rec.start_ns + t_shift, "end_ns": rec.end_ns + t_shift,
                                   "stages": {n: (a + t_shift, b + t_shift) for n, (a, b) in rec.stages.items()}})
            m.step(rec)
            if (j + 1) % STEPS_PER_REQUEST == 0 or j == learn - 1 or j == per - 1:  # no request straddles the phases
                reqs.append((j < learn, encode_spans(exp.get_finished_spans()).SerializeToString()))
                exp.clear()
        out[inst] = reqs
    learn_reqs, judged_reqs = [], []
    for i in range(max(len(r) for r in out.values())):
        for reqs in out.values():
            if i < len(reqs):
                (learn_reqs if reqs[i][0] else judged_reqs).append(reqs[i][1])
    return learn_reqs, judged_reqs


# -- backend: counts step spans and the judged ones ----------------------------------------------------
def _sink_main(port_q, counters) -> None:
    def export(raw, context):
        r = ExportTraceServiceRequest()
        r.ParseFromString(raw)
        steps = judged = spans = 0
        for rs in r.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans += 1
                    if s.name == sc.STEP_SPAN:
                        steps += 1
                        judged += any(a.key == sc.LATENCY_EXPECTED_MS for a in s.attributes)
        with counters.get_lock():
            counters[0] += spans
            counters[1] += steps
            counters[2] += judged
        return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=None, response_serializer=ExportTraceServiceResponse.SerializeToString)}),))
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


_free_port = ct._free_port


class Collector:
    def __init__(self, tmp: str, name: str, sink_port: int, processors: dict, tree: str = ROOT) -> None:
        self.port = _free_port()
        self.log = os.path.join(tmp, f"{name}.log")
        cfg = {"receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.port}"}}}},
               "exporters": {"otlp_grpc": {"endpoint": f"127.0.0.1:{sink_port}", "tls": {"insecure": True},
                                           "compression": "none"}},
               "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": list(processors),
                                                    "exporters": ["otlp_grpc"]}}}}
        if processors:
            cfg["processors"] = processors
        path = os.path.join(tmp, f"{name}.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        env = dict(os.environ, PYTHONPATH=tree)  # the collector of that checkout
        self.proc = subprocess.Popen([sys.executable, "-m", "prism_otel.collector", "--config", path],
                                     stdout=subprocess.PIPE, stderr=open(self.log, "w"), cwd=tree, env=env)
        while b"ready" not in self.proc.stdout.readline():
            if self.proc.poll() is not None:
                raise SystemExit(f"collector did not start: {open(self.log).read()[-2000:]}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)
        self.spy = None
        if os.environ.get("PRISM_BENCH_PYSPY"):  # a profile of the collector: py-spy's path in this variable
            self.spy = subprocess.Popen([os.environ["PRISM_BENCH_PYSPY"], "record", "-p", str(self.proc.pid), "-r", "200",
                                         "-f", "raw", "-o", os.path.join(tmp, f"{name}.pyspy.txt"), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.call = self.channel.unary_unary(EXPORT, request_serializer=None,
                                             response_deserializer=ExportTraceServiceResponse.FromString)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    send = ct.Collector.send  # closed loop, 4 in flight, a refused request sent again

    def stop(self) -> str:
        self.channel.close()
        if self.spy is not None:
            self.spy.send_signal(2)
            self.spy.wait(30)
        self.proc.terminate()
        self.proc.wait(60)
        return open(self.log).read()


def _evicted(log: str) -> dict:
    """instances_evicted by reason, from the counters the collector logs at shutdown."""
    import json

    last = None
    for line in log.splitlines():
        if "counters: {" in line:
            last = line
    if last is None:
        return {}
    raw = json.loads(last[last.index("counters: ") + len("counters: "):])
    out = {}
    for key, v in raw.items():
        if key.startswith(sc.COLLECTOR_INSTANCES_EVICTED):
            for reason in ("budget", "idle"):
                if reason in key:
                    out[reason] = out.get(reason, 0) + v
    return out


def _wait(counters, want_spans: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while counters[0] < want_spans and time.monotonic() < deadline:
        time.sleep(0.01)
    if counters[0] < want_spans:
        raise SystemExit(f"backend got {counters[0]} of {want_spans} spans")


def spans_in(reqs) -> int:
    n = 0
    for raw in reqs:
        r = ExportTraceServiceRequest.FromString(raw)
        n += sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
    return n


def run_collector(tmp, name, sink_port, counters, processors, learn_reqs, judged_reqs, n_learn, n_judged,
                  tree: str = ROOT):
    with counters.get_lock():
        counters[0] = counters[1] = counters[2] = 0
    col = Collector(tmp, name, sink_port, processors, tree)
    try:
        c0 = col.cpu()
        col.send(learn_reqs)
        _wait(counters, n_learn)
        c1 = col.cpu()
        judged_before = counters[2]
        col.send(judged_reqs)
        _wait(counters, n_learn + n_judged)
        c2 = col.cpu()
        steps_total, judged_total = counters[1], counters[2]
    finally:
        log = col.stop()
    return {"cpu_all": c2 - c0, "cpu_judged": c2 - c1, "steps": steps_total, "judged": judged_total,
            "judged_in_judged_phase": judged_total - judged_before, "evicted": _evicted(log)}


def floor(reqs) -> float:
    t0 = time.thread_time()
    for raw in reqs:
        ExportTraceServiceRequest.FromString(raw).SerializeToString()
    return time.thread_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--learn", type=int, default=300)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout (e.g. `git worktree add /tmp/base <rev>`): its collector "
                                       "with the default prism_anomaly as one more arm, in the same rounds")
    a = ap.parse_args()
    t0 = time.time()
    learn_reqs, judged_reqs = fleet_requests(a.instances, a.learn, a.steps)
    n_learn, n_judged = spans_in(learn_reqs), spans_in(judged_reqs)
    steps_learn, steps_judged = a.instances * a.learn, a.instances * a.steps
    print(f"payload: {a.instances} instances x ({a.learn} + {a.steps}) steps of {CORPUS}, "
          f"{len(learn_reqs) + len(judged_reqs)} requests, {n_learn + n_judged} spans, built in {time.time() - t0:.0f} s",
          file=sys.stderr)
    ctx = mp.get_context("spawn")
    port_q, counters = ctx.Queue(), ctx.Array("q", 3)
    sink = ctx.Process(target=_sink_main, args=(port_q, counters), daemon=True)
    sink.start()
    sink_port = port_q.get(timeout=60)
    tmp = tempfile.mkdtemp(prefix="prism-fleet-")
    print(f"logs: {tmp}", file=sys.stderr)
    arms = {"collector, pass-through (no processor)": ({}, ROOT),
            "collector, default prism_anomaly": ({"prism_anomaly": {}}, ROOT)}
    if a.baseline:
        rev = subprocess.run(["git", "-C", a.baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        arms[f"collector, default prism_anomaly, baseline {rev}"] = ({"prism_anomaly": {}}, os.path.abspath(a.baseline))
    res = {k: [] for k in arms}
    floors = []
    try:
        for r in range(a.rounds):
            floors.append(floor(learn_reqs + judged_reqs))
            names = list(arms)
            if r % 2:
                names.reverse()
            for name in names:
                procs, tree = arms[name]
                out = run_collector(tmp, f"r{r}-{names.index(name)}", sink_port, counters, procs, learn_reqs,
                                    judged_reqs, n_learn, n_judged, tree)
                res[name].append(out)
                print(f"round {r}: {name}: {out}", file=sys.stderr)
    finally:
        sink.terminate()
    steps_all = steps_learn + steps_judged
    fl = statistics.median(floors)
    print(f"\n{a.instances} instances x ({a.learn} learning + {a.steps}) steps, {CORPUS} (6 spans a step), "
          f"{a.rounds} rounds; median [min-max]\n")
    print("| path | steps/s per core, whole stream | steps/s per core, after learning | CPU µs per step "
          "| steps judged after first model | evicted (budget / idle) |")
    print("|---|---|---|---|---|---|")
    print(f"| floor: protobuf decode + encode, in-process | {steps_all / fl:,.0f} | | {1e6 * fl / steps_all:.1f} | | |")
    for name, outs in res.items():
        whole = [steps_all / o["cpu_all"] for o in outs]
        after = [steps_judged / o["cpu_judged"] for o in outs]
        if arms[name][0]:
            # after the group's first model (min_train steps of the shared resource) every step must come back
            # judged: count judged steps against all steps but the first min_train ones of the fleet's model
            judged = f"{statistics.median(o['judged'] for o in outs):,.0f} of {steps_all - 200:,}"
        else:
            judged = "-"
        ev = outs[-1]["evicted"]
        print(f"| {name} | {statistics.median(whole):,.0f} [{min(whole):,.0f}-{max(whole):,.0f}] "
              f"| {statistics.median(after):,.0f} [{min(after):,.0f}-{max(after):,.0f}] "
              f"| {1e6 / statistics.median(whole):.1f} | {judged} | {ev.get('budget', 0)} / {ev.get('idle', 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
