"""The attach agent: runs inside the target, on the ``prism-otel-attach`` thread the stub started.

``run`` carries out one request (``attach``, ``detach`` or ``status``) and writes the handshake
document: ``prism_otel.status()`` (pid, running, instrumentations, patched, steps, ...) plus
``ok``, ``error``, ``already`` and timings. The configuration comes from the request, i.e. from
the attaching command's environment and flags, never from the target's own environment: while
the agent is imported and runs, the stub hides every ``OTEL_*`` / ``PRISM_OTEL_*`` variable of the
target and shows the request's instead, at the ``os.environ`` mapping level (no ``putenv``: C code
in other threads that calls ``getenv`` must never race a ``setenv``); afterwards the target's
environment is exactly what it was. Components read their configuration when they are built
(the ring at import, exporters and span processors in ``start``), which happens inside that window.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Any

from prism_otel import semconv as sc

_ADDED_PATHS: list[str] = []  # sys.path entries attach added (removed again by detach)
# what a ``call`` may name: the packages of prism-otel's distribution that hold such functions (the product's,
# and prism_eval's, whose simulation toolkit delivers its in-process faults this way)
_CALL_PACKAGES = ("prism_otel.", "prism_eval.")


def _attach(req: dict, added: list[str], doc: dict) -> None:
    import prism_otel
    from prism_otel import _runtime

    for p in added:
        if p not in _ADDED_PATHS:
            _ADDED_PATHS.append(p)
    already = _runtime.current() is not None
    rt = prism_otel.start()
    doc["already"] = already
    doc["sys_path_added"] = list(_ADDED_PATHS)
    if rt is None:
        doc["ok"] = False
        doc["error"] = f"prism-otel is disabled by {sc.ENV_DISABLED} in the attach configuration"


def _detach(req: dict, added: list[str], doc: dict) -> None:
    import prism_otel
    from prism_otel import _runtime

    doc["was_running"] = _runtime.current() is not None
    prism_otel.stop(float(req.get("stop_timeout", 10.0)))
    removed = []
    for p in set(_ADDED_PATHS) | set(added):
        while p in sys.path:
            sys.path.remove(p)
            removed.append(p)
    _ADDED_PATHS.clear()
    doc["sys_path_removed"] = sorted(set(removed))


def _call(req: dict, doc: dict) -> None:
    """Run ``req["call"]`` = ``{"target": "prism_otel.<module>:<function>", "kwargs": {...}}`` here and
    put its (JSON-able) return value in ``doc["result"]``: how the simulation toolkit delivers its
    in-process faults (a stage stall, a GC storm) through this same mechanism. Only functions of
    prism-otel's own modules (:data:`_CALL_PACKAGES`) can be named."""
    import importlib

    spec = req.get("call") or {}
    mod, _, fn = str(spec.get("target", "")).partition(":")
    if not mod.startswith(_CALL_PACKAGES) or not fn.isidentifier():
        raise ValueError(f"call: expected 'prism_otel.<module>:<function>' or 'prism_eval.<module>:<function>', "
                         f"got {spec.get('target')!r}")
    doc["result"] = getattr(importlib.import_module(mod), fn)(**(spec.get("kwargs") or {}))


def run(req: dict, added: list[str], base: dict) -> dict:
    """Carry out ``req`` and return the handshake document (the stub writes it)."""
    t0 = time.monotonic()
    doc: dict[str, Any] = dict(base, ok=True)
    try:
        action = req["action"]
        if action == "attach":
            _attach(req, added, doc)
        elif action == "detach":
            _detach(req, added, doc)
        elif action == "call":
            _call(req, doc)
        elif action != "status":
            raise ValueError(f"unknown action {action!r}")
    except BaseException as exc:  # noqa: BLE001 - whatever happens is reported, never raised into the target
        doc["ok"] = False
        doc["error"] = repr(exc)
        doc["traceback"] = traceback.format_exc(limit=20)
    try:
        import prism_otel

        doc.update(prism_otel.status())
    except BaseException as exc:  # noqa: BLE001
        doc["status_error"] = repr(exc)
    doc["loaded"] = True
    doc["agent_s"] = round(time.monotonic() - t0, 4)
    doc["threads"] = sorted(t.name for t in threading.enumerate())
    return doc
