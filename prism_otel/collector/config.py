"""The collector's config: the OpenTelemetry Collector's YAML format, checked before anything starts.

```yaml
extensions:   {file_storage: {directory: ./prism-data, create_directory: true}}
receivers:    {otlp: {protocols: {grpc: {endpoint: localhost:4317}, http: }}}
processors:   {prism_anomaly: {}}
exporters:    {otlp_grpc/backend: {endpoint: localhost:14317, tls: {insecure: true},
                                   sending_queue: {storage: file_storage}}}
service:
  extensions: [file_storage]
  pipelines:
    traces: {receivers: [otlp], processors: [prism_anomaly], exporters: [otlp_grpc/backend]}
```

:func:`load` reads a file (``${env:VAR}`` expanded), decodes every component's block onto its
config dataclass (unknown keys are errors) and checks the service graph. Every problem is a
:class:`~prism_otel.collector.errors.ConfigError` whose path points at the YAML node, e.g.
``service::pipelines::traces::exporters::0: references exporter "x" which is not configured``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from prism_otel.collector import registry
from prism_otel.collector.component import EXPORTER, EXTENSION, KIND_SECTIONS, PROCESSOR, RECEIVER, ComponentID, Factory
from prism_otel.collector.confmap import expand, load_file
from prism_otel.collector.decode import decode
from prism_otel.collector.errors import ConfigError, join_path
from prism_otel.collector.memory import MemoryConfig

logger = logging.getLogger(__name__)

_TOP_KEYS = ("receivers", "processors", "exporters", "extensions", "connectors", "service")


@dataclass
class PipelineConfig:
    receivers: list[str] = field(default_factory=list)
    processors: list[str] = field(default_factory=list)
    exporters: list[str] = field(default_factory=list)


@dataclass
class LogsConfig:
    level: Literal["debug", "info", "warn", "error"] = "info"


@dataclass
class TelemetryConfig:
    logs: LogsConfig = field(default_factory=LogsConfig)


@dataclass
class ComponentConfig:
    id: ComponentID
    factory: Factory
    config: Any


@dataclass
class CollectorConfig:
    receivers: dict[str, ComponentConfig]
    processors: dict[str, ComponentConfig]
    exporters: dict[str, ComponentConfig]
    extensions: dict[str, ComponentConfig]
    enabled_extensions: list[str]
    pipelines: dict[str, PipelineConfig]
    telemetry: TelemetryConfig
    source: str = "<config>"
    memory: MemoryConfig = field(default_factory=MemoryConfig)


def _components(section: str, kind: str, data: Any) -> dict[str, ComponentConfig]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(section, f"expected a mapping of component ids, got {type(data).__name__}")
    out = {}
    for key, body in data.items():
        path = join_path(section, str(key))
        cid = ComponentID.parse(key, path)
        factory = registry.lookup(kind, cid.type)
        if factory is None:
            known = ", ".join(registry.types(kind)) or "(none)"
            raise ConfigError(path, f"unknown {kind} type {cid.type!r} (available: {known})")
        if cid.type != factory.type:
            logger.warning("%s: %r is the deprecated name of %r", path, cid.type, factory.type)
        cls = factory.config_class
        conf = cls.from_yaml(body, path) if hasattr(cls, "from_yaml") else decode(cls, body, path)
        out[str(cid)] = ComponentConfig(cid, factory, conf)
    return out


def _check_refs(path: str, kind: str, refs: list[str], known: Mapping[str, Any]) -> None:
    seen = set()
    for i, ref in enumerate(refs):
        p = join_path(path, str(i))
        if ref in seen:
            raise ConfigError(p, f"references {kind} {ref!r} more than once")
        seen.add(ref)
        if ref not in known:
            raise ConfigError(p, f"references {kind} {ref!r} which is not configured")


def _extension_refs(comp: ComponentConfig, section: str) -> list[tuple]:
    """(yaml path, extension id, wanted type) for each extension a component's config points at."""
    out = []
    cfg = comp.config
    for proto in ("grpc", "http"):
        server = getattr(getattr(cfg, "protocols", None), proto, None)
        auth = getattr(server, "auth", None)
        if auth is not None:
            out.append((join_path(section, str(comp.id), "protocols", proto, "auth", "authenticator"),
                        auth.authenticator, "bearertokenauth"))
    auth = getattr(cfg, "auth", None)
    if auth is not None:
        out.append((join_path(section, str(comp.id), "auth", "authenticator"), auth.authenticator, "bearertokenauth"))
    queue = getattr(cfg, "sending_queue", None)
    if queue is not None and queue.storage:
        out.append((join_path(section, str(comp.id), "sending_queue", "storage"), queue.storage, "file_storage"))
    return out


