"""The collector's name for the one config decoder (:mod:`prism_otel.config_decode`), in the Collector's
``mapstructure`` role: a component's YAML mapping laid over its config dataclass, strictly, every error a
``ConfigError`` with the YAML path (``receivers::otlp::protocols``)."""

from __future__ import annotations

from prism_otel.config_decode import Duration, check, decode, defaults

__all__ = ["Duration", "check", "decode", "defaults"]
