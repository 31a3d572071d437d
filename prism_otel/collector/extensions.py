"""Extensions: ``file_storage`` (where persistent queues live) and ``bearertokenauth``.

Both keep the Collector's type names and keys (a subset: what we honour). An extension must be
configured under ``extensions:`` and enabled in ``service.extensions`` before a component can
reference it (``sending_queue.storage: file_storage``, ``auth: {authenticator: bearertokenauth}``).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field

from prism_otel.collector.component import EXTENSION, Factory
from prism_otel.collector.decode import Duration, check
from prism_otel.collector.errors import ConfigError


@dataclass
class FileStorageConfig:
    directory: str = ""
    fsync: bool = False  # as the Collector: page cache survives a process crash; fsync also survives power loss
    create_directory: bool = False
    timeout: Duration = Duration(1.0)

    def validate(self) -> None:
        check(bool(self.directory), "directory", "set the directory persistent queues are kept in")
        if not self.create_directory and not os.path.isdir(self.directory):
            raise ConfigError("directory", f"{self.directory!r} does not exist (or set create_directory: true)")


class FileStorage:
    def __init__(self, settings, cfg: FileStorageConfig) -> None:
        self.id = settings.id
        self.directory = os.path.abspath(cfg.directory)
        self.fsync = cfg.fsync
        self.create_directory = cfg.create_directory

    def start(self, host) -> None:
        if self.create_directory:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def shutdown(self) -> None:
        pass

    def path_for(self, *parts: str) -> str:
        safe = [p.replace("/", "_").replace(os.sep, "_") for p in parts]
        path = os.path.join(self.directory, *safe)
        os.makedirs(path, mode=0o700, exist_ok=True)  # queue files hold the tenants' spans: owner only
        return path


@dataclass
class BearerTokenAuthConfig:
    scheme: str = "Bearer"
    header: str = "Authorization"
    token: str = ""
    tokens: list[str] = field(default_factory=list)
    filename: str = ""

    def validate(self) -> None:
        n = bool(self.token) + bool(self.tokens) + bool(self.filename)
        check(n == 1, "token", "set exactly one of token, tokens or filename")
        if self.filename and not os.access(self.filename, os.R_OK):
            raise ConfigError("filename", f"cannot read {self.filename!r}")


class BearerTokenAuth:
    """Server side: ``authenticate(header_value)``; client side: ``client_header()``."""

    def __init__(self, settings, cfg: BearerTokenAuthConfig) -> None:
        self.header = cfg.header.lower()
        self.scheme = cfg.scheme
        self._cfg = cfg
        self._tokens: list[str] = []

    def start(self, host) -> None:
        cfg = self._cfg
        if cfg.filename:
            with open(cfg.filename, encoding="utf-8") as fh:
                self._tokens = [fh.read().strip()]
        else:
            self._tokens = [cfg.token] if cfg.token else list(cfg.tokens)

    def shutdown(self) -> None:
        pass

    def _expected(self, token: str) -> str:
        return f"{self.scheme} {token}" if self.scheme else token

    def authenticate(self, value: str) -> bool:
        value = value or ""
        return any(hmac.compare_digest(value.encode(), self._expected(t).encode()) for t in self._tokens)

    def client_header(self):
        return self.header, self._expected(self._tokens[0])


def file_storage_factory() -> Factory:
    return Factory("file_storage", EXTENSION, FileStorageConfig, FileStorage)


def bearer_token_factory() -> Factory:
    return Factory("bearertokenauth", EXTENSION, BearerTokenAuthConfig, BearerTokenAuth)
