"""Errors shared by the collector's config loader, components and pipelines.

* :class:`ConfigError` (:mod:`prism_otel.config_error`, the one config error of every part) carries
  the YAML path of the offending node (``receivers::otlp::protocols``), in the Collector's own ``::``
  notation, so a bad config names where it is wrong.
* :class:`Refused` is how the intake says "not now": receivers turn it into the OTLP backpressure
  statuses (gRPC RESOURCE_EXHAUSTED / UNAVAILABLE with RetryInfo, HTTP 429 / 503 with Retry-After).
* :class:`PermanentError` marks a send that must not be retried (the backend said the data is bad).
"""

from __future__ import annotations

from prism_otel.config_error import ConfigError, PathLike, join_path

__all__ = ["ConfigError", "CorruptRecord", "PathLike", "PermanentError", "Refused", "join_path"]


class Refused(Exception):
    """The intake cannot take this request now; the sender should retry after ``retry_after`` seconds.

    ``overloaded`` True means "queue full" (RESOURCE_EXHAUSTED / 429); False means "unavailable"
    (shutting down, memory limit, storage failing: UNAVAILABLE / 503), as the Collector maps them.
    """

    def __init__(self, reason: str, retry_after: float = 1.0, overloaded: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.overloaded = overloaded


class PermanentError(Exception):
    """A send failed in a way retrying cannot fix (e.g. the backend answered INVALID_ARGUMENT / 400)."""


class CorruptRecord(OSError):
    """A persistent-queue record that cannot be read back intact: the pipeline settles it (counts it and
    moves on), it is never replayed again."""

    def __init__(self, seq: int, why: str) -> None:
        super().__init__(f"queue record {seq} {why}")
        self.seq = seq
        self.why = why
