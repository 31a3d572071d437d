"""Sub-commands added by other parts (detect, eval, collector, attach, simulate, corpus, report, dashboard,
alerts): each
registers here."""

from __future__ import annotations

import importlib

# (module, function names): each module has ``register(subparsers)`` and ``dispatch(args) -> int | None``
_MODULES = (
    "prism_otel.detect_cli",  # detect, eval
    "prism_otel.collector.cli",  # collector
    "prism_otel.attach.cli",  # attach, detach, status
    "prism_otel.simulate.cli",  # simulate
    "prism_otel.simulate.corpus_cli",  # corpus
    "prism_otel.report.cli",  # report
    "prism_otel.report.dashboard",  # dashboard
    "prism_otel.alerts_cli",  # alerts
)


def _load():
    mods = []
    for name in _MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it needs does not
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
