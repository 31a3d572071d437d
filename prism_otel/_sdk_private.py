"""The OpenTelemetry SDK's private attributes prism-otel reads, all here, with the SDK releases they were
read on.

One today: ``TracerProvider._active_span_processor``, the provider's span processor (a
``SynchronousMultiSpanProcessor``), to which :class:`~prism_otel.spans.SpanMaterializer` hands the
spans it builds with explicit start and end times, the verdict already on them, as the SDK's own
``Span.end()`` does (the public API has no way to emit a finished span with given times).

:func:`check` looks for each on a fresh provider; ``tests/test_sdk_private.py`` runs it, so an SDK
release that moves one fails the suite loudly instead of silently losing spans. At run time, a
provider without it is refused with a ``TypeError`` (the application's provider is then not one of the
SDK's), and an SDK outside :data:`TESTED` gets one warning.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

TESTED = ">=1.27,<2"  # opentelemetry-sdk releases these attributes were read on (pyproject: >=1.27)
_warned: list[bool] = []


def sdk_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("opentelemetry-sdk")
    except PackageNotFoundError:
        return ""


def _warn_untested() -> None:
    if _warned:
        return
    _warned.append(True)
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        v = sdk_version()
        if v and Version(v) not in SpecifierSet(TESTED):
            logger.warning("prism-otel: opentelemetry-sdk %s is outside the tested range %s: the SDK attributes "
                           "prism-otel reads (prism_otel._sdk_private) may have moved", v, TESTED)
    except Exception:  # noqa: BLE001 - a version we cannot parse is not worth failing for
        pass


def active_span_processor(provider: Any) -> Any:
    """The span processor of an SDK ``TracerProvider`` (``on_start``/``on_end`` of every span it made),
    or None when ``provider`` has none (not the SDK's provider, or an SDK that moved it)."""
    _warn_untested()
    return getattr(provider, "_active_span_processor", None)


def check() -> list[str]:
    """What is missing from this SDK (empty: everything prism-otel reads is where it expects it)."""
    from opentelemetry.sdk.trace import TracerProvider

    problems = []
    p = TracerProvider()
    try:
        proc = getattr(p, "_active_span_processor", None)
        if proc is None:
            problems.append("TracerProvider._active_span_processor is gone")
        else:
            for meth in ("on_start", "on_end", "force_flush", "shutdown"):
                if not callable(getattr(proc, meth, None)):
                    problems.append(f"TracerProvider._active_span_processor.{meth} is gone")
    finally:
        p.shutdown()
    return problems
