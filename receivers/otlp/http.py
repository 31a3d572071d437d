"""OTLP/HTTP front end: ``POST /v1/traces`` with protobuf or JSON bodies, on the standard library.

Bounded: a fixed pool of handler threads and a short backlog of accepted connections waiting for
one; beyond that a connection gets 503 + Retry-After at once. Bodies are read only up to
``max_request_body_size`` (413 beyond, decompressed size included); a body shorter than its
Content-Length, or undecodable, gets 400. Errors carry a ``google.rpc.Status`` in the request's
encoding, as the OTLP spec asks; successes an ``ExportTraceServiceResponse``.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Optional

from google.protobuf import json_format
from google.rpc.status_pb2 import Status

from prism_otel.collector.errors import Refused
from receivers.otlp.config import HTTPServerConfig, parse_endpoint
from receivers.otlp.receiver import Malformed, decode_json, decode_protobuf

logger = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_GRPC_CODE = {400: 3, 401: 16, 404: 5, 405: 12, 411: 3, 413: 8, 415: 3, 429: 8, 503: 14}


class _TooLarge(Exception):
    pass


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise Malformed(f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Malformed(f"cannot decompress {encoding} body: {exc}") from None
    if len(out) > limit:
        raise _TooLarge()
    if not d.eof:
        raise Malformed(f"truncated {encoding} body")
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "prism-otel"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    timeout = 15  # seconds a keep-alive connection may sit idle, and a slow body may take

    def log_message(self, fmt, *args) -> None:  # no per-request logs; the receiver counts
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers=(), close: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in self.server.front.cfg.response_headers.items():
            self.send_header(k, v)
        for k, v in headers:
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, as_json: bool, headers=(), close: bool = False) -> None:
        st = Status(code=_GRPC_CODE.get(code, 2), message=message)
        if as_json:
            body = json.dumps(json_format.MessageToDict(st)).encode()
            self._send(code, body, JSON, headers, close)
        else:
            self._send(code, st.SerializeToString(), PROTOBUF, headers, close)

    def do_GET(self) -> None:  # noqa: N802
        self._error(405, "only POST is supported", False, (("Allow", "POST"),))

    do_PUT = do_DELETE = do_PATCH = do_GET

    def do_POST(self) -> None:  # noqa: N802
        front = self.server.front
        r, cfg = front.receiver, front.cfg
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        as_json = ctype == JSON
        length = self.headers.get("Content-Length")
        if self.path.split("?")[0] != cfg.traces_url_path:
            self._drain(length)
            self._error(404, f"unknown path {self.path}; traces go to {cfg.traces_url_path}", as_json)
            return
        if r.http_auth is not None and not r.http_auth.authenticate(self.headers.get(r.http_auth.header, "")):
            r.unauthenticated("http")
            self._error(401, "missing or invalid bearer token", as_json, close=True)
            return
        if ctype not in (PROTOBUF, JSON):
            r.malformed("http", "content_type")
            self._error(415, f"unsupported Content-Type {ctype!r} ({PROTOBUF} or {JSON})", False, close=True)
            return
        try:
            body = self._read_body(length, cfg.max_request_body_size)
            r.admit("http")
            enc = (self.headers.get("Content-Encoding") or "").strip().lower()
            if enc and enc != "identity":
                body = _inflate(body, enc, cfg.max_request_body_size)
            req = decode_json(body) if as_json else decode_protobuf(body)
        except _TooLarge:
            r.malformed("http", "too_large")
            self._error(413, f"request body over {cfg.max_request_body_size} bytes", as_json, close=True)
            return
        except Malformed as exc:
            r.malformed("http", "decode")
            self._error(400, str(exc), as_json, close=self.close_connection)
            return
        except Refused as exc:
            self._refuse(exc, as_json)
            return
        try:
            resp = r.accept(req, None if as_json else body, "http")
        except Refused as exc:
            self._refuse(exc, as_json)
            return
        if as_json:
            payload = json.dumps(json_format.MessageToDict(resp)).encode()
            self._send(200, payload, JSON)
        else:
            self._send(200, resp.SerializeToString(), PROTOBUF)

    def _refuse(self, exc: Refused, as_json: bool) -> None:
        code = 429 if exc.overloaded else 503
        self._error(code, exc.reason, as_json, (("Retry-After", str(max(1, math.ceil(exc.retry_after)))),))

    def _drain(self, length: Optional[str]) -> None:
        if length and length.isdigit() and int(length) <= self.server.front.cfg.max_request_body_size:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _read_body(self, length: Optional[str], limit: int) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            return self._read_chunked(limit)
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise Malformed("Content-Length is required (or chunked transfer encoding)")
        n = int(length)
        if n > limit:
            self.close_connection = True
            raise _TooLarge()
        try:
            body = self.rfile.read(n)
        except (socket.timeout, OSError):
            body = b""
        if len(body) < n:
            self.close_connection = True
            raise Malformed(f"body truncated: Content-Length {n}, got {len(body)} bytes")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise Malformed("bad chunk header") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                raise _TooLarge()
            chunk = self.rfile.read(size)
            self.rfile.readline(8)
            if len(chunk) < size:
                self.close_connection = True
                raise Malformed("chunked body truncated")
            parts.append(chunk)


class _Server(HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, front, family) -> None:
        self.address_family = family
        self.front = front
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address) -> None:
        try:
            self.front.pending.put_nowait((request, client_address))
        except queue.Full:
            self.front.busy(request)

    def handle_error(self, request, client_address) -> None:
        logger.debug("otlp http: error on a connection from %s", client_address, exc_info=True)


class HTTPFrontEnd:
    def __init__(self, receiver, cfg: HTTPServerConfig, workers: int = 16, backlog: int = 64) -> None:
        self.receiver = receiver
        self.cfg = cfg
        self.workers = workers
        self.pending: "queue.Queue" = queue.Queue(maxsize=backlog)
        self.port = None
        self._server: Optional[_Server] = None
        self._threads = []
        self._lock = threading.Lock()
        self._active = set()
        self._ssl = cfg.tls.ssl_context() if cfg.tls is not None else None

    def start(self) -> None:
        host, port = parse_endpoint(self.cfg.endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server((host, port), self, family)
        self.port = self._server.server_address[1]
        threads = [threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                    name="prism-otlp-http-accept", daemon=True)]
        threads += [threading.Thread(target=self._work, name=f"prism-otlp-http-{i}", daemon=True)
                    for i in range(self.workers)]
        for t in threads:
            t.start()
        self._threads = threads
        logger.info("otlp receiver: HTTP listening on %s:%d%s", host, self.port, self.cfg.traces_url_path)

    def _work(self) -> None:
        server = self._server
        while True:
            item = self.pending.get()
            if item is None:
                return
            sock, addr = item
            with self._lock:
                self._active.add(sock)
            try:
                if self._ssl is not None:
                    sock.settimeout(_Handler.timeout)
                    sock = self._ssl.wrap_socket(sock, server_side=True)
                server.finish_request(sock, addr)
            except Exception:  # noqa: BLE001 - one connection's failure is that connection's
                logger.debug("otlp http: connection from %s failed", addr, exc_info=True)
            finally:
                with self._lock:
                    self._active.discard(item[0])
                server.shutdown_request(sock)

    def busy(self, sock) -> None:
        """Every handler is taken: answer 503 + Retry-After without reading the request."""
        try:
            if self._ssl is None:
                sock.settimeout(0.5)
                sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
        except OSError:
            pass
        finally:
            self._server.shutdown_request(sock)

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            for sock in list(self._active):  # idle keep-alive connections: end them now
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        while True:
            try:
                sock, _ = self.pending.get_nowait()
            except queue.Empty:
                break
            server.shutdown_request(sock)
        for _ in range(self.workers):
            self.pending.put(None)
        self._server = None
