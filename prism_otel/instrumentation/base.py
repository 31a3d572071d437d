"""What every engine instrumentation shares: the instrumentor base class and the guarded hook.

An engine is two files: ``instrumentation/<engine>/__init__.py`` (a subclass of
:class:`EngineInstrumentor` naming its distributions, version ranges and hook points) and the module(s)
of its hooks, each a factory ``wrap_x(guard, recorder)`` built with :func:`guarded`. The recorder (the
hot path, :class:`prism_otel.recorder.Recorder`) is passed in at ``instrument(recorder=...)``; hooks
bind its named constructors once, when they are wrapped.

:func:`guarded` is the one place the hook safety rule is written: our code before and after the
engine's call runs inside a guard that counts what it raises and, after repeated failures, turns the
hook off (``prism_otel.instrumentation._hooks``); the engine's own call is never wrapped in a ``try``,
so its exceptions pass through untouched.
"""

from __future__ import annotations

from typing import Callable, Collection, Optional, Tuple

import wrapt
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from prism_otel.instrumentation import STATUS, UNTESTED, check_version, unwrap_all
from prism_otel.instrumentation._patch import HookPoint, patch

SKIP = object()  # returned by a ``before``: call the engine and do nothing after it

Before = Callable[[object, tuple, dict], object]
After = Callable[[object, tuple, dict, object, object], None]


def guarded(g, before: Optional[Before] = None, after: Optional[After] = None, always: bool = False):
    """A wrapt wrapper running ``before(instance, args, kwargs) -> state`` ahead of the engine's call and
    ``after(instance, args, kwargs, result, state)`` after it, both under the guard ``g``.

    ``before`` returning :data:`SKIP` leaves this call alone. A failing ``before`` still calls the
    engine (without ``after``). ``always``: ``after`` runs even when the engine's call raised (with
    result None), e.g. to remove what ``before`` installed; the exception still propagates."""
    if before is None:
        def after_only(wrapped, instance, args, kwargs):
            r = wrapped(*args, **kwargs)
            if not g.disabled:
                try:
                    after(instance, args, kwargs, r, None)
                except Exception as exc:  # noqa: BLE001
                    g.failed(exc)
            return r

        return after_only

    if after is None:
        def before_only(wrapped, instance, args, kwargs):
            if not g.disabled:
                try:
                    before(instance, args, kwargs)
                except Exception as exc:  # noqa: BLE001
                    g.failed(exc)
            return wrapped(*args, **kwargs)

        return before_only

    if always:
        def around_always(wrapped, instance, args, kwargs):
            if g.disabled:
                return wrapped(*args, **kwargs)
            try:
                state = before(instance, args, kwargs)
            except Exception as exc:  # noqa: BLE001
                g.failed(exc)
                return wrapped(*args, **kwargs)
            if state is SKIP:
                return wrapped(*args, **kwargs)
            r = None
            try:
                r = wrapped(*args, **kwargs)
                return r
            finally:
                try:
                    after(instance, args, kwargs, r, state)
                except Exception as exc:  # noqa: BLE001
                    g.failed(exc)

        return around_always

    def around(wrapped, instance, args, kwargs):
        if g.disabled:
            return wrapped(*args, **kwargs)
        try:
            state = before(instance, args, kwargs)
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
            return wrapped(*args, **kwargs)
        if state is SKIP:
            return wrapped(*args, **kwargs)
        r = wrapped(*args, **kwargs)
        try:
            after(instance, args, kwargs, r, state)
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
        return r

    return around


def _process_recorder():
    """The process's recorder, for an instrumentor the OpenTelemetry loader instrumented without one
    (``opentelemetry-instrument`` instruments before prism-otel's post-instrument hook starts it)."""
    from prism_otel import _runtime  # lazy: the lifecycle sits above the instrumentation

    return _runtime.recorder()


class EngineInstrumentor(BaseInstrumentor):
    """Base of our engine instrumentors. Subclasses set the class attributes below.

    ``BaseInstrumentor`` is a per-class singleton whose ``__init__`` runs on every construction: the
    state lives on the class, so a second construction does not forget what was patched."""

    name: str = ""  # our name for the engine (status keys, PRISM_OTEL_INSTRUMENTATIONS)
    dists: Tuple[str, ...] = ()  # distributions that provide it (the first installed one is checked)
    supported: str = ""  # instrumented range
    tested: Optional[str] = None  # the range the suite ran on (outside it: a warning, hook points checked one by one)
    instruments: Collection[str] = ()  # opentelemetry-instrument's dependency gate
    hook_points: Tuple[HookPoint, ...] = ()
    extra_modules: Tuple[str, ...] = ()  # other modules whose import calls on_import (not hook points)

    _active = False
    _patched: list = []
    recorder = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return self.instruments

    def _instrument(self, **kwargs) -> None:
        if check_version(self.name, self.dists, kwargs.get("supported", self.supported), self.tested) is None:
            return
        cls = type(self)
        cls.recorder = kwargs.get("recorder") or cls.recorder or _process_recorder()
        cls._active = True
        cls._patched = list(cls._patched) if "_patched" in cls.__dict__ else []
        self.on_instrument(**kwargs)
        for module in dict.fromkeys([hp.module for hp in self.hook_points] + list(self.extra_modules)):
            wrapt.register_post_import_hook(self._on_import, module)
        STATUS[self.name] = ("instrumented", UNTESTED.get(self.name, "hooks installed on import"))

    def _on_import(self, module) -> None:
        cls = type(self)
        if not cls._active:
            return
        name = module.__name__
        if name in self.extra_modules:
            self.on_extra_module(module)
        for hp in self.hook_points:
            if hp.module == name:
                patch(module, hp, cls._patched, self.hook_key(hp), cls.recorder)

    def hook_key(self, hp: HookPoint) -> str:
        """The name a hook point is reported under (status, guard, log)."""
        return f"{self.name}.{hp.target}"

    def _uninstrument(self, **kwargs) -> None:
        cls = type(self)
        cls._active = False
        unwrap_all(cls._patched)
        self.on_uninstrument()
        STATUS[self.name] = ("uninstrumented", "")

    # -- for subclasses ------------------------------------------------------------------------
    def on_instrument(self, **kwargs) -> None:
        """Called when instrumenting, before the post-import hooks are registered."""

    def on_extra_module(self, module) -> None:
        """Called when one of ``extra_modules`` is imported."""

    def on_uninstrument(self) -> None:
        """Called after the hooks were removed."""

    @property
    def patched(self):
        return list(type(self)._patched) if "_patched" in type(self).__dict__ else []
