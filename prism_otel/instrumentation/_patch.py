"""Hook points: one engine method we wrap, and the check that it is still the method we know.

Engines rename, remove and re-sign methods between releases. Each :class:`HookPoint` names the
parameters it knows, in order: every required one, and the optional ones its wrapper reads by
position. Before wrapping, :func:`patch` checks that the method exists, that those parameters are
still first, in that order, and that it has no required parameter beyond them. A hook point that fails the check is reported once (log and ``prism_otel.status()``) and
skipped; the other hook points of the engine are patched as usual.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import wrapt

from prism_otel.instrumentation import STATUS
from prism_otel.instrumentation._hooks import guard

logger = logging.getLogger(__name__)

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@dataclass(frozen=True)
class HookPoint:
    """``module``'s ``Class.method`` wrapped by ``factory(guard, recorder)``.

    ``params``: the parameters after ``self`` as this hook point knows them, in order: every required
    one, and the optional ones the wrapper reads from ``args`` by position. ``own``: patch only where the class itself defines the method (a subclass that merely
    inherits it is patched through its base), and say nothing when it does not."""

    module: str
    target: str
    factory: Callable
    params: tuple[str, ...] = ()
    own: bool = False

    @property
    def cls_name(self) -> str:
        return self.target.split(".")[0]

    @property
    def method(self) -> str:
        return self.target.split(".")[1]


def signature_change(func: Callable, known: tuple[str, ...]) -> Optional[str]:
    """Why ``func`` is not the method a hook point knowing ``known`` expects, or None if it is."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None  # a builtin or C method: nothing to compare, the guard catches what goes wrong
    params = params[1:] if params and params[0].name in ("self", "cls") else params
    shown = "(" + ", ".join(p.name for p in params) + ")"
    for i, name in enumerate(known):
        if i >= len(params) or params[i].name != name or params[i].kind in _VARIADIC:
            return f"signature changed: {shown}, prism-otel knows ({', '.join(known)})"
    extra = [p.name for p in params[len(known):] if p.default is inspect.Parameter.empty and p.kind not in _VARIADIC]
    if extra:
        return f"signature changed: {shown} has new required parameters {extra}"
    return None


def _skip(key: str, why: str) -> None:
    if STATUS.get(key, ("", ""))[1] != why:
        logger.warning("prism-otel: hook %s skipped: %s (the other hooks are unaffected)", key, why)
    STATUS[key] = ("skipped", why)


def patch(module, hp: HookPoint, patched: list[tuple[str, str]], key: str, recorder=None) -> bool:
    """Wrap ``hp`` in the imported ``module`` unless it changed; record it in ``patched``.
    Returns whether it was wrapped. Never raises: a failure is reported under ``key``."""
    if (hp.module, hp.target) in patched:
        return True
    try:
        cls = getattr(module, hp.cls_name, None)
        func = getattr(cls, hp.method, None) if cls is not None else None
        if func is None or (hp.own and hp.method not in vars(cls)):
            if not hp.own:
                where = "class" if cls is None else "method"
                _skip(key, f"{where} not found in this version (removed or renamed)")
            return False
        why = signature_change(func, hp.params)
        if why:
            _skip(key, why)
            return False
        # wrapt's bundled stubs declare its API for Python >= 3.10 only (pythonVersion is 3.9 here)
        wrapt.wrap_function_wrapper(module, hp.target, hp.factory(guard(key), recorder))  # pyright: ignore[reportAttributeAccessIssue]
        patched.append((hp.module, hp.target))
        STATUS.pop(key, None)
        return True
    except Exception as exc:  # noqa: BLE001 - a hook point that cannot be patched is reported, not raised
        _skip(key, f"could not be patched: {exc!r}")
        return False
