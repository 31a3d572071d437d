"""Every file in otel-config/ loads: ours (prism-*.yaml) with our loader and validator; the
OpenTelemetry Collector's (otelcol-*.yaml) parse, and every component they reference exists in the
Collector (contrib distribution) and is defined, with each connector used on both of its sides."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from prism_otel.collector.component import ComponentID
from prism_otel.collector.config import load
from prism_otel.collector.confmap import expand
from tests.collector.harness import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "otel-config", "*.yaml")))
OURS = [p for p in CONFIGS if os.path.basename(p).startswith("prism-")]
THEIRS = [p for p in CONFIGS if os.path.basename(p).startswith("otelcol-")]

# Component types of otelcol-contrib that these files may use (a subset: what we checked exists).
COLLECTOR_TYPES = {
    "receivers": {"otlp", "jaeger", "zipkin", "prometheus", "hostmetrics", "filelog", "kafka"},
    "processors": {"batch", "memory_limiter", "attributes", "resource", "filter", "transform", "tail_sampling",
                   "groupbytrace", "k8sattributes", "resourcedetection"},
    "exporters": {"otlp", "otlp_grpc", "otlphttp", "otlp_http", "debug", "file", "loadbalancing", "kafka"},
    "connectors": {"failover", "forward", "routing", "spanmetrics", "servicegraph", "count"},
    "extensions": {"health_check", "pprof", "zpages", "file_storage", "bearertokenauth", "basicauth"},
}
LB_ROUTING_KEYS = {"traceID", "service", "resource", "metric", "streamID", "attributes"}


def test_the_set_of_files():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"prism-local.yaml", "otelcol-dropin.yaml", "otelcol-scaleout.yaml", "prism-jaeger.yaml",
            "prism-tempo.yaml"} <= names
    assert set(OURS) | set(THEIRS) == set(CONFIGS), "name files prism-*.yaml (ours) or otelcol-*.yaml"


@pytest.mark.parametrize("path", OURS, ids=os.path.basename)
def test_ours_load_and_validate(path, monkeypatch):
    for var in [v for v in os.environ if v.startswith(("PRISM_", "OTELCOL_", "BACKEND_", "JAEGER_", "TEMPO_"))]:
        monkeypatch.delenv(var)
    cfg = load(path)
    assert cfg.pipelines and all(p.exporters for p in cfg.pipelines.values())
    assert any(c.factory.type == "prism_anomaly" for c in cfg.processors.values())
    for r in cfg.receivers.values():  # loopback unless told otherwise
        for proto in ("grpc", "http"):
            server = getattr(r.config.protocols, proto)
            if server is not None:
                assert server.endpoint.startswith("localhost:"), server.endpoint


@pytest.mark.parametrize("path", THEIRS, ids=os.path.basename)
def test_collector_configs_reference_components_that_exist(path):
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    cfg = expand(raw, env={"MY_POD_IP": "10.0.0.1", "BACKEND_OTLP_ENDPOINT": "backend:4317"})
    defined = {}
    for section, known in COLLECTOR_TYPES.items():
        for key in cfg.get(section) or {}:
            cid = ComponentID.parse(key, f"{section}::{key}")
            assert cid.type in known, f"{section}::{key}: not a Collector component type we know"
            defined.setdefault(section, set()).add(key)
    pipes = cfg["service"]["pipelines"]
    conn = defined.get("connectors", set())
    conn_in, conn_out = set(), set()
    for name, p in pipes.items():
        assert ComponentID.parse(name, name).type == "traces"
        for r in p["receivers"]:
            assert r in defined.get("receivers", set()) | conn, f"{name}: receiver {r} not defined"
            if r in conn:
                conn_in.add(r)
        for x in p.get("processors", []):
            assert x in defined.get("processors", set()), f"{name}: processor {x} not defined"
        for e in p["exporters"]:
            assert e in defined.get("exporters", set()) | conn, f"{name}: exporter {e} not defined"
            if e in conn:
                conn_out.add(e)
    assert conn_in == conn_out == conn, "each connector must be an exporter in one pipeline and a receiver in another"
    for c, body in (cfg.get("connectors") or {}).items():
        if c.startswith("failover"):
            for level in body["priority_levels"]:
                assert all(p in pipes for p in level)
    for e, body in cfg["exporters"].items():
        if e.startswith("loadbalancing"):
            assert body["routing_key"] in LB_ROUTING_KEYS
            assert body["routing_key"] == "resource"
    for ext in cfg.get("service", {}).get("extensions", []):
        assert ext in defined.get("extensions", set())
