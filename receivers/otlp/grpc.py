"""OTLP/gRPC front end: ``TraceService/Export`` on a grpc.aio server.

The method is served as a request stream of raw bytes, so the handler runs as soon as a call's
headers arrive and before its message is read:

1. bearer token (if configured): a bad or missing one ends the call with UNAUTHENTICATED at once,
   nothing is read;
2. room: a full pipeline intake, or more than ``MAX_OPEN_CALLS`` calls open, or the receive share
   of the memory budget in use, is RESOURCE_EXHAUSTED (UNAVAILABLE when shutting down) with
   ``google.rpc.RetryInfo``;
3. the message, within ``read_timeout`` (a call that never sends one is ended with
   DEADLINE_EXCEEDED, retryable);
4. its bytes are charged to the memory budget (RESOURCE_EXHAUSTED + RetryInfo when they do not
   fit), then decoded and handed on by a worker thread. Undecodable bytes are INVALID_ARGUMENT
   (grpcio would answer INTERNAL if its own deserializer failed); the bytes go to a persistent queue
   without being encoded again.

A call waiting for its message costs a coroutine, not a thread: half-open calls do not hold off
others, and grpc itself never answers RESOURCE_EXHAUSTED without a retry hint (its concurrency limit
is not used). Oversized messages are still refused by grpc core (RESOURCE_EXHAUSTED, not retryable).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import grpc
from google.protobuf.duration_pb2 import Duration as PBDuration
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel.collector.errors import Refused
from prism_otel.collector.memory import DECODED_FACTOR
from receivers.otlp.aio import LoopThread
from receivers.otlp.config import GRPCServerConfig, parse_endpoint
from receivers.otlp.decode import Malformed, decode_protobuf

logger = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
RETRY_INFO_KEY = "google.rpc.retryinfo-bin"
MAX_OPEN_CALLS = 4096


def retry_info(seconds: float) -> bytes:
    from google.rpc.error_details_pb2 import RetryInfo

    d = PBDuration()
    d.FromNanoseconds(int(seconds * 1e9))
    return RetryInfo(retry_delay=d).SerializeToString()


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, retry_after: Optional[float] = None) -> None:
        super().__init__(details)
        self.code, self.details, self.retry_after = code, details, retry_after

    @classmethod
    def refused(cls, exc: Refused) -> _Abort:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.overloaded else grpc.StatusCode.UNAVAILABLE
        return cls(code, f"{exc.reason}; retry after {exc.retry_after:g}s", exc.retry_after)


class GRPCFrontEnd:
    def __init__(self, receiver, cfg: GRPCServerConfig, workers: int = 8, read_timeout: float = 30.0) -> None:
        self.receiver = receiver
        self.cfg = cfg
        self.read_timeout = read_timeout
        self.port = None
        self._server = None
        self._open = 0
        self._loop = LoopThread("prism-otlp-grpc", workers)

    # -- one call ---------------------------------------------------------------------------------
    async def _export(self, request_iterator, context):
        self._open += 1
        try:
            return await self._serve(request_iterator, context)
        except _Abort as a:
            abort = a
        finally:
            self._open -= 1
        # Answer outside the except block, the traceback dropped: its frames hold the request's bytes,
        # and a chained exception kept alive by grpc would keep them until the cyclic GC runs.
        abort.__traceback__ = None
        if abort.retry_after is not None:
            context.set_trailing_metadata(((RETRY_INFO_KEY, retry_info(abort.retry_after)),))
        await context.abort(abort.code, abort.details)

    async def _serve(self, request_iterator, context):
        r = self.receiver
        if r.grpc_auth is not None:
            md = dict(context.invocation_metadata() or ())
            if not r.grpc_auth.authenticate(md.get(r.grpc_auth.header, "")):
                r.unauthenticated("grpc")
                raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        try:
            if self._open > MAX_OPEN_CALLS:
                exc = Refused("too many calls open", 1.0)
                r.refused("grpc", exc)
                raise exc
            r.admit("grpc")
            r.memory_room("grpc")
        except Refused as exc:
            raise _Abort.refused(exc) from None
        try:
            raw = await asyncio.wait_for(request_iterator.__anext__(), self.read_timeout)
        except StopAsyncIteration:  # no message: the client sent none, or grpc refused it (over the size limit)
            r.malformed("grpc", "no_message")
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message") from None
        except asyncio.TimeoutError:
            r.malformed("grpc", "timeout")
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"request message not received within {self.read_timeout:g}s", 1.0) from None
        charge = len(raw) * (1 + DECODED_FACTOR)
        try:
            r.reserve(charge, "grpc")
        except Refused as exc:
            raise _Abort.refused(exc) from None
        try:
            return await self._loop.work(self._accept, raw)
        finally:
            r.budget.give(charge)
            raw = None  # not kept alive by a traceback  # noqa: F841

    def _accept(self, raw: bytes) -> ExportTraceServiceResponse:
        r = self.receiver
        try:
            r.admit("grpc", len(raw))  # again, with the size: the intake may have filled while it arrived
            req = decode_protobuf(raw)
            return r.accept(req, raw, "grpc")
        except Malformed as exc:
            r.malformed("grpc", "decode")
            abort = _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Refused as exc:
            abort = _Abort.refused(exc)
        req = None  # noqa: F841 - the traceback of what follows must not hold the request
        del raw
        raise abort

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop.start()
        try:
            self.port = self._loop.call(self._start())
        except BaseException:
            self._loop.stop()
            raise
        host = parse_endpoint(self.cfg.endpoint)[0]
        logger.info("otlp receiver: gRPC listening on %s:%d", host, self.port)

    async def _start(self) -> int:
        cfg = self.cfg
        options = [("grpc.max_receive_message_length", cfg.max_recv_msg_size_mib << 20), ("grpc.so_reuseport", 0)]
        if cfg.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", cfg.max_concurrent_streams))
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Export": grpc.stream_unary_rpc_method_handler(
                self._export, request_deserializer=None,
                response_serializer=ExportTraceServiceResponse.SerializeToString)})
        server = grpc.aio.server(handlers=(handler,), options=options)
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
        await server.start()
        self._server = server
        return bound

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            try:
                self._loop.call(server.stop(grace), timeout=grace + 5.0)
            except Exception:  # noqa: BLE001 - stopping anyway
                logger.debug("otlp grpc: stop failed", exc_info=True)
        self._loop.stop()
