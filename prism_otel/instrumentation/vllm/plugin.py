"""vLLM ``vllm.general_plugins`` entry point (name ``prism_otel``).

vLLM calls :func:`register` in every process it runs (API server or ``LLM`` process, engine core at
the top of ``EngineCore.__init__``, each worker), so prism-otel is running there before the engine
objects exist, whatever start method (fork or spawn) and whether or not the command was wrapped by
``prism-otel run`` / ``opentelemetry-instrument`` (then this is a no-op: start is idempotent).
Opt out with ``PRISM_OTEL_DISABLED=1``, or with vLLM's allow-list ``VLLM_PLUGINS`` not naming it.
"""

from __future__ import annotations

import os


def register() -> None:
    from prism_otel import semconv as sc

    if os.environ.get(sc.ENV_DISABLED, "") not in ("", "0"):
        return
    try:
        import prism_otel

        prism_otel.start(lazy=True)  # workers never record: no ring, no companion there
    except Exception as exc:  # noqa: BLE001 - a plugin must never stop vLLM from starting
        import logging

        logging.getLogger(__name__).warning("prism-otel: vLLM plugin could not start: %r", exc)
