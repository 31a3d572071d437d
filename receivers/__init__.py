"""Collector receivers. ``otlp``: OTLP over gRPC (``TraceService/Export``) and HTTP (``/v1/traces``)."""
