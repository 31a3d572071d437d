"""Sub-commands added by other parts (detect, eval, collector, attach, simulate, corpus, report, dashboard,
alerts): each
registers here.

The product's own sub-command modules are listed in :data:`_MODULES`. Those of other packages (the
evaluation package's ``simulate``, ``corpus``, ``detect`` and ``eval``) come from the
``prism_otel.commands`` entry-point group (:data:`prism_otel.semconv.ENTRY_POINT_COMMANDS`), so that the
product names none of them. Where the distribution's metadata lacks that group (a checkout on
``sys.path``, or an editable install made from an older tree) :data:`BUILTIN` holds the same lines as
pyproject.toml (tests/test_cli_ext.py keeps the two equal).
"""

from __future__ import annotations

import functools
import importlib

from prism_otel import semconv as sc
from prism_otel.plugins import declared

# (module, function names): each module has ``register(subparsers)`` and ``dispatch(args) -> int | None``
_MODULES = (
    "prism_otel.collector.cli",  # collector
    "prism_otel.attach.cli",  # attach, detach, status
    "prism_otel.report.cli",  # report
    "prism_otel.report.dashboard",  # dashboard
    "prism_otel.alerts_cli",  # alerts
)
# pyproject.toml's [project.entry-points."prism_otel.commands"], for a tree whose metadata lacks the group
BUILTIN = {
    "detect": "prism_eval.detect_cli",  # detect, eval
    "simulate": "prism_eval.simulate.cli",  # simulate
    "corpus": "prism_eval.simulate.corpus_cli",  # corpus
}


@functools.lru_cache(maxsize=1)
def _entry_point_modules() -> tuple[str, ...]:
    return tuple(declared(sc.ENTRY_POINT_COMMANDS, BUILTIN).values())


def _missing(exc: ModuleNotFoundError, name: str) -> bool:
    """The module itself (or a package above it) is not there, as opposed to something it imports."""
    return exc.name is not None and (name == exc.name or name.startswith(exc.name + "."))


def _load():
    mods = []
    for name in _MODULES + _entry_point_modules():
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if not _missing(exc, name):  # the module exists but something it needs does not
                raise
            continue
    return mods


def register(sub) -> None:
    for m in _load():
        m.register(sub)


def dispatch(args) -> int:
    for m in _load():
        rc = m.dispatch(args)
        if rc is not None:
            return rc
    raise SystemExit(f"prism-otel: unknown command {args.cmd!r}")
