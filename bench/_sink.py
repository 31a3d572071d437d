"""A counting OTLP gRPC trace server for benchmarks (separate process): `python _sink.py PORTFILE`."""

import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    spans = 0

    def Export(self, request, context):  # noqa: N802
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                Sink.spans += len(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(sys.argv[1], "w") as f:
        f.write(str(port))
    threading.Event().wait()


if __name__ == "__main__":
    main()
