"""TLS and authentication settings shared by receivers (server side) and exporters (client side).

Keys follow the Collector's ``configtls`` / ``configauth``: a server ``tls`` block has ``cert_file``,
``key_file``, ``client_ca_file`` (require client certificates) and ``min_version``; a client ``tls``
block has ``insecure``, ``insecure_skip_verify``, ``ca_file``, ``cert_file``, ``key_file`` and
``server_name_override``; ``auth: {authenticator: <extension id>}`` points at a configured and enabled
extension (``bearertokenauth``).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Literal, Optional

from prism_otel.collector.decode import check
from prism_otel.collector.errors import ConfigError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _readable(path: str, key: str) -> None:
    if path and not os.access(path, os.R_OK):
        raise ConfigError(key, f"cannot read {path!r}")


@dataclass
class TLSServerConfig:
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    min_version: Literal["1.2", "1.3"] = "1.2"

    def validate(self) -> None:
        check(bool(self.cert_file), "cert_file", "a server tls block needs cert_file and key_file")
        check(bool(self.key_file), "key_file", "a server tls block needs cert_file and key_file")
        for key in ("cert_file", "key_file", "client_ca_file"):
            _readable(getattr(self, key), key)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _VERSIONS[self.min_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def pem(self) -> tuple[bytes, bytes, Optional[bytes]]:
        """(key, cert, client CA or None) as bytes, for grpc.ssl_server_credentials."""
        with open(self.key_file, "rb") as k, open(self.cert_file, "rb") as c:
            key, cert = k.read(), c.read()
        ca = None
        if self.client_ca_file:
            with open(self.client_ca_file, "rb") as f:
                ca = f.read()
        return key, cert, ca


@dataclass
class TLSClientConfig:
    insecure: bool = False
    insecure_skip_verify: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name_override: str = ""

    def validate(self) -> None:
        check(bool(self.cert_file) == bool(self.key_file), "cert_file", "cert_file and key_file go together")
        for key in ("ca_file", "cert_file", "key_file"):
            _readable(getattr(self, key), key)


@dataclass
class AuthConfig:
    authenticator: str = ""

    def validate(self) -> None:
        check(bool(self.authenticator), "authenticator", "names the auth extension to use (e.g. bearertokenauth)")
