"""Hook safety: an error in our code inside an engine hook is caught, counted, and after repeated
failures the hook disables itself and says so once in the log. The engine's own exceptions pass
through untouched (our code never wraps the call to the engine in a try)."""

from __future__ import annotations

import logging
import os

from opentelemetry import metrics

from prism_otel import semconv as sc

logger = logging.getLogger(__name__)

_DEFAULT_MAX_ERRORS = 10
_counter = None


def _max_errors() -> int:
    try:
        return max(1, int(os.environ.get(sc.ENV_HOOK_MAX_ERRORS, _DEFAULT_MAX_ERRORS)))
    except ValueError:
        return _DEFAULT_MAX_ERRORS


class HookGuard:
    """Per-hook error accounting. ``disabled`` is read on the hot path (one attribute load)."""

    __slots__ = ("name", "errors", "disabled", "max_errors")

    def __init__(self, name: str) -> None:
        self.name = name
        self.errors = 0
        self.disabled = False
        self.max_errors = _max_errors()

    def failed(self, exc: BaseException) -> None:
        global _counter
        self.errors += 1
        try:
            if _counter is None:
                _counter = metrics.get_meter(sc.SCOPE).create_counter(sc.METRIC_HOOK_ERRORS)
            _counter.add(1, {"hook": self.name})
        except Exception:  # noqa: BLE001
            pass
        if self.errors == 1:
            logger.warning("prism-otel: hook %s failed: %r (counted; the engine is unaffected)", self.name, exc)
        if self.errors >= self.max_errors and not self.disabled:
            from prism_otel.instrumentation import STATUS

            self.disabled = True
            STATUS[self.name] = ("disabled", f"after {self.errors} failures; the first: {exc!r}")
            logger.warning("prism-otel: hook %s disabled itself after %d failures", self.name, self.errors)

    def reset(self) -> None:
        self.errors = 0
        self.disabled = False


GUARDS: dict[str, HookGuard] = {}


def guard(name: str) -> HookGuard:
    g = GUARDS.get(name)
    if g is None:
        g = GUARDS[name] = HookGuard(name)
    return g


def hook_errors() -> dict[str, int]:
    return {n: g.errors for n, g in GUARDS.items() if g.errors}
