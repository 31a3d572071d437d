"""Collector exporters: ``otlp_grpc`` (old name ``otlp``), ``otlp_http``, ``file``, ``debug``.

Each module has its config dataclass (keys and defaults as in the OpenTelemetry Collector) and a
``factory()``; the shared queue/retry machinery is :mod:`prism_otel.collector.exporters.base`.
"""
