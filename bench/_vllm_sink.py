"""OTLP gRPC trace server for bench/vllm_overhead.py (separate process): counts spans and keeps the
``prism.step`` durations. ``python _vllm_sink.py PORTFILE OUT.json``; on SIGTERM writes
``{"spans": n, "step_ms": [[phase, ms], ...]}`` to OUT.json and exits."""

import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

STATE = {"spans": 0, "step_ms": []}
LOCK = threading.Lock()


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):  # noqa: N802 - gRPC method name
        n, steps = 0, []
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    n += 1
                    if s.name == "prism.step":
                        phase = next((a.value.string_value for a in s.attributes if a.key == "prism.step.phase"), "")
                        steps.append((phase, (s.end_time_unix_nano - s.start_time_unix_nano) / 1e6))
        with LOCK:
            STATE["spans"] += n
            STATE["step_ms"].extend(steps)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    portfile, out = sys.argv[1], sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with open(portfile, "w") as f:
        f.write(str(port))
    done.wait()
    server.stop(grace=None)
    with LOCK, open(out, "w") as f:
        json.dump(STATE, f)


if __name__ == "__main__":
    main()
