"""OTLP/HTTP front end: ``POST /v1/traces`` with protobuf or JSON bodies, on asyncio streams.

A connection waits on the event loop, not on a worker thread, until its request head is complete;
the head must arrive within ``HEADER_TIMEOUT`` (``IDLE_TIMEOUT`` for the next request of a kept-alive
connection) and fit in ``MAX_HEAD`` bytes, or the connection is closed. So slow or idle clients cost
a coroutine each and hold nobody off; past ``MAX_CONNECTIONS`` open connections a new one gets 503 +
Retry-After at once.

Checks run before any body byte is read, in this order: credentials (401), method (405), path (404),
Content-Type (415), length (411 / 413), the pipelines' room (429 / 503 + Retry-After), the memory
budget's receive share (429 + Retry-After). Then the body (each read must make progress within
``IDLE_TIMEOUT``; 100-continue honoured), decoded and handed on by a worker thread (413 beyond the
limit after decompression, 400 when undecodable or truncated). Errors carry a ``google.rpc.Status``
in the request's encoding, as the OTLP spec asks; successes an ``ExportTraceServiceResponse``. The
``Server`` header names no versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import zlib
from http import HTTPStatus
from typing import Optional

from google.protobuf import json_format
from google.rpc.status_pb2 import Status

from prism_otel.collector.errors import Refused
from prism_otel.collector.memory import DECODED_FACTOR
from receivers.otlp.aio import LoopThread
from receivers.otlp.config import HTTPServerConfig, parse_endpoint
from receivers.otlp.decode import Malformed, decode_json, decode_protobuf

logger = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
SERVER = "prism-otel"
_GRPC_CODE = {400: 3, 401: 16, 404: 5, 405: 12, 408: 4, 411: 3, 413: 8, 415: 3, 429: 8, 431: 3, 500: 13, 503: 14}
HEADER_TIMEOUT = 10.0  # seconds for a whole request head
IDLE_TIMEOUT = 15.0  # a kept-alive connection's wait for its next request; a body read's wait for progress
MAX_HEAD = 64 << 10
MAX_CONNECTIONS = 1024
JSON_FACTOR = 8  # json.loads of OTLP/JSON holds ~5-8x the text as Python objects, on top of the protobuf


class _TooLarge(Exception):
    pass


class _Reply(Exception):
    """Answer with ``code`` and stop reading this connection (unless ``keep``)."""

    def __init__(self, code: int, message: str, headers=(), keep: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.headers, self.keep = code, message, tuple(headers), keep

    @classmethod
    def refused(cls, exc: Refused) -> _Reply:
        return cls(429 if exc.overloaded else 503, exc.reason,
                   (("Retry-After", str(max(1, math.ceil(exc.retry_after)))),))


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


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Reply(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Reply(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


class HTTPFrontEnd:
    def __init__(self, receiver, cfg: HTTPServerConfig, workers: int = 8) -> None:
        self.receiver = receiver
        self.cfg = cfg
        self.port = None
        self.connections = 0
        self._server: Optional[asyncio.base_events.Server] = None
        self._ssl = cfg.tls.ssl_context() if cfg.tls is not None else None
        self._loop = LoopThread("prism-otlp-http", workers)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        host, port = parse_endpoint(self.cfg.endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(512)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._loop.start()
        try:
            self._server = self._loop.call(self._start(sock))
        except BaseException:
            sock.close()
            self._loop.stop()
            raise
        logger.info("otlp receiver: HTTP listening on %s:%d%s", host, self.port, self.cfg.traces_url_path)

    async def _start(self, sock):
        return await asyncio.start_server(self._connection, sock=sock, ssl=self._ssl, limit=MAX_HEAD,
                                          ssl_handshake_timeout=HEADER_TIMEOUT if self._ssl else None)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            self._loop.loop.call_soon_threadsafe(server.close)
        self._loop.stop()

    # -- one connection ---------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\nServer: " + SERVER.encode() + b"\r\n\r\n")
            await self._close(writer)
            return
        self.connections += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            first = True
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                                  HEADER_TIMEOUT if first else IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return  # closed, idle, or too slow with its head: nothing to answer
                except asyncio.LimitOverrunError:
                    await self._send(writer, 431, f"request head over {MAX_HEAD} bytes", False, close=True)
                    return
                first = False
                as_json = False
                try:
                    method, target, version, headers = _parse_head(head)
                    as_json = (headers.get("content-type") or "").split(";")[0].strip().lower() == JSON
                    keep = await self._request(method, target, version, headers, as_json, reader, writer)
                except _Reply as rep:
                    await self._send(writer, rep.code, rep.message, as_json, rep.headers, close=not rep.keep)
                    keep = rep.keep
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.CancelledError):
            return  # the peer went away, or the receiver is stopping
        except Exception:  # noqa: BLE001 - one connection's failure is that connection's
            logger.warning("otlp http: a connection failed", exc_info=True)
            try:
                await self._send(writer, 500, "internal error", False, close=True)
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.connections -= 1
            await self._close(writer)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except Exception:  # noqa: BLE001 - the peer may be gone already
            pass

    async def _request(self, method, target, version, headers, as_json, reader, writer) -> bool:
        r, cfg = self.receiver, self.cfg
        if r.http_auth is not None and not r.http_auth.authenticate(headers.get(r.http_auth.header, "")):
            r.unauthenticated("http")
            raise _Reply(401, "missing or invalid bearer token")
        if method != "POST":
            raise _Reply(405, "only POST is supported", (("Allow", "POST"),))
        if target.split("?")[0] != cfg.traces_url_path:
            raise _Reply(404, f"unknown path {target}; traces go to {cfg.traces_url_path}")
        ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype not in (PROTOBUF, JSON):
            r.malformed("http", "content_type")
            raise _Reply(415, f"unsupported Content-Type {ctype!r} ({PROTOBUF} or {JSON})")
        chunked = (headers.get("transfer-encoding") or "").lower() == "chunked"
        length = headers.get("content-length")
        if not chunked and (length is None or not length.isdigit()):
            r.malformed("http", "length")
            raise _Reply(411, "Content-Length is required (or chunked transfer encoding)")
        n = 0 if chunked else int(length)
        if n > cfg.max_request_body_size:
            r.malformed("http", "too_large")
            raise _Reply(413, f"request body over {cfg.max_request_body_size} bytes")
        charge = max(n, 1 << 16) * (1 + DECODED_FACTOR + (JSON_FACTOR if ctype == JSON else 0))
        try:
            r.admit("http", n)
            r.reserve(charge, "http")
        except Refused as exc:
            raise _Reply.refused(exc) from None
        try:
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await (self._read_chunked(reader) if chunked else self._read_exact(reader, n))
            enc = (headers.get("content-encoding") or "").strip().lower()
            code, payload = await self._loop.work(self._handle, body, enc, ctype == JSON, charge)
        finally:
            r.budget.give(charge)
        keep = headers.get("connection", "").lower() != "close" and (
            version == "HTTP/1.1" or headers.get("connection", "").lower() == "keep-alive")
        await self._write(writer, code, payload, JSON if ctype == JSON else PROTOBUF, close=not keep)
        return keep

    async def _read_exact(self, reader: asyncio.StreamReader, n: int) -> bytes:
        parts, left = [], n
        while left:
            try:
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), IDLE_TIMEOUT)
            except asyncio.TimeoutError:
                self.receiver.malformed("http", "timeout")
                raise _Reply(408, "request body too slow") from None
            if not chunk:
                self.receiver.malformed("http", "decode")
                raise _Reply(400, f"body truncated: Content-Length {n}, got {n - left} bytes")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        limit = self.cfg.max_request_body_size
        parts, total = [], 0
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)
                size = int(line.split(b";")[0].strip(), 16)
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                self.receiver.malformed("http", "decode")
                raise _Reply(400, "bad chunk header") from None
            except asyncio.TimeoutError:
                raise _Reply(408, "request body too slow") from None
            if size == 0:
                while (await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                self.receiver.malformed("http", "too_large")
                raise _Reply(413, f"request body over {limit} bytes")
            parts.append(await self._read_exact(reader, size))
            await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)

    def _handle(self, body: bytes, enc: str, as_json: bool, charge: int):
        """Worker thread: inflate, decode, hand on. Returns (status, encoded response)."""
        r, limit = self.receiver, self.cfg.max_request_body_size
        extra, reply, req = 0, None, None
        try:
            if enc and enc != "identity":
                body = _inflate(body, enc, limit)
            # a compressed or chunked body's size is known only now: charge what was not yet
            extra = max(0, len(body) * (1 + DECODED_FACTOR + (JSON_FACTOR if as_json else 0)) - charge)
            if extra:
                r.reserve(extra, "http")
            try:
                req = decode_json(body) if as_json else decode_protobuf(body)
            except Malformed as exc:
                r.malformed("http", "decode")
                reply = _Reply(400, str(exc), keep=True)
            if reply is None:
                resp = r.accept(req, None if as_json else body, "http")
        except _TooLarge:
            r.malformed("http", "too_large")
            reply = _Reply(413, f"request body over {limit} bytes after decompression")
        except Malformed as exc:
            r.malformed("http", "decode")
            reply = _Reply(400, str(exc))
        except Refused as exc:
            reply = _Reply.refused(exc)
        finally:
            if extra:
                r.budget.give(extra)
        if reply is not None:
            req = None  # noqa: F841 - the traceback of what follows must not hold the request
            del body
            raise reply
        if as_json:
            return 200, json.dumps(json_format.MessageToDict(resp)).encode()
        return 200, resp.SerializeToString()

    # -- answers ----------------------------------------------------------------------------------
    async def _send(self, writer, code: int, message: str, as_json: bool, headers=(), close: bool = False) -> None:
        st = Status(code=_GRPC_CODE.get(code, 2), message=message)
        if as_json:
            await self._write(writer, code, json.dumps(json_format.MessageToDict(st)).encode(), JSON, headers, close)
        else:
            await self._write(writer, code, st.SerializeToString(), PROTOBUF, headers, close)

    async def _write(self, writer, code: int, body: bytes, ctype: str, headers=(), close: bool = False) -> None:
        lines = [f"HTTP/1.1 {code} {HTTPStatus(code).phrase}", f"Server: {SERVER}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in self.cfg.response_headers.items()]
        lines += [f"{k}: {v}" for k, v in headers]
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
