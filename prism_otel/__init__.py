"""prism-otel: batch-level latency tracing, anomaly detection and OTLP export for LLM inference servers.

Zero code: ``prism-otel run -- python app.py`` or ``opentelemetry-instrument python app.py``.
One line of code: ``prism_otel.start()`` (and ``prism_otel.stop()``).
"""

from prism_otel._runtime import start, status, stop  # noqa: E402
from prism_otel.version import __version__

__all__ = ["__version__", "start", "status", "stop"]
