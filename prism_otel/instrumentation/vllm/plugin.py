"""vLLM ``vllm.general_plugins`` entry point (name ``prism_otel``).

vLLM calls :func:`register` in every process it runs (API server or ``LLM`` process, engine core at
the top of ``EngineCore.__init__``, each worker), so prism-otel is running there before the engine
objects exist, whatever start method (fork or spawn) and whether or not the command was wrapped by
``prism-otel run`` / ``opentelemetry-instrument`` (then this is a no-op: start is idempotent).
Opt out with ``PRISM_OTEL_DISABLED=1``, or with vLLM's allow-list ``VLLM_PLUGINS`` not naming it.

Being installed is not being asked: the plugin starts prism-otel only when something asked for it:
``prism-otel run`` (its bootstrap marker, inherited by every child), an exporter or OTLP endpoint in
the standard ``OTEL_*`` variables, ``PRISM_OTEL_OUT_DIR``, or ``PRISM_OTEL_VLLM_PLUGIN=1``. A plain
``vllm serve`` in an environment where prism-otel happens to be installed writes nothing.
"""

from __future__ import annotations

import os


def register() -> None:
    from prism_otel import semconv as sc

    if os.environ.get(sc.ENV_DISABLED, "") not in ("", "0"):
        return
    if not asked():
        return
    try:
        import prism_otel

        prism_otel.start(lazy=True)  # workers never record: no ring, no companion there
    except Exception as exc:  # noqa: BLE001 - a plugin must never stop vLLM from starting
        import logging

        logging.getLogger(__name__).warning("prism-otel: vLLM plugin could not start: %r", exc)


def asked() -> bool:
    """Whether this process's environment asks for prism-otel (see the module docstring)."""
    from prism_otel import semconv as sc

    env = os.environ
    if env.get(sc.ENV_VLLM_PLUGIN, "") not in ("", "0"):
        return True
    return any(env.get(k) for k in (sc.ENV_BOOTSTRAP_ACTIVE, sc.OTEL_TRACES_EXPORTER, sc.OTEL_EXPORTER_OTLP_ENDPOINT,
                                    sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, sc.ENV_OUT_DIR))
