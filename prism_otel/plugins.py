"""Components found through entry points, with a fallback for a tree that is not installed.

Engines (``opentelemetry_instrumentor``), processors (``prism_otel.processors``), collector components
(``prism_otel.collector``) and CLI commands (``prism_otel.commands``) are each an entry-point group: a
third party's distribution adds one with a line in its own metadata. Where prism-otel itself is not
installed (a checkout on ``sys.path``, an editable install made before a group existed) its own lines
are in no metadata, so each registry keeps them in a ``BUILTIN`` dict equal to pyproject.toml's (a
test per registry keeps the two equal): :func:`declared` reads that first and lets the metadata's
entry of the same name take its place.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Callable, Optional

logger = logging.getLogger(__name__)


def declared(group: str, builtin: Mapping[str, str]) -> dict[str, str]:
    """Entry-point name -> ``module:attribute`` of ``group``: ``builtin``, then what the metadata declares."""
    found = dict(builtin)
    for ep in entry_points(group=group):
        found[ep.name] = ep.value
    return found


def load(value: str) -> object:
    """What ``module:attribute.path`` names (the module imported now)."""
    mod, _, attr = value.partition(":")
    obj: object = importlib.import_module(mod)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def load_each(group: str, builtin: Mapping[str, str], what: str, problem: Callable[[str, object], Optional[str]],
              call: bool = False) -> list:
    """What each entry point of ``group`` names (called first when ``call``: a factory function), kept unless
    ``problem(name, obj)`` says why not. One that cannot be loaded or has a problem is logged and left out:
    one distribution's problem must not stop the others. ``what`` names the kind of component in the log."""
    out = []
    for name, value in declared(group, builtin).items():
        try:
            obj = load(value)
            if call and callable(obj):
                obj = obj()
        except Exception:  # noqa: BLE001 - one component's import problem must not stop the others
            logger.warning("prism-otel: %s %s (%s) could not be loaded", what, name, value, exc_info=True)
            continue
        why = problem(name, obj)
        if why:
            logger.warning("prism-otel: %s entry point %s (%s) %s: left out", what, name, value, why)
            continue
        out.append(obj)
    return out
