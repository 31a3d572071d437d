"""OTLP/gRPC front end: the generated ``TraceServiceServicer`` contract on a grpcio server.

The method is registered with a pass-through request deserializer, so the handler sees the raw
bytes: an undecodable request gets INVALID_ARGUMENT (grpcio would answer INTERNAL if its own
deserializer failed) and the bytes go to the persistent queue without being encoded again.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from google.protobuf.duration_pb2 import Duration as PBDuration
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel.collector.errors import Refused
from receivers.otlp.config import GRPCServerConfig, parse_endpoint
from receivers.otlp.receiver import Malformed, decode_protobuf

logger = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
RETRY_INFO_KEY = "google.rpc.retryinfo-bin"


def retry_info(seconds: float) -> bytes:
    from google.rpc.error_details_pb2 import RetryInfo

    d = PBDuration()
    d.FromNanoseconds(int(seconds * 1e9))
    return RetryInfo(retry_delay=d).SerializeToString()


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver) -> None:
        self.receiver = receiver

    def Export(self, request: bytes, context):  # noqa: N802 - the gRPC method name
        r = self.receiver
        if r.grpc_auth is not None:
            md = dict(context.invocation_metadata())
            if not r.grpc_auth.authenticate(md.get(r.grpc_auth.header, "")):
                r.unauthenticated("grpc")
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        try:
            r.admit("grpc")
        except Refused as exc:
            self._refuse(context, exc)
        try:
            req = decode_protobuf(request)
        except Malformed as exc:
            r.malformed("grpc", "decode")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            return r.accept(req, request, "grpc")
        except Refused as exc:
            self._refuse(context, exc)

    @staticmethod
    def _refuse(context, exc: Refused) -> None:
        context.set_trailing_metadata(((RETRY_INFO_KEY, retry_info(exc.retry_after)),))
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.overloaded else grpc.StatusCode.UNAVAILABLE
        context.abort(code, f"{exc.reason}; retry after {exc.retry_after:g}s")


class GRPCFrontEnd:
    def __init__(self, receiver, cfg: GRPCServerConfig, workers: int = 8) -> None:
        self.receiver = receiver
        self.cfg = cfg
        self.workers = workers
        self.port = None
        self._server = None

    def start(self) -> None:
        cfg = self.cfg
        options = [("grpc.max_receive_message_length", cfg.max_recv_msg_size_mib << 20),
                   ("grpc.so_reuseport", 0)]
        if cfg.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", cfg.max_concurrent_streams))
        servicer = _Servicer(self.receiver)
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(
                servicer.Export, request_deserializer=None,
                response_serializer=ExportTraceServiceResponse.SerializeToString)})
        # Requests beyond the workers queue in grpc core; beyond this bound grpc answers RESOURCE_EXHAUSTED.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="prism-otlp-grpc"),
                             handlers=(handler,), options=options, maximum_concurrent_rpcs=self.workers * 8)
        host, port = parse_endpoint(cfg.endpoint)
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if cfg.tls is not None:
                key, cert, ca = cfg.tls.pem()
                creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                    require_client_auth=ca is not None)
                bound = server.add_secure_port(addr, creds)
            else:
                bound = server.add_insecure_port(addr)
        except RuntimeError as exc:  # grpcio reports a bind failure this way
            raise OSError(str(exc)) from None
        if not bound:
            raise OSError(f"address {addr} is not available")
        server.start()
        self._server = server
        self.port = bound
        logger.info("otlp receiver: gRPC listening on %s:%d", host, bound)

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1.0)
            self._server = None
