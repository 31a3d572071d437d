"""The engines prism-otel knows come from one place (prism_otel/engines.py: the ``prism_*`` instrumentor
entry points of pyproject.toml), and every part reads them there."""

from pathlib import Path

import tomllib

from prism_otel import config, engines
from prism_otel import semconv as sc
from prism_otel.attach import _target
from prism_otel.instrumentation import installed_version

ROOT = Path(__file__).resolve().parents[1]


def test_the_checkout_fallback_matches_pyproject():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][engines.GROUP]
    assert {k: v for k, v in eps.items() if k.startswith(engines.PREFIX)} == engines.BUILTIN


def test_known_engines_and_what_reads_them():
    names = [e.name for e in engines.known()]
    assert names == ["vllm", "sglang", "transformers"]  # vLLM (built on transformers) names a process first
    assert [n for n, _ in engines.instrumentor_classes(everything=True)] == ["transformers", "vllm"]
    assert _target.engine_markers() == ("/torch/lib/", "/vllm/", "/sglang/")
    want = {n: v for n in ("vllm", "transformers")
            if (v := installed_version(n, n + "-cpu") if n == "vllm" else installed_version(n))}
    assert config.frameworks() == want


def test_the_instrumentations_filter(monkeypatch):
    monkeypatch.setenv(sc.ENV_INSTRUMENTATIONS, "vllm")
    assert [n for n, _ in engines.instrumentor_classes()] == ["vllm"]
    assert len(engines.instrumentor_classes(everything=True)) == 2
