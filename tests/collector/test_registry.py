"""The collector's receivers, exporters and extensions are components found through the
``prism_otel.collector`` entry-point group, as the processors are (tests/processors/test_registry.py).

A throwaway distribution (a module and its ``.dist-info`` with entry-point lines, in a temporary directory
put on the path: what ``pip install`` of a third party's package leaves) adds an exporter that writes the
name of every span it is given to a file, plus two broken lines. Nothing of ours is edited or told about
it: a real collector process takes real OTLP in and hands the spans to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import tomllib

from prism_otel import semconv as sc
from prism_otel.collector import registry
from prism_otel.collector.component import Factory
from tests.collector.harness import CollectorProcess, client_provider, free_port, send_steps, write_config
from tests.collector.spans_util import make_step
from tests.throwaway_dist import installed

ROOT = Path(__file__).resolve().parents[2]

MODULE = '''
from dataclasses import dataclass

from prism_otel.collector.component import EXPORTER, Factory
from prism_otel.collector.decode import check
from prism_otel.collector.exporters.base import QueuedExporter, SendingQueueConfig


@dataclass
class LinesConfig:
    path: str = ""

    def validate(self):
        check(bool(self.path), "path", "is required")


class Lines(QueuedExporter):
    def __init__(self, settings, cfg):
        super().__init__(settings)
        self.cfg = cfg
        self.queue = SendingQueueConfig(enabled=False)

    def send(self, item):
        names = [s.name for rs in item.request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        with open(self.cfg.path, "a") as f:
            f.write("".join(n + "\\n" for n in names))


def factory():
    return Factory("throwaway_lines", EXPORTER, LinesConfig, Lines)


def of_another_type():
    return Factory("something_else", EXPORTER, LinesConfig, Lines)
'''


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """A directory holding the throwaway distribution, on ``sys.path`` (and the registry looked up again)."""
    with installed(tmp_path, monkeypatch, "throwaway_lines", MODULE, sc.ENTRY_POINT_COLLECTOR,
                   ("exporter.throwaway_lines = throwaway_lines:factory", "exporter.throwaway_mislabelled = throwaway_lines:of_another_type", "exporter.throwaway_missing = throwaway_nowhere:factory"), registry.reload) as site:
        yield site


def test_the_tree_fallback_matches_pyproject():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][sc.ENTRY_POINT_COLLECTOR]
    assert eps == registry.BUILTIN


def test_builtin_components():
    got = {(f.kind, f.type) for f in registry.all_factories()}
    assert {("receiver", "otlp"), ("exporter", "otlp_grpc"), ("exporter", "otlp_http"), ("exporter", "file"),
            ("exporter", "debug"), ("extension", "file_storage"), ("extension", "bearertokenauth"),
            ("processor", "prism_anomaly")} <= got
    assert all(isinstance(f, Factory) for f in registry.all_factories())


def test_a_third_party_exporter_is_found_and_the_broken_ones_left_out(throwaway, caplog):
    assert "exporter.throwaway_lines" in {ep.name for ep in entry_points(group=sc.ENTRY_POINT_COLLECTOR)}
    f = registry.lookup("exporter", "throwaway_lines")
    assert f is not None and f.create is sys.modules["throwaway_lines"].Lines
    assert registry.lookup("exporter", "something_else") is None
    assert "throwaway_missing" in caplog.text and "could not be loaded" in caplog.text
    assert "throwaway_mislabelled" in caplog.text and "did not return a Factory" in caplog.text
    assert registry.lookup("exporter", "otlp_grpc") is not None  # the others still load


def test_a_third_party_exporter_runs_in_the_collector(throwaway, tmp_path):
    grpc_port = free_port()
    out = tmp_path / "names.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join((str(ROOT), str(throwaway)))
    cfg = {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{grpc_port}"}}}},
        "exporters": {"throwaway_lines": {"path": str(out)}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["throwaway_lines"]}}},
    }
    col = CollectorProcess(write_config(str(tmp_path / "c.yaml"), cfg), str(tmp_path / "c.log"), env=env).start()
    try:
        tp, _ = client_provider("grpc", grpc_port, "i-0")
        send_steps(tp, [make_step(i) for i in range(5)])
        tp.shutdown()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if out.exists() and out.read_text().splitlines().count(sc.STEP_SPAN) >= 5:
                break
            time.sleep(0.1)
    finally:
        col.stop()
    names = out.read_text().splitlines() if out.exists() else []
    assert names.count(sc.STEP_SPAN) == 5, open(tmp_path / "c.log").read()[-3000:]
    # a bad key of the third party's config fails the collector's config check with its YAML path
    cfg["exporters"]["throwaway_lines"] = {}
    r = subprocess.run([sys.executable, "-m", "prism_otel.collector", "--validate", "--config",
                        write_config(str(tmp_path / "bad.yaml"), cfg)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "exporters::throwaway_lines::path: is required" in r.stderr + r.stdout, r.stderr
