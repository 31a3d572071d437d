"""Config of the ``otlp`` receiver: the Collector's keys, the Collector's defaults (loopback).

```yaml
receivers:
  otlp:
    protocols:
      grpc:                     # written with no value: on, with defaults
        endpoint: localhost:4317
        max_recv_msg_size_mib: 4
        max_concurrent_streams: 0       # 0: grpc's default
        tls: {cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt}
        auth: {authenticator: bearertokenauth}
      http:
        endpoint: localhost:4318
        traces_url_path: /v1/traces
        max_request_body_size: 20971520  # bytes; larger requests get 413
        response_headers: {X-Served-By: prism}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from prism_otel.collector.decode import check
from prism_otel.collector.errors import ConfigError
from prism_otel.collector.tls import AuthConfig, TLSServerConfig


def parse_endpoint(endpoint: str, key: str = "endpoint") -> tuple[str, int]:
    """``host:port`` → (bind address, port). ``localhost`` binds 127.0.0.1; ``:4317`` all interfaces."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(key, f"expected host:port, got {endpoint!r}")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 - the user asked for all interfaces
        host = "0.0.0.0"  # noqa: S104
    elif host == "localhost":
        host = "127.0.0.1"
    return host, int(port)


@dataclass
class GRPCServerConfig:
    endpoint: str = "localhost:4317"
    max_recv_msg_size_mib: int = 4
    max_concurrent_streams: int = 0
    tls: Optional[TLSServerConfig] = None
    auth: Optional[AuthConfig] = None

    def validate(self) -> None:
        parse_endpoint(self.endpoint)
        check(self.max_recv_msg_size_mib > 0, "max_recv_msg_size_mib", "must be greater than 0")
        check(self.max_concurrent_streams >= 0, "max_concurrent_streams", "must not be negative")


@dataclass
class HTTPServerConfig:
    endpoint: str = "localhost:4318"
    traces_url_path: str = "/v1/traces"
    max_request_body_size: int = 20 << 20
    response_headers: dict[str, str] = field(default_factory=dict)
    tls: Optional[TLSServerConfig] = None
    auth: Optional[AuthConfig] = None

    def validate(self) -> None:
        parse_endpoint(self.endpoint)
        check(self.traces_url_path.startswith("/"), "traces_url_path", "must start with /")
        check(self.max_request_body_size > 0, "max_request_body_size", "must be greater than 0")


@dataclass
class ProtocolsConfig:
    grpc: Optional[GRPCServerConfig] = None
    http: Optional[HTTPServerConfig] = None


@dataclass
class OTLPReceiverConfig:
    protocols: ProtocolsConfig = field(default_factory=ProtocolsConfig)

    def validate(self) -> None:
        p = self.protocols
        check(p.grpc is not None or p.http is not None, "protocols",
              "must specify at least one protocol when using the OTLP receiver (grpc, http)")
        if p.grpc is not None and p.http is not None and parse_endpoint(p.grpc.endpoint) == parse_endpoint(
                p.http.endpoint) and parse_endpoint(p.grpc.endpoint)[1] != 0:
            raise ConfigError("protocols::http::endpoint", "same endpoint as protocols::grpc::endpoint")
