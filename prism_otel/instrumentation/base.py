"""What every engine instrumentation shares: the instrumentor base class and the guarded hook.

An engine is two files: ``instrumentation/<engine>/__init__.py`` (a subclass of
:class:`EngineInstrumentor` naming its distributions, version ranges and hook points) and the module(s)
of its hooks, each a factory ``wrap_x(guard, recorder)`` built with :func:`guarded`. The recorder (the
hot path, :class:`prism_otel.recorder.Recorder`) is passed in at ``instrument(recorder=...)``; hooks
bind its named constructors once, when they are wrapped. What an engine needs of the runtime that
started it (flush before a teardown, stop at a forked process's exit, the running state) comes the same
way, as a :class:`Lifecycle` (``instrument(lifecycle=...)``, or :meth:`EngineInstrumentor.bind` when the
OpenTelemetry loader instrumented first): nothing here imports the runtime.

:func:`guarded` (around an engine method) and :func:`guarded_callback` (a callback the engine calls,
e.g. a torch module hook) are the one place the hook safety rule is written: our code before and after the
engine's call runs inside a guard that counts what it raises and, after repeated failures, turns the
hook off (``prism_otel.instrumentation._hooks``); the engine's own call is never wrapped in a ``try``,
so its exceptions pass through untouched.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Callable, Optional, Protocol

import wrapt
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from prism_otel.instrumentation import STATUS, UNTESTED, check_version, unwrap_all
from prism_otel.instrumentation._patch import HookPoint, patch
from prism_otel.recorder import process_recorder

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
        if after is None:
            raise ValueError("guarded: give before, after or both")

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


def guarded_callback(g, fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` as a callback the engine calls (a torch module hook, a filter of a value) run under the
    guard ``g``: it returns ``fn``'s result, or None while the hook is off or when ``fn`` raised (what
    it raised is counted). To a torch module hook, None means "inputs and outputs unchanged".

    The callback takes as many positional arguments as ``fn`` (up to four: a torch forward hook with
    kwargs has four), so no argument tuple is packed per call; other signatures take ``*args``."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    n = -1 if code is None or code.co_flags & 0x0C else code.co_argcount - hasattr(fn, "__self__")

    if n == 3:
        def callback3(a, b, c):
            if g.disabled:
                return None
            try:
                return fn(a, b, c)
            except Exception as exc:  # noqa: BLE001
                g.failed(exc)
                return None

        return callback3

    if n == 4:
        def callback4(a, b, c, d):
            if g.disabled:
                return None
            try:
                return fn(a, b, c, d)
            except Exception as exc:  # noqa: BLE001
                g.failed(exc)
                return None

        return callback4

    def callback(*args):
        if g.disabled:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001
            g.failed(exc)
            return None

    return callback


class Lifecycle(Protocol):
    """The runtime as an instrumentation sees it (``prism_otel._runtime.LIFECYCLE``)."""

    def flush(self, timeout: float = 5.0) -> bool:
        """Hand what was recorded so far to the pipeline and wait (up to ``timeout``)."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Stop prism-otel in this process."""
        ...

    def current(self) -> Optional[object]:
        """The running state (its ``provider``: the application's tracer provider or None), or None."""
        ...


class _NoLifecycle:
    """Until a runtime binds itself: nothing runs, so there is nothing to flush or stop."""

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def stop(self, timeout: float = 10.0) -> None:
        return None

    def current(self) -> Optional[object]:
        return None


NO_LIFECYCLE: Lifecycle = _NoLifecycle()


class EngineInstrumentor(BaseInstrumentor):
    """Base of our engine instrumentors. Subclasses set the class attributes below.

    ``BaseInstrumentor`` is a per-class singleton whose ``__init__`` runs on every construction: the
    state lives on the class, so a second construction does not forget what was patched."""

    name: str = ""  # our name for the engine (status keys, PRISM_OTEL_INSTRUMENTATIONS)
    dists: tuple[str, ...] = ()  # distributions that provide it (the first installed one is checked)
    module: str = ""  # its top-level module (empty: the same as ``name``); prism_otel.engines reads these
    maps_marker: Optional[str] = None  # a path part of its native libraries in /proc/PID/maps (None: pure Python)
    precedence: int = 50  # where it ranks when several engines are loaded (lower: names the process)
    supported: str = ""  # instrumented range
    tested: Optional[str] = None  # the range the suite ran on (outside it: a warning, hook points checked one by one)
    instruments: Collection[str] = ()  # opentelemetry-instrument's dependency gate
    hook_points: tuple[HookPoint, ...] = ()
    extra_modules: tuple[str, ...] = ()  # other modules whose import calls on_import (not hook points)

    _active = False
    _patched: list = []
    recorder = None
    lifecycle: Lifecycle = NO_LIFECYCLE

    def instrumentation_dependencies(self) -> Collection[str]:
        return self.instruments

    def _instrument(self, **kwargs) -> None:
        if check_version(self.name, self.dists, kwargs.get("supported", self.supported), self.tested) is None:
            return
        cls = type(self)
        # without one (the OpenTelemetry loader instruments before prism-otel starts): the process's
        self.bind(kwargs.get("recorder") or cls.recorder or process_recorder(), kwargs.get("lifecycle"))
        cls._active = True
        cls._patched = list(cls._patched) if "_patched" in cls.__dict__ else []
        self.on_instrument(**kwargs)
        for module in dict.fromkeys([hp.module for hp in self.hook_points] + list(self.extra_modules)):
            # wrapt's bundled stubs declare its API for Python >= 3.10 only (pythonVersion is 3.9 here)
            wrapt.register_post_import_hook(self._on_import, module)  # pyright: ignore[reportAttributeAccessIssue]
        STATUS[self.name] = ("instrumented", UNTESTED.get(self.name, "hooks installed on import"))

    def bind(self, recorder=None, lifecycle: Optional[Lifecycle] = None) -> None:
        """Give this engine's hooks the recorder and the runtime's :class:`Lifecycle` (each kept when
        None). The runtime calls it for an instrumentor the OpenTelemetry loader instrumented first."""
        cls = type(self)
        if recorder is not None:
            cls.recorder = recorder
        if lifecycle is not None:
            cls.lifecycle = lifecycle

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
