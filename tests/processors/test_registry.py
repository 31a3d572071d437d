"""Processors are components found through the ``prism_otel.processors`` entry-point group.

A throwaway distribution (a module and its ``.dist-info`` with one entry-point line, in a temporary
directory put on the path: what ``pip install`` of a third party's package leaves) adds a processor
that marks every step. Nothing of ours is edited or told about it: it runs in an engine's companion (a
real transformers engine on a tiny random-weight model under ``prism-otel run``, its spans sent over
OTLP) and in a collector process (real OTLP in, its mark on the spans the collector forwards).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import tomllib

from prism_otel import semconv as sc
from processors import registry
from processors.defaults import in_process_processors, processor_chain
from processors.factory import Context, ProcessorFactory
from tests.collector.harness import CollectorProcess, client_provider, free_port, send_steps, write_config
from tests.collector.spans_util import make_step
from tests.otlp_sink import OTLPSink
from tests.throwaway_dist import installed

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = ROOT / "tests" / "engines" / "cb_workload.py"
MARK = "throwaway.mark"
ROLE = "throwaway.role"

MODULE = '''
import dataclasses
import os
from dataclasses import dataclass

from processors.base import StepProcessor
from processors.config import invalid, key_path
from processors.factory import ProcessorFactory


@dataclass
class MarkConfig:
    value: str = "seen"

    def validate(self, where=""):
        if not self.value:
            raise invalid(key_path(where, "value"), "must not be empty")


class Mark(StepProcessor):
    name = "throwaway_mark"

    def __init__(self, value, role):
        self.value, self.role = value, role

    def process(self, step):
        return dataclasses.replace(step, attributes={**step.attributes, "throwaway.mark": self.value,
                                                     "throwaway.role": self.role})


factory = ProcessorFactory("throwaway_mark", MarkConfig, lambda cfg, ctx: Mark(cfg.value, ctx.role),
                           from_env=lambda ctx: {"value": os.environ.get("THROWAWAY_MARK", "seen")})
not_a_factory = object()
'''


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """A directory holding the throwaway distribution, on ``sys.path`` (and the registry looked up again)."""
    with installed(tmp_path, monkeypatch, "throwaway_mark", MODULE, sc.ENTRY_POINT_PROCESSORS,
                   ("throwaway_mark = throwaway_mark:factory", "throwaway_broken = throwaway_mark:not_a_factory", "throwaway_missing = throwaway_nowhere:factory"), registry.reload) as site:
        yield site


def _env(site: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join((str(ROOT), str(site)))
    env.update(extra)
    return env


def test_the_tree_fallback_matches_pyproject():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][sc.ENTRY_POINT_PROCESSORS]
    assert eps == registry.BUILTIN


def test_builtin_components_in_chain_order():
    types = [f.type for f in registry.factories()]
    assert types == ["prism_anomaly", "prism_slo", "prism_incidents", "prism_metrics", "prism_device", "prism_fleet"]
    assert all(isinstance(f, ProcessorFactory) for f in registry.factories())
    assert [f.type for f in registry.factories() if f.collector] == ["prism_anomaly", "prism_slo", "prism_incidents",
                                                                     "prism_fleet"]


def test_a_third_party_processor_is_found_through_the_entry_point(throwaway, monkeypatch, caplog):
    # the real lookup sees the distribution's line; the registry loads it and leaves the broken ones out
    assert "throwaway_mark" in {ep.name for ep in entry_points(group=sc.ENTRY_POINT_PROCESSORS)}
    f = registry.lookup("throwaway_mark")
    assert f is not None and f is sys.modules["throwaway_mark"].factory
    assert registry.lookup("throwaway_broken") is None and registry.lookup("throwaway_missing") is None
    assert "not a ProcessorFactory" in caplog.text and "could not be loaded" in caplog.text
    assert registry.lookup("prism_anomaly") is not None  # the others still load
    # in-process: after ours (a third party's default order), configured from the environment
    monkeypatch.setenv("THROWAWAY_MARK", "env")
    monkeypatch.setenv(sc.ENV_DETECT, "0")
    chain = processor_chain(Context(role=sc.ROLE_ENGINE))
    assert [p.name for p in chain][-1] == "throwaway_mark" and chain[-1].value == "env"
    assert "throwaway_mark" not in [p.name for p in in_process_processors()]  # it does not need detection
    # its config is decoded by the one decoder: a bad key names its path
    with pytest.raises(ValueError) as e:
        f.config({"value": ""}, "x")
    assert str(e.value) == "x.value: must not be empty"


def test_a_third_party_processor_runs_in_the_companion_of_a_real_engine(throwaway, tmp_path):
    with OTLPSink() as sink:
        env = _env(throwaway, **{sc.OTEL_EXPORTER_OTLP_ENDPOINT: sink.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                                 "OTEL_BSP_SCHEDULE_DELAY": "200", "THROWAWAY_MARK": "in-the-companion"})
        cmd = [os.path.join(os.path.dirname(sys.executable), "prism-otel"), "run", "--", sys.executable,
               str(WORKLOAD), str(tmp_path / "report.json")]
        p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) > 0, timeout=10)
    steps = [s for s in spans if s.name == sc.STEP_SPAN]
    assert steps and all(s.attributes.get(MARK) == "in-the-companion" for s in steps), p.stderr[-2000:]
    assert {s.attributes.get(ROLE) for s in steps} == {sc.ROLE_COMPANION}


def test_a_third_party_processor_runs_in_the_collector(throwaway, tmp_path):
    grpc_port = free_port()
    with OTLPSink() as sink:
        cfg = {
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{grpc_port}"}}}},
            "processors": {"throwaway_mark": {"value": "in-the-collector", "assembly": {"wait": "200ms"}}},
            "exporters": {"otlp_grpc": {"endpoint": sink.endpoint.replace("http://", ""), "tls": {"insecure": True}}},
            "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["throwaway_mark"],
                                                 "exporters": ["otlp_grpc"]}}},
        }
        col = CollectorProcess(write_config(str(tmp_path / "c.yaml"), cfg), str(tmp_path / "c.log"),
                               env=_env(throwaway)).start()
        try:
            tp, _ = client_provider("grpc", grpc_port, "i-0")
            send_steps(tp, [make_step(i) for i in range(5)])
            tp.shutdown()
            spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) >= 5, timeout=30)
        finally:
            col.stop()
    steps = [s for s in spans if s.name == sc.STEP_SPAN]
    assert len(steps) == 5, open(tmp_path / "c.log").read()[-3000:]
    assert all(s.attributes.get(MARK) == "in-the-collector" for s in steps)
    assert {s.attributes.get(ROLE) for s in steps} == {sc.ROLE_COLLECTOR}
    # a bad key of the third party's config fails the collector's config check with its YAML path
    cfg["processors"]["throwaway_mark"] = {"value": ""}
    r = subprocess.run([sys.executable, "-m", "prism_otel.collector", "--validate", "--config",
                        write_config(str(tmp_path / "bad.yaml"), cfg)],
                       env=_env(throwaway), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "processors::throwaway_mark::value: must not be empty" in r.stderr + r.stdout
