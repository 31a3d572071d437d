"""Config loading: the Collector's YAML format, env expansion, durations, strict keys, and errors that
name the YAML path, all before anything listens. Plus one lifecycle test over every component type."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from prism_otel.collector import registry
from prism_otel.collector.component import ComponentID, Host, Settings
from prism_otel.collector.config import from_dict, load
from prism_otel.collector.errors import ConfigError
from prism_otel.collector.service import Service
from prism_otel.collector.telemetry import Telemetry
from prism_otel.config_decode import parse_duration
from tests.collector.harness import ROOT, base_config, free_port, write_config


def _err(cfg, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        from_dict(cfg, env=env or {})
    return ei.value


def test_minimal_config_and_defaults():
    cfg = from_dict({"receivers": {"otlp": {"protocols": {"grpc": None}}}, "processors": {"prism_fleet": {}},
                     "exporters": {"debug": {}},
                     "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["prism_fleet"],
                                                          "exporters": ["debug"]}}}}, env={})
    grpc = cfg.receivers["otlp"].config.protocols.grpc
    assert grpc.endpoint == "localhost:4317" and grpc.max_recv_msg_size_mib == 4
    assert cfg.receivers["otlp"].config.protocols.http is None
    assert cfg.exporters["debug"].config.verbosity == "basic"


def test_env_expansion_types_defaults_and_escapes():
    cfg = base_config(exporters={"otlp_grpc/x": {"endpoint": "${env:HOST:-127.0.0.1}:${PORT}",
                                                 "headers": {"x-cost": "$$5", "x-t": "${env:TOKEN}"},
                                                 "timeout": "${env:T}"}})
    cfg["receivers"]["otlp"]["protocols"]["grpc"]["max_recv_msg_size_mib"] = "${env:MIB}"
    c = from_dict(cfg, env={"PORT": "4444", "MIB": "16", "T": "250ms", "TOKEN": "abc"})
    x = c.exporters["otlp_grpc/x"].config
    assert x.endpoint == "127.0.0.1:4444" and x.headers == {"x-cost": "$5", "x-t": "abc"} and x.timeout == 0.25
    assert c.receivers["otlp"].config.protocols.grpc.max_recv_msg_size_mib == 16
    e = _err(dict(cfg, exporters={"debug": {"verbosity": "${file:/etc/passwd}"}}), env={"PORT": "1", "MIB": "1"})
    assert e.path == "exporters::debug::verbosity" and "provider" in e.message


@pytest.mark.parametrize("text,seconds", [("200ms", 0.2), ("1m30s", 90.0), ("1.5s", 1.5), ("300us", 3e-4),
                                          ("2h", 7200.0), (0, 0.0), ("0", 0.0)])
def test_go_durations(text, seconds):
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5", 5, "fast", "10 s", "1y", True])
def test_bad_durations_name_the_path(bad):
    e = _err(base_config(exporters={"otlp_grpc": {"endpoint": "localhost:1", "timeout": bad}}))
    assert e.path == "exporters::otlp_grpc::timeout"


@pytest.mark.parametrize("mutate,path,words", [
    (lambda c: c["receivers"]["otlp"]["protocols"]["grpc"].update(endpiont="x"),
     "receivers::otlp::protocols::grpc::endpiont", "unknown key"),
    (lambda c: c.update(receiver={}), "receiver", "unknown top-level key"),
    (lambda c: c["exporters"].update({"otlp_grpc": {"endpoint": "h:1", "sending_queue": {"size": 3}}}),
     "exporters::otlp_grpc::sending_queue::size", "unknown key"),
    (lambda c: c["processors"].update(batch={}), "processors::batch", "unknown processor type"),
    (lambda c: c["service"]["pipelines"]["traces"]["exporters"].append("nope"),
     "service::pipelines::traces::exporters::1", 'references exporter \'nope\' which is not configured'),
    (lambda c: c["service"]["pipelines"].update({"metrics": {"receivers": ["otlp"], "exporters": ["debug"]}}),
     "service::pipelines::metrics", "not supported"),
    (lambda c: c["receivers"]["otlp"].update(protocols={}), "receivers::otlp::protocols", "at least one protocol"),
    (lambda c: c["receivers"]["otlp"]["protocols"]["grpc"].update(max_recv_msg_size_mib="big"),
     "receivers::otlp::protocols::grpc::max_recv_msg_size_mib", "integer"),
    (lambda c: c["receivers"]["otlp"]["protocols"]["http"].update(endpoint="nohost"),
     "receivers::otlp::protocols::http::endpoint", "host:port"),
    (lambda c: c["exporters"].update(otlp_grpc={}), "exporters::otlp_grpc::endpoint", "required"),
    (lambda c: c["exporters"].update(otlp_http={"endpoint": "ftp://x"}), "exporters::otlp_http::endpoint", "http"),
    (lambda c: c["exporters"].update(otlp_grpc={"endpoint": "h:1", "sending_queue": {"storage": "file_storage"}}),
     "exporters::otlp_grpc::sending_queue::storage", "not configured"),
    (lambda c: c["exporters"].update(debug={"verbosity": "loud"}), "exporters::debug::verbosity", "one of"),
    (lambda c: c["exporters"].update(otlp_grpc={"endpoint": "h:1", "sending_queue": {"sizer": "bytes"}}),
     "exporters::otlp_grpc::sending_queue::sizer", "one of"),
    (lambda c: c["processors"]["prism_fleet"].update(threshold=0.5), "processors::prism_fleet::threshold", "> 1"),
    (lambda c: c["processors"]["prism_fleet"].update(assembly={"wait": "soon"}),
     "processors::prism_fleet::assembly::wait", "duration"),
    (lambda c: c.update(connectors={"spanmetrics": {}}), "connectors", "not supported"),
    (lambda c: c["service"].update(extensions=["file_storage"]), "service::extensions::0", "not configured"),
    (lambda c: c["service"]["pipelines"]["traces"].update(receivers=[]),
     "service::pipelines::traces::receivers", "at least one receiver"),
    (lambda c: c["receivers"].update({"otlp/2": {"protocols": {"grpc": {"endpoint": "127.0.0.1:4999"}}},
                                      "otlp": {"protocols": {"grpc": {"endpoint": "127.0.0.1:4999"}}}}),
     "receivers::otlp/2::protocols::grpc::endpoint", "already used"),
])
def test_errors_name_the_yaml_path(mutate, path, words):
    cfg = base_config(grpc_port=4317, http_port=4318)
    mutate(cfg)
    e = _err(cfg)
    assert e.path == path, str(e)
    assert words in e.message, str(e)
    assert str(e).startswith(path + ": ")


def test_storage_extension_must_be_enabled(tmp_path):
    cfg = base_config(exporters={"otlp_grpc": {"endpoint": "h:1", "sending_queue": {"storage": "file_storage"}}})
    cfg["extensions"] = {"file_storage": {"directory": str(tmp_path)}}
    e = _err(cfg)
    assert e.path == "exporters::otlp_grpc::sending_queue::storage" and "not enabled" in e.message
    cfg["service"]["extensions"] = ["file_storage"]
    assert from_dict(cfg, env={}).extensions["file_storage"].config.directory == str(tmp_path)


def test_deprecated_otlp_exporter_name_is_otlp_grpc():
    c = from_dict(base_config(exporters={"otlp/old": {"endpoint": "localhost:4317"}}), env={})
    assert c.exporters["otlp/old"].factory.type == "otlp_grpc"


def test_duplicate_yaml_keys_and_bad_yaml(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("receivers: {}\nreceivers: {}\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        load(str(p))
    p.write_text("receivers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(p))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_port_in_use_fails_startup_with_path_and_nothing_listens():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        grpc_port = free_port()
        svc = Service(from_dict(base_config(grpc_port=grpc_port, http_port=taken), env={}))
        with pytest.raises(ConfigError) as ei:
            svc.start()
        assert ei.value.path == "receivers::otlp::protocols::http::endpoint"
        assert not _listening(grpc_port)  # the gRPC side that had started was stopped again
        svc.shutdown()


def test_cli_bad_config_exits_2_with_path(tmp_path):
    cfg = base_config()
    cfg["exporters"]["debug"]["verbosity"] = "loud"
    path = write_config(str(tmp_path / "bad.yaml"), cfg)
    for argv in ([sys.executable, "-m", "prism_otel.collector", "--config", path],
                 [sys.executable, "-m", "prism_otel.cli", "collector", "--config", path]):
        r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "exporters::debug::verbosity" in r.stderr
    ok = write_config(str(tmp_path / "ok.yaml"), base_config())
    r = subprocess.run([sys.executable, "-m", "prism_otel.collector", "--config", ok, "--validate"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "valid" in r.stdout


_MINIMAL = {
    "otlp": {"protocols": {"grpc": {"endpoint": "127.0.0.1:0"}, "http": {"endpoint": "127.0.0.1:0"}}},
    "otlp_grpc": {"endpoint": "127.0.0.1:9", "tls": {"insecure": True}},
    "otlp_http": {"endpoint": "http://127.0.0.1:9"},
    "bearertokenauth": {"token": "t"},
}


def _factories():
    return [pytest.param(f, id=f"{f.kind}-{f.type}") for f in registry.all_factories()]


@pytest.mark.parametrize("factory", _factories())
def test_every_component_lifecycle(factory, tmp_path):
    """As the Collector's generated component tests: config decodes, create→shutdown, create→start→
    shutdown, and shutdown twice."""
    from prism_otel.collector.decode import decode

    body = dict(_MINIMAL.get(factory.type, {}))
    if factory.type == "file":
        body = {"path": str(tmp_path / "f.jsonl")}
    if factory.type == "file_storage":
        body = {"directory": str(tmp_path)}
    cls = factory.config_class
    try:
        cfg = cls.from_yaml(body, factory.type) if hasattr(cls, "from_yaml") else decode(cls, body, factory.type)
    except ConfigError as exc:
        pytest.skip(f"not available here: {exc}")
    settings = Settings(ComponentID(factory.type), Telemetry())
    args = (lambda *a: None,) if factory.kind == "receiver" else ()
    for start in (False, True):
        comp = factory.create(settings, cfg, *args)
        if start and hasattr(comp, "start"):
            comp.start(Host())
        if hasattr(comp, "shutdown"):
            comp.shutdown()
            comp.shutdown()


@pytest.mark.parametrize("text", ["0x1f2e3d4c", "0777123", "1_000_000", "190:20:30", "true", "1e3", "~", "null"])
def test_whole_value_env_reference_keeps_the_text_for_string_fields(text):
    """Issue 16, finding 7: ``token: ${env:TOKEN}`` must not be read as YAML when the field is a string
    (the Collector keeps the string); typed fields still get the YAML reading."""
    cfg = base_config(exporters={"otlp_grpc": {"endpoint": "127.0.0.1:4317", "headers": {"x-token": "${env:TOKEN}"}}})
    cfg["receivers"]["otlp"]["protocols"]["grpc"]["max_recv_msg_size_mib"] = "${env:MIB}"
    cfg["extensions"] = {"bearertokenauth": {"token": "${env:TOKEN}"}}
    cfg["service"]["extensions"] = ["bearertokenauth"]
    c = from_dict(cfg, env={"TOKEN": text, "MIB": "0x10"})
    assert c.exporters["otlp_grpc"].config.headers == {"x-token": text}
    assert c.extensions["bearertokenauth"].config.token == text
    assert c.receivers["otlp"].config.protocols.grpc.max_recv_msg_size_mib == 16
    assert type(c.extensions["bearertokenauth"].config.token) is str
