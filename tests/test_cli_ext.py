"""The sub-commands other packages add to ``prism-otel`` come from the ``prism_otel.commands`` entry points
(prism_otel/cli_ext.py), with the same lines in its BUILTIN for a tree whose metadata lacks the group."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib

from prism_otel import cli_ext, plugins
from prism_otel import semconv as sc

ROOT = Path(__file__).resolve().parents[1]


def test_the_tree_fallback_matches_pyproject():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][sc.ENTRY_POINT_COMMANDS]
    assert eps == cli_ext.BUILTIN


def test_the_product_names_no_evaluation_module():
    assert not [m for m in cli_ext._MODULES if not m.startswith("prism_otel.")]


def _subcommands() -> list[str]:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    cli_ext.register(sub)
    return list(sub.choices)


def test_every_subcommand_is_registered():
    assert set(_subcommands()) == {"detect", "eval", "collector", "attach", "detach", "status", "simulate", "corpus",
                                   "report", "dashboard", "alerts"}


def _fake_entry_points(lines):
    def entry_points(group):
        assert group == sc.ENTRY_POINT_COMMANDS
        return [SimpleNamespace(name=n, value=v) for n, v in lines.items()]
    return entry_points


@pytest.fixture
def fresh_cache():
    cli_ext._entry_point_modules.cache_clear()
    yield
    cli_ext._entry_point_modules.cache_clear()


def test_builtin_when_the_group_is_missing_and_the_metadata_wins(monkeypatch, fresh_cache):
    monkeypatch.setattr(plugins, "entry_points", _fake_entry_points({}))
    assert cli_ext._entry_point_modules() == tuple(cli_ext.BUILTIN.values())
    cli_ext._entry_point_modules.cache_clear()
    # a line of the same name in the metadata takes the built-in one's place
    monkeypatch.setattr(plugins, "entry_points", _fake_entry_points({"simulate": "prism_eval.detect_cli"}))
    assert cli_ext._entry_point_modules() == ("prism_eval.detect_cli", "prism_eval.detect_cli",
                                              "prism_eval.simulate.corpus_cli")


def test_a_missing_command_package_is_left_out(monkeypatch, fresh_cache):
    # an install without prism_eval (or a module gone from it) still runs the product's commands
    monkeypatch.setattr(plugins, "entry_points", _fake_entry_points(
        {"detect": "no_such_pkg.cli", "simulate": "prism_eval.no_such_cli", "corpus": "no_such_pkg.corpus"}))
    assert "collector" in _subcommands() and "detect" not in _subcommands() and "corpus" not in _subcommands()