def _validate_graph(c: CollectorConfig) -> None:
    if not c.pipelines:
        raise ConfigError("service::pipelines", "at least one pipeline is required (traces)")
    for i, ext in enumerate(c.enabled_extensions):
        if ext not in c.extensions:
            raise ConfigError(f"service::extensions::{i}", f"references extension {ext!r} which is not configured")
    for section, comps in (("receivers", c.receivers), ("exporters", c.exporters)):
        for comp in comps.values():
            for path, ref, want in _extension_refs(comp, section):
                if ref not in c.extensions:
                    raise ConfigError(path, f"references extension {ref!r} which is not configured")
                if ref not in c.enabled_extensions:
                    raise ConfigError(path, f"extension {ref!r} is not enabled in service::extensions")
                if c.extensions[ref].factory.type != want:
                    raise ConfigError(path, f"extension {ref!r} is a {c.extensions[ref].factory.type}, not {want}")
    for name, p in c.pipelines.items():
        base = join_path("service", "pipelines", name)
        if not p.receivers:
            raise ConfigError(join_path(base, "receivers"), "a pipeline needs at least one receiver")
        if not p.exporters:
            raise ConfigError(join_path(base, "exporters"), "a pipeline needs at least one exporter")
        _check_refs(join_path(base, "receivers"), "receiver", p.receivers, c.receivers)
        _check_refs(join_path(base, "processors"), "processor", p.processors, c.processors)
        _check_refs(join_path(base, "exporters"), "exporter", p.exporters, c.exporters)
        storages = {c.exporters[e].config.sending_queue.storage for e in p.exporters
                    if getattr(c.exporters[e].config, "sending_queue", None) is not None
                    and c.exporters[e].config.sending_queue.storage}
        if len(storages) > 1:
            raise ConfigError(join_path(base, "exporters"),
                              f"exporters of one pipeline must share one storage, got {sorted(storages)}")
        registry.validate_pipeline([c.processors[x] for x in p.processors], join_path(base, "processors"))
    endpoints: dict[tuple, str] = {}
    for rid, comp in c.receivers.items():
        for proto in ("grpc", "http"):
            server = getattr(getattr(comp.config, "protocols", None), proto, None)
            if server is None:
                continue
            from receivers.otlp.config import parse_endpoint

            addr = parse_endpoint(server.endpoint)
            path = f"receivers::{rid}::protocols::{proto}::endpoint"
            if addr[1] and addr in endpoints:
                raise ConfigError(path, f"{server.endpoint} is already used by {endpoints[addr]}")
            endpoints[addr] = path


def from_dict(data: Mapping[str, Any], source: str = "<config>", env: Optional[Mapping[str, str]] = None,
              expanded: bool = False) -> CollectorConfig:
    """Build and check a config from an already-parsed YAML mapping."""
    if not expanded:
        data = expand(dict(data), "", env)
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(str(key), f"unknown top-level key (valid: {', '.join(_TOP_KEYS)})")
    if data.get("connectors"):
        raise ConfigError("connectors", "connectors are not supported by the prism collector")
    service = data.get("service")
    if not isinstance(service, dict):
        raise ConfigError("service", "required: a mapping with pipelines")
    for key in service:
        if key not in ("extensions", "pipelines", "telemetry", "memory"):
            raise ConfigError(join_path("service", str(key)), "unknown key (valid keys here: extensions, memory, "
                                                              "pipelines, telemetry)")
    pipelines: dict[str, PipelineConfig] = {}
    raw_pipes = service.get("pipelines") or {}
    if not isinstance(raw_pipes, dict):
        raise ConfigError("service::pipelines", "expected a mapping of pipeline ids")
    for pid, body in raw_pipes.items():
        path = join_path("service", "pipelines", str(pid))
        signal = ComponentID.parse(pid, path).type
        if signal not in ("traces", "metrics", "logs", "profiles"):
            raise ConfigError(path, f"unknown signal {signal!r} in pipeline id (traces, metrics, logs)")
        if signal != "traces":
            raise ConfigError(path, f"{signal} pipelines are not supported: the prism collector handles traces")
        pipelines[str(pid)] = decode(PipelineConfig, body, path)
    enabled = service.get("extensions") or []
    if not isinstance(enabled, list):
        raise ConfigError("service::extensions", "expected a list of extension ids")
    cfg = CollectorConfig(
        receivers=_components("receivers", RECEIVER, data.get("receivers")),
        processors=_components("processors", PROCESSOR, data.get("processors")),
        exporters=_components("exporters", EXPORTER, data.get("exporters")),
        extensions=_components("extensions", EXTENSION, data.get("extensions")),
        enabled_extensions=[str(e) for e in enabled], pipelines=pipelines,
        telemetry=decode(TelemetryConfig, service.get("telemetry"), "service::telemetry"), source=source,
        memory=decode(MemoryConfig, service.get("memory"), "service::memory"))
    _validate_graph(cfg)
    return cfg


def load(path: str, env: Optional[Mapping[str, str]] = None) -> CollectorConfig:
    return from_dict(load_file(path, env), source=path, expanded=True)


__all__ = ["CollectorConfig", "ComponentConfig", "PipelineConfig", "load", "from_dict", "KIND_SECTIONS"]
